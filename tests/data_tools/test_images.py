"""The one decoder: every input kind, the three resize modes, EXIF, errors, and draft-mode quality."""

from __future__ import annotations

import concurrent.futures
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from imat.data_tools.images import _needed_size, decode_image, read_image_size
from imat.errors import ConfigError, ImageDecodeError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
BIG = "000aac3870ea7c59ca0333ffa5327323"  # the 6000x4000 photo of real-smoke


def halves(w, h, left=RED, right=BLUE, mode="RGB") -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2:] = left, right
    return Image.fromarray(a).convert(mode)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def close(pixel, colour, tol=12):
    return np.abs(np.asarray(pixel, int) - np.asarray(colour, int)).max() <= tol


# ---- input kinds -------------------------------------------------------------------------------------

def test_rgb_jpeg_path_stretch(tmp_path):
    p = tmp_path / "a.jpg"
    halves(100, 50).save(p, quality=95)
    out = decode_image(p, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert close(out[32, 2], RED) and close(out[32, 61], BLUE)
    assert np.array_equal(decode_image(str(p), 64), out)  # str and Path alike


def test_greyscale_jpeg():
    out = decode_image(encode(Image.new("L", (30, 20), 77), "JPEG"), 8)
    assert out.shape == (8, 8, 3) and np.abs(out.astype(int) - 77).max() <= 2


def test_cmyk_jpeg():
    out = decode_image(encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG"), 8)
    assert close(out[4, 4], RED)


def test_palette_png():
    im = halves(20, 10, GREEN, BLUE).convert("P")
    assert im.mode == "P"
    out = decode_image(encode(im, "PNG"), (10, 20))
    assert out.shape == (10, 20, 3)
    assert tuple(out[5, 0]) == GREEN and tuple(out[5, 19]) == BLUE


def test_rgba_png_composited_on_white():
    a = np.zeros((10, 20, 4), np.uint8)
    a[:, :10] = (255, 0, 0, 255)   # opaque red
    a[:, 10:] = (0, 0, 255, 0)     # fully transparent (colour must not leak)
    out = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"), (10, 20))
    assert tuple(out[5, 0]) == RED and tuple(out[5, 19]) == WHITE


def test_palette_png_with_transparency_and_la():
    im = Image.new("P", (8, 8), 0)
    im.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    im.info["transparency"] = 0
    assert tuple(decode_image(encode(im, "PNG", transparency=0), 4)[0, 0]) == WHITE
    la = Image.new("LA", (8, 8), (50, 255))
    assert tuple(decode_image(encode(la, "PNG"), 4)[0, 0]) == (50, 50, 50)


def test_webp():
    out = decode_image(encode(halves(64, 32), "WEBP", lossless=True), (32, 64))
    assert tuple(out[16, 1]) == RED and tuple(out[16, 62]) == BLUE


def test_16bit_png_is_scaled_not_clipped():
    a = np.array([[0, 32896, 65535, 1000]], np.uint16).repeat(4, axis=0)
    im = Image.fromarray(a)
    raw = encode(im, "PNG")
    assert Image.open(io.BytesIO(raw)).mode.startswith("I")
    out = decode_image(raw, (4, 4))
    assert out[0, :, 0].tolist() == [0, 128, 255, 4] and (out[..., 0] == out[..., 2]).all()


def test_array_inputs():
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = RED
    out = decode_image(rgb, (20, 30))
    assert np.array_equal(out, rgb) and out is not rgb
    grey = np.full((10, 10), 9, np.uint8)
    assert (decode_image(grey, 5) == 9).all()
    assert decode_image(rgb, 10).shape == (10, 10, 3)
    with pytest.raises(ImageDecodeError, match="dtype"):
        decode_image(rgb.astype(np.float32), 10)
    with pytest.raises(ImageDecodeError, match="shape"):
        decode_image(np.zeros((4, 4, 4), np.uint8), 10)


def test_bytes_equal_path(tmp_path):
    p = tmp_path / "x.png"
    halves(33, 17).save(p)
    assert np.array_equal(decode_image(p.read_bytes(), 16), decode_image(p, 16))
    assert np.array_equal(decode_image(bytearray(p.read_bytes()), 16), decode_image(p, 16))


# ---- modes -------------------------------------------------------------------------------------------

def test_stretch_exact():
    out = decode_image(encode(halves(100, 50), "PNG"), 64, "stretch")
    assert (out[:, :31] == RED).all() and (out[:, 33:] == BLUE).all()


def test_letterbox_pads_black_rows_centred():
    out = decode_image(np.full((32, 64, 3), 255, np.uint8), 128, "letterbox")
    assert out.shape == (128, 128, 3)
    assert (out[:32] == 0).all() and (out[96:] == 0).all() and (out[32:96] == 255).all()
    tall = decode_image(np.full((64, 16, 3), 200, np.uint8), 64, "letterbox")
    assert (tall[:, :24] == 0).all() and (tall[:, 40:] == 0).all() and (tall[:, 24:40] == 200).all()


def test_center_crop_keeps_the_middle():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100], a[:, 100:200], a[:, 200:] = RED, GREEN, BLUE
    out = decode_image(a, 64, "center_crop")
    assert (out[:, 2:-2] == GREEN).all() and out[..., 1].mean() > 240
    b = decode_image(np.ascontiguousarray(a.transpose(1, 0, 2)), 64, "center_crop")  # tall: crop rows
    assert (b[2:-2] == GREEN).all()


def test_rectangular_size_is_height_width():
    assert decode_image(np.zeros((10, 10, 3), np.uint8), (20, 40)).shape == (20, 40, 3)


def test_bad_size_or_mode():
    with pytest.raises(ConfigError, match="resize mode"):
        decode_image(np.zeros((4, 4, 3), np.uint8), 8, "squash")
    with pytest.raises(ConfigError):
        decode_image(np.zeros((4, 4, 3), np.uint8), 0)


# ---- EXIF orientation (with draft mode engaged) ---------------------------------------------------------

@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
def test_exif_orientation_changes_output(tmp_path, orientation):
    # stored landscape 800x400: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    halves(800, 400).save(p, exif=exif, quality=95)
    portrait = orientation in (6, 8)
    assert read_image_size(p) == ((400, 800) if portrait else (800, 400))
    out = decode_image(p, 64, "letterbox")
    if portrait:  # displayed 400x800: content 32 wide, black columns left and right
        assert (out[:, :15] == 0).all() and (out[:, 49:] == 0).all()
        top, bottom = out[8, 32], out[56, 32]
        # orientation 6 = rotate 90 clockwise for display: stored left (red) goes to the top
        assert close(top, RED if orientation == 6 else BLUE) and close(bottom, BLUE if orientation == 6 else RED)
    else:  # displayed landscape: black rows top and bottom
        assert (out[:15] == 0).all() and (out[49:] == 0).all()
        left, right = out[32, 4], out[32, 60]
        assert close(left, RED if orientation == 1 else BLUE) and close(right, BLUE if orientation == 1 else RED)


def test_draft_target_is_computed_in_stored_orientation():
    # stored 6000x4000 shown rotated (4000x6000); letterbox into 128 -> displayed content 85x128
    assert _needed_size((6000, 4000), 128, 128, "letterbox", swapped=True) == (128, 86)
    assert _needed_size((6000, 4000), 128, 128, "letterbox", swapped=False) == (128, 86)
    assert _needed_size((6000, 4000), 128, 128, "center_crop", swapped=False) == (192, 128)
    assert _needed_size((6000, 4000), 64, 32, "stretch", swapped=True) == (64, 32)
    assert _needed_size((6000, 4000), 64, 32, "stretch", swapped=False) == (32, 64)


# ---- errors ------------------------------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_error_cases_name_the_file(tmp_path):
    good = encode(Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)),
                  "JPEG")
    cases = {
        "empty.jpg": (b"", "0 bytes"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "no_eoi.jpg": (good[:-2], "truncated"),
        "text.jpg": (b"hello, I am not an image\n" * 10, "not an image"),
        "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "not an image"),
        "bad_data.png": (_png_header_only(64, 64), "corrupt|truncated"),
    }
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name, (data, reason) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ImageDecodeError, match=reason) as e:
            decode_image(p)
        assert e.value.path == str(p) and str(p) in str(e.value)
    with pytest.raises(ImageDecodeError, match="not found"):
        decode_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageDecodeError, match="0 bytes") as e:
        decode_image(b"")
    assert e.value.path == "<bytes>"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global state untouched


def test_bomb_is_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(12_000, 12_000))   # 144 MP header, 100 bytes of data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's own DecompressionBombWarning (144 MP > its 89 MP)
        with pytest.raises(ImageDecodeError, match="max_pixels") as e:
            decode_image(p, max_pixels=100_000_000)
    assert e.value.path == str(p)
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(100_000, 100_000))  # PIL's DecompressionBombError path
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_image(huge)
    small = tmp_path / "small.png"
    halves(100, 100).save(small)
    with pytest.raises(ImageDecodeError, match="max_pixels"):
        decode_image(small, max_pixels=5_000)
    assert decode_image(small, 8, max_pixels=10_000).shape == (8, 8, 3)


def test_read_image_size_errors(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("nope")
    with pytest.raises(ImageDecodeError, match="not an image"):
        read_image_size(p)


# ---- real photos -------------------------------------------------------------------------------------

def test_real_big_photo_draft_close_to_full_decode(real_smoke):
    p = real_smoke / "train" / f"{BIG}.jpg"
    assert read_image_size(p) == (6000, 4000)
    out = decode_image(p, 128)
    assert out.shape == (128, 128, 3)
    with Image.open(p) as im:
        ref = np.asarray(im.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR))
    diff = np.abs(out.astype(float) - ref.astype(float)).mean()
    assert diff < 4.0, f"draft-mode decode differs from full decode by {diff:.2f} grey levels"
    for mode in ("letterbox", "center_crop"):
        assert decode_image(p, 128, mode).shape == (128, 128, 3)


def test_threads_give_identical_pixels(real_smoke):
    paths = sorted((real_smoke / "train").glob("*.jpg"))[:6]
    serial = [decode_image(p, 64) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: decode_image(p, 64), paths * 2))
    for a, b in zip(serial * 2, threaded):
        assert np.array_equal(a, b)


def test_real_photos_match_full_decode(real_smoke):
    """Draft mode must not cost quality: every real-smoke photo stays within 1.5 grey levels (mean)."""
    for p in sorted((real_smoke / "train").glob("*.jpg")):
        with Image.open(p) as im:
            im.load()
            full = np.asarray(im.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR, reducing_gap=3.0))
        diff = np.abs(decode_image(p, 128).astype(float) - full).mean()
        assert diff < 1.5, f"{p.name}: {diff:.2f}"


def test_only_regular_files_are_opened(tmp_path):
    import os
    import socket
    import threading

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    box: dict = {}

    def decode():
        try:
            decode_image(fifo, 8)
        except ImageDecodeError as e:
            box["error"] = e

    worker = threading.Thread(target=decode, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock the reader so the test process can exit, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        pytest.fail("decoding a FIFO hung")
    assert box["error"].path == str(fifo) and "not a regular file (FIFO" in box["error"].reason
    with pytest.raises(ImageDecodeError, match="null: not a regular file \\(character device"):
        read_image_size("/dev/null")
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(ImageDecodeError, match="not a regular file \\(socket"):
            decode_image(sock_path, 8)
    with pytest.raises(ImageDecodeError, match="is a folder"):
        decode_image(tmp_path, 8)


def test_image_extensions_are_what_pillow_opens():
    from imat.data_tools.images import image_extensions

    exts = image_extensions()
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp", ".gif"} <= set(exts)
    registered = Image.registered_extensions()
    assert all(registered[e] in Image.OPEN for e in exts)  # only formats Pillow can open
    assert ".pdf" not in exts  # Pillow writes PDF but cannot read it
    assert ".h5" not in exts  # a stub plugin: no decoder without an external handler
    from PIL import features

    if features.check("avif"):
        assert ".avif" in exts
