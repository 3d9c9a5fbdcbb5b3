"""The one image decoder of imat: training, `prepare` and the engine all call `decode_image`,
so a model sees identical pixels in training and in search.

decode -> (JPEG) DCT-domain downscale with Image.draft -> EXIF orientation -> RGB -> resize.

- JPEG draft: libjpeg can decode at 1/2, 1/4 or 1/8 scale for almost free. We ask for the smallest
  scale whose result is still at least DRAFT_MARGIN (1.5) times what the resize needs, so a 6000x4000
  photo is decoded at 750x500 instead of 24 MP, and the final bilinear resize still reduces by >= 1.5
  (quality holds; see DRAFT_MARGIN, the tests and benchmarks/decode.py).
- EXIF orientation 5..8 swaps the axes, so the draft target is computed in the stored (pre-rotation)
  orientation.
- Alpha (RGBA, LA, palette with transparency) is composited on WHITE: transparent product cut-outs
  are meant to be seen on a white page. Letterbox padding is BLACK (zeros).
- 16-bit greyscale is scaled to 8 bits (value / 257), not clipped.
- Only regular files are opened: a FIFO, socket or device (even named `x.jpg`) is an ImageDecodeError,
  never a read that blocks forever.
- Truncated files raise: ImageFile.LOAD_TRUNCATED_IMAGES is left False (never changed here).
- Decompression bombs: the header size is checked against `max_pixels` before any pixel is decoded.
  PIL's own guard (Image.MAX_IMAGE_PIXELS, a process-global we do not touch) still applies too: above
  2x that limit (~179 MP) PIL raises DecompressionBombError, which becomes ImageDecodeError here;
  between 1x and 2x PIL only emits a DecompressionBombWarning, which we leave as a warning because
  filtering warnings is process-global and not thread-safe (our own max_pixels check is the guard).

Thread-safe: no shared mutable state; PIL releases the GIL while decoding and resizing.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import pathlib
import stat

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from imat.constants import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_MODE, RESIZE_MODES
from imat.errors import ConfigError, ImageDecodeError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 200_000_000  # 200 MP: above any camera photo; a 40k x 40k "image" is a bomb
EMPTY_FILE = "empty file (0 bytes)"  # the reason for a 0-byte file, however it was read
RESAMPLE = Image.Resampling.BILINEAR
# resize() first reduces by an integer factor while the image is more than REDUCING_GAP times the
# target, then resamples; 3.0 is indistinguishable from a plain resize (Pillow docs) and faster.
REDUCING_GAP = 3.0
# Draft to the smallest JPEG scale whose output is still >= DRAFT_MARGIN x the size the resize needs.
# A margin of 1 (draft just above the target) left the final bilinear step resampling at a ratio
# near 1, which blurs: mean |diff| to a full-resolution Lanczos reference was 4.3 grey levels on
# real photos vs 2.5 for a full decode; with 1.5 it is 2.7, at ~5% of the speed (huge JPEGs still
# decode at 1/8: 6000x4000 -> 750x500 for 128 px).
DRAFT_MARGIN = 1.5
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)


def _target_hw(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ConfigError(f"image size {size!r} must be an int or (height, width)") from None
    if h <= 0 or w <= 0:
        raise ConfigError(f"image size {size!r} must be positive")
    return h, w


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")


def decode_image(source, size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE, mode: str = DEFAULT_RESIZE_MODE,
                 *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode and resize an image to uint8[H, W, 3].

    source: a path (str / PathLike), encoded bytes, or a uint8 array (HxWx3 or HxW).
    size: an int (square) or (height, width). mode: stretch | letterbox | center_crop.
    Raises ImageDecodeError(path, reason) for empty, truncated, corrupt, non-image or too-large input.
    """
    th, tw = _target_hw(size)
    _check_mode(mode)
    if isinstance(source, np.ndarray):
        im = _image_from_array(source)
        return _finish(im, th, tw, mode, "<array>")
    name, opener = _opener(source)
    with _as_decode_error(name), opener() as fp, Image.open(fp) as im:
        _check_pixels(im, max_pixels, name)
        orientation = _orientation(im)
        if isinstance(im, JpegImagePlugin.JpegImageFile):  # JPEG and MPO (many phone photos)
            sw, sh = _needed_size(im.size, th, tw, mode, orientation in _SWAPS_AXES)
            im.draft("RGB", (math.ceil(sw * DRAFT_MARGIN), math.ceil(sh * DRAFT_MARGIN)))
        im.load()
        if orientation not in (None, 1):
            im = ImageOps.exif_transpose(im)
        return _finish(im, th, tw, mode, name)


def decode_file_bytes(data: bytes, name: str, size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                      mode: str = DEFAULT_RESIZE_MODE, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode the contents of file `name`, read elsewhere (Ray Data's read_binary_files): the same pixels
    as `decode_image(name)`, and the same ImageDecodeError (path and reason) for a bad file."""
    if not data:
        raise ImageDecodeError(name, EMPTY_FILE)
    try:
        return decode_image(data, size, mode, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ImageDecodeError(name, e.reason) from None


@contextlib.contextmanager
def _as_decode_error(name: str):
    """Turn what PIL and the OS raise for a bad file into one ImageDecodeError naming the file."""
    try:
        yield
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a folder, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(name, "permission denied") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(name, f"too many pixels (decompression bomb guard): {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, MemoryError) as e:
        # PIL reports truncation as OSError('image file is truncated ...'), bad data as
        # OSError/SyntaxError/ValueError depending on the plugin.
        reason = str(e) or type(e).__name__
        if "truncated" in reason:
            reason = f"truncated image ({reason})"
        else:
            reason = f"corrupt or unsupported image ({reason})"
        raise ImageDecodeError(name, reason) from None


def read_image_size(path) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after EXIF orientation; reads the header only."""
    name, opener = _opener(path)
    with _as_decode_error(name), opener() as fp, Image.open(fp) as im:
        w, h = im.size
        if _orientation(im) in _SWAPS_AXES:
            w, h = h, w
        return w, h


# ---- helpers --------------------------------------------------------------------------------------

def _opener(source):
    """(display name, a context-manager factory giving a binary file object)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageDecodeError("<bytes>", "empty input (0 bytes)")
        return "<bytes>", lambda: io.BytesIO(data)
    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        try:
            info = path.stat()
        except OSError:
            info = None  # reported by open() below with a precise reason
        if info is not None:
            _check_regular(info, path)
            if info.st_size == 0:
                raise ImageDecodeError(path, EMPTY_FILE)
        return str(path), lambda: _open_regular(path)
    raise TypeError(f"decode_image source must be a path, bytes or numpy array, not {type(source).__name__}")


def file_kind(mode: int) -> str | None:
    """What a file that is not a regular file is ("folder", "FIFO", "socket", ...); None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


def _check_regular(info: os.stat_result, path) -> None:
    kind = file_kind(info.st_mode)
    if kind == "folder":
        raise ImageDecodeError(path, "is a folder, not an image file")
    if kind is not None:
        # Opening a FIFO blocks until a writer comes; a device may be endless or have side effects.
        raise ImageDecodeError(path, f"not a regular file ({kind}); only image files are read")


def _open_regular(path: pathlib.Path):
    """open(path, "rb"), refusing anything but a regular file without ever blocking on it.

    The stat in `_opener` keeps devices from being opened at all; O_NONBLOCK + fstat here closes
    the window where the name is replaced by a FIFO between that stat and this open.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _check_regular(os.fstat(fd), path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def image_extensions() -> tuple[str, ...]:
    """File extensions (lower case, with the dot) of the formats the installed Pillow can open.

    Asked from Pillow (`registered_extensions` filtered to formats with an open plugin), so a
    Pillow built with AVIF, JPEG 2000, ... lets those files in; identify-only formats (stub
    plugins: HDF5, GRIB, BUFR, WMF; and MPEG video) and save-only formats (PDF) are left out.
    """
    return _image_extensions()


_IDENTIFY_ONLY = {"MPEG"}  # Pillow reads its header but has no decoder for it


@functools.lru_cache(maxsize=1)
def _image_extensions() -> tuple[str, ...]:
    from PIL import ImageFile

    openable = set()
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        if factory is None or fmt in _IDENTIFY_ONLY or (
                isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)):
            continue
        openable.add(ext.lower())
    return tuple(sorted(openable))


def is_image_name(name) -> bool:
    """Does the name end in an extension of a format Pillow can open (case-insensitive)?"""
    return os.path.splitext(os.fspath(name))[1].lower() in _image_extensions()


def _check_pixels(im: Image.Image, max_pixels: int, name: str) -> None:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(name, f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ImageDecodeError(name, f"image is {w}x{h} = {w * h:,} pixels, more than max_pixels={max_pixels:,} "
                                     "(decompression bomb guard); raise max_pixels if the image is genuine")


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_ORIENTATION_TAG)
    except Exception as e:  # a broken EXIF block must not make a good image undecodable
        logger.debug("ignoring unreadable EXIF: %s", e)
        return None
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else None


def _needed_size(stored_size, th: int, tw: int, mode: str, swapped: bool) -> tuple[int, int]:
    """Smallest (w, h) in stored orientation that the resize needs: draft must not go below it."""
    w, h = stored_size
    if swapped:  # displayed image is the transpose of the stored one
        th, tw = tw, th
    if mode == "stretch":
        return tw, th
    scale = (min if mode == "letterbox" else max)(tw / w, th / h)
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _image_from_array(arr: np.ndarray) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ImageDecodeError("<array>", f"array dtype {arr.dtype} is not uint8")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)) or 0 in arr.shape:
        raise ImageDecodeError("<array>", f"array shape {arr.shape} is not HxW or HxWx3")
    return Image.fromarray(np.ascontiguousarray(arr))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        # 16-bit data (PNG) in 0..65535: scale to 0..255 rather than clip like Image.convert does.
        a8 = ((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info) \
        or (im.mode in ("L", "RGB") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _finish(im: Image.Image, th: int, tw: int, mode: str, name: str) -> np.ndarray:
    im = _to_rgb(im)
    w, h = im.size
    if (w, h) == (tw, th):
        return np.array(im, dtype=np.uint8)
    if mode == "stretch":
        out = im.resize((tw, th), RESAMPLE, reducing_gap=REDUCING_GAP)
    elif mode == "letterbox":
        scale = min(tw / w, th / h)
        nw, nh = min(tw, max(1, round(w * scale))), min(th, max(1, round(h * scale)))
        inner = im.resize((nw, nh), RESAMPLE, reducing_gap=REDUCING_GAP)
        out = Image.new("RGB", (tw, th), (0, 0, 0))
        out.paste(inner, ((tw - nw) // 2, (th - nh) // 2))
    else:  # center_crop: resize only the centred source box with the target aspect
        if w * th > h * tw:  # source is wider than the target: crop width
            cw = h * tw / th
            box = ((w - cw) / 2, 0.0, (w + cw) / 2, float(h))
        else:
            ch = w * th / tw
            box = (0.0, (h - ch) / 2, float(w), (h + ch) / 2)
        out = im.resize((tw, th), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
    arr = np.array(out, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)
    if arr.shape != (th, tw, 3):  # defensive: every branch above produces this shape
        raise ImageDecodeError(name, f"internal error: decoded shape {arr.shape}")
    return arr
