"""Kaggle reader and RLE: checked against plain-loop references and on deliberately broken files."""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np
import pytest
from PIL import Image

from imat.data_tools.kaggle import (
    Problem, list_images, read_kaggle, rle_decode, rle_encode,
)
from imat.data_tools.labels import LabelSpace
from imat.errors import DataError

HEADER = "ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds"


# ---- RLE against slow references -------------------------------------------------------------------

def ref_decode(rle: str, h: int, w: int) -> np.ndarray:
    flat = [0] * (h * w)
    nums = [int(x) for x in rle.split()]
    for s, n in zip(nums[0::2], nums[1::2]):
        for i in range(s - 1, s - 1 + n):
            flat[i] = 1
    # column-major: pixel (r, c) is flat[c * h + r]
    return np.array([[flat[c * h + r] for c in range(w)] for r in range(h)], np.uint8)


def ref_encode(mask: np.ndarray) -> str:
    h, w = mask.shape
    out, run_start, pos = [], None, 0
    for c in range(w):
        for r in range(h):
            pos += 1
            if mask[r, c] and run_start is None:
                run_start = pos
            elif not mask[r, c] and run_start is not None:
                out += [run_start, pos - run_start]
                run_start = None
    if run_start is not None:
        out += [run_start, pos + 1 - run_start]
    return " ".join(map(str, out))


def _masks():
    rng = np.random.default_rng(0)
    yield np.zeros((5, 7), np.uint8)                    # empty
    yield np.ones((5, 7), np.uint8)                     # full
    one = np.zeros((5, 7), np.uint8); one[0, 0] = 1; yield one       # first pixel
    last = np.zeros((5, 7), np.uint8); last[-1, -1] = 1; yield last  # last pixel
    col = np.zeros((5, 7), np.uint8); col[:, 3] = 1; col[0, 4] = 1; yield col  # run crossing columns
    yield np.ones((1, 1), np.uint8)
    for p in (0.1, 0.5, 0.9):
        yield (rng.random((rng.integers(1, 20), rng.integers(1, 20))) < p).astype(np.uint8)


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape}:{int(m.sum())}")
def test_rle_matches_reference(mask):
    rle = rle_encode(mask)
    assert rle == ref_encode(mask)
    out = rle_decode(rle, *mask.shape)
    assert out.dtype == np.uint8 and out.shape == mask.shape
    np.testing.assert_array_equal(out, ref_decode(rle, *mask.shape))
    np.testing.assert_array_equal(out, mask)


def test_rle_known_values_column_major():
    # 3 rows x 2 columns; "2 3" sets flat 2..4 = (1,0), (2,0), (0,1)
    np.testing.assert_array_equal(rle_decode("2 3", 3, 2), [[0, 1], [1, 0], [1, 0]])
    assert rle_encode(np.array([[0, 1], [1, 0], [1, 0]])) == "2 3"
    assert rle_encode(np.zeros((4, 4))) == ""
    # touching runs are legal input and decode as one run
    np.testing.assert_array_equal(rle_decode("1 2 3 1", 3, 1), [[1], [1], [1]])


def test_rle_decode_large_is_fast():
    yy, xx = np.mgrid[:4000, :6000]
    mask = (((yy - 2000) / 1500.0) ** 2 + ((xx - 3000) / 2500.0) ** 2 < 1).astype(np.uint8)
    rle = rle_encode(mask)
    t = time.perf_counter()
    out = rle_decode(rle, 4000, 6000)
    elapsed = time.perf_counter() - t
    np.testing.assert_array_equal(out, mask)
    assert elapsed < 2.0, f"decoding a 6000x4000 mask took {elapsed:.2f}s"


@pytest.mark.parametrize("rle, match", [
    ("1 2 x 3", "not an integer"),
    ("1.5 2", "not an integer"),
    ("1 2 3", "odd number"),
    ("0 2", "not positive"),
    ("1 -2", "negative"),
    ("3 0", "not positive"),
    ("5 2 1 1", "unsorted or overlap"),
    ("1 3 3 1", "unsorted or overlap"),
    ("11 3", "past Height"), ("10 3", None),
])
def test_rle_decode_malformed(rle, match):
    if match is None:  # the boundary case: a run ending exactly at the last pixel is valid
        assert rle_decode(rle, 3, 4).ravel(order="F")[9:].tolist() == [1, 1, 1]
        return
    with pytest.raises(DataError, match=match):
        rle_decode(rle, 3, 4)


# ---- reader on small hand-written folders ------------------------------------------------------------

def make_folder(root: pathlib.Path, rows: list[str], images=("img1", "img2"), size=(4, 3)) -> pathlib.Path:
    """A tiny Kaggle folder: real label_descriptions, given csv rows, tiny JPEGs (size = (h, w))."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "label_descriptions.json").write_text(json.dumps(LabelSpace.default().to_json_dict()))
    (root / "train.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    (root / "train").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (size[1], size[0]), (200, 10, 10)).save(root / "train" / f"{name}.jpg")
    return root


GOOD = ["img1,1 3,4,3,1,", "img1,5 2,4,3,6,\"115,136\"", "img2,2 2,4,3,33,"]


def test_read_good_folder(tmp_path):
    ds = read_kaggle(make_folder(tmp_path / "k", GOOD))
    assert ds.problems == []
    assert [r.image_id for r in ds.records] == ["img1", "img2"]
    r1 = ds.records[0]
    assert (r1.height, r1.width) == (4, 3)
    assert r1.categories == (1, 6) and r1.attributes == (115, 136)
    assert [m.line for m in r1.masks] == [2, 3]
    assert r1.path == tmp_path / "k" / "train" / "img1.jpg"
    assert r1.masks[0].decode(4, 3).sum() == 3
    cm, am = ds.category_matrix(), ds.attribute_matrix()
    assert cm.shape == (2, 46) and cm.dtype == np.float32
    assert cm[0, [1, 6]].tolist() == [1, 1] and cm[0].sum() == 2 and cm[1, 33] == 1
    ls = LabelSpace.default()
    assert am.shape == (2, 294) and am[0, ls.attribute_index(136)] == 1 and am[1].sum() == 0
    assert "2 images and 3 mask rows" in ds.summary() and "no problems" in ds.summary()


BAD_CASES = [
    # (bad row, reason kind)
    ("img1,1 x,4,3,1,", "bad RLE"),
    ("img1,1 2 3,4,3,1,", "bad RLE"),
    ("img1,1 0,4,3,1,", "bad RLE"),
    ("img1,5 2 1 1,4,3,1,", "bad RLE"),
    ("img1,11 3,4,3,1,", "bad RLE"),
    ("img1,1 3,4,3,46,", "unknown ClassId"),
    ("img1,1 3,4,3,one,", "non-integer ClassId"),
    ("img1,1 3,4,3,1,\"115,999\"", "unknown attribute id"),
    ("img1,1 3,4,3,1,\"115,x\"", "non-integer attribute id"),
    ("img1,1 3,four,3,1,", "non-integer Height"),
    ("img1,1 3,4,3.5,1,", "non-integer Width"),
    ("img1,1 3,5,3,1,", "inconsistent Height/Width"),
    (HEADER, "duplicate header line"),
    ("img1,1 3,4,3", "wrong column count"),
    ("img1,1 3,4,3,1,,extra", "wrong column count"),
]


@pytest.mark.parametrize("bad, kind", BAD_CASES, ids=[k for _, k in BAD_CASES])
def test_bad_row_is_skipped_and_named(tmp_path, bad, kind):
    # the bad row is line 4 (header = 1, two good rows of img1 = 2, 3), one good row follows
    rows = [GOOD[0], GOOD[1], bad, GOOD[2]]
    root = make_folder(tmp_path / "k", rows)
    ds = read_kaggle(root)
    assert len(ds.problems) == 1, ds.problems
    p = ds.problems[0]
    assert p.file == str(root / "train.csv") and p.line == 4
    assert p.reason.startswith(kind), p.reason
    assert str(p).startswith(f"{root / 'train.csv'}:4: {kind}")
    # everything else is read
    assert [r.image_id for r in ds.records] == ["img1", "img2"]
    assert [m.line for m in ds.records[0].masks] == [2, 3]
    assert ds.num_rows_read == 4
    assert f"{kind}: 1" in ds.summary() and "dropped 1 rows and 0 images" in ds.summary()
    with pytest.raises(DataError, match=f"train.csv:4: {kind}"):
        read_kaggle(root, strict=True)


def test_validate_rle_false_keeps_rows(tmp_path):
    root = make_folder(tmp_path / "k", [*GOOD, "img1,1 2 3,4,3,1,"])
    assert len(read_kaggle(root).problems) == 1
    ds = read_kaggle(root, validate_rle=False)
    assert ds.problems == [] and len(ds.records[0].masks) == 3


def test_missing_image_drops_whole_image(tmp_path):
    root = make_folder(tmp_path / "k", [*GOOD, "ghost,1 1,4,3,1,", "ghost,2 1,4,3,2,"])
    ds = read_kaggle(root)
    assert [r.image_id for r in ds.records] == ["img1", "img2"]
    (p,) = ds.problems
    assert p.image_id == "ghost" and p.line == 5 and p.reason.startswith("missing image file")
    assert "ghost.jpg" in p.reason and "2 rows" in p.reason
    assert "dropped 2 rows and 1 images" in ds.summary()
    assert len(read_kaggle(root, check_images=False).records) == 3
    with pytest.raises(DataError, match="train.csv:5: missing image file"):
        read_kaggle(root, strict=True)


def test_image_with_only_bad_rows_is_dropped(tmp_path):
    root = make_folder(tmp_path / "k", [GOOD[0], "img2,1 3,4,3,99,"])
    ds = read_kaggle(root)
    assert [r.image_id for r in ds.records] == ["img1"] and ds.num_images_seen == 2
    assert "dropped 1 rows and 1 images" in ds.summary()


def test_problem_logging_is_capped(tmp_path, caplog):
    rows = [GOOD[0]] + [f"img1,1 3,4,3,{99 + i}," for i in range(30)]
    root = make_folder(tmp_path / "k", rows)
    with caplog.at_level("WARNING", logger="imat.data_tools.kaggle"):
        ds = read_kaggle(root)
    assert len(ds.problems) == 30
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 21 and "10 more problems" in warnings[-1]
    assert "train.csv:2" not in warnings[0] and "train.csv:3: unknown ClassId" in warnings[0]


@pytest.mark.parametrize("what", ["no_csv", "no_labels", "bad_labels", "empty_csv", "bad_header", "binary_csv", "no_root"])
def test_folder_level_errors_name_the_path(tmp_path, what):
    root = make_folder(tmp_path / "k", GOOD)
    target = root
    if what == "no_csv":
        target = root / "train.csv"; target.unlink()
    elif what == "no_labels":
        target = root / "label_descriptions.json"; target.unlink()
    elif what == "bad_labels":
        target = root / "label_descriptions.json"; target.write_text("[1, 2")
    elif what == "empty_csv":
        target = root / "train.csv"; target.write_text("")
    elif what == "bad_header":
        target = root / "train.csv"; target.write_text("a,b,c\n1,2,3\n")
    elif what == "binary_csv":
        target = root / "train.csv"; target.write_bytes(b"\xff\xfe\x00\x01garbage\n")
    elif what == "no_root":
        target = root = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        read_kaggle(root)
    assert str(target) in str(e.value)


def test_list_images(tmp_path):
    for name in ["b.JPG", "a.png", "c.webp", "d.jpeg", "e.Tif", "f.bmp", "g.gif", "notes.txt", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.jpg").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.png", "b.JPG", "c.webp", "d.jpeg", "e.Tif", "f.bmp", "g.gif"]
    with pytest.raises(DataError, match="missing"):
        list_images(tmp_path / "missing")


def test_problem_str():
    assert str(Problem("train.csv", 17, "x", "bad RLE: odd")) == "train.csv:17: bad RLE: odd"
    assert str(Problem("train.csv", None, None, "r")) == "train.csv: r"


# ---- real data ---------------------------------------------------------------------------------------

def test_real_smoke(real_smoke):
    import csv
    ds = read_kaggle(real_smoke, strict=True)
    assert len(ds.records) == 13 and ds.num_rows_kept == 56 and ds.problems == []
    expected: dict[str, set] = {}
    with open(real_smoke / "train.csv", newline="") as f:
        for row in csv.DictReader(f):
            expected.setdefault(row["ImageId"], set()).add(int(row["ClassId"]))
    assert {r.image_id: set(r.categories) for r in ds.records} == expected
    big = next(r for r in ds.records if r.image_id == "000aac3870ea7c59ca0333ffa5327323")
    assert (big.width, big.height) == (6000, 4000)
    for rec in ds.records:
        for m in rec.masks:
            mask = m.decode(rec.height, rec.width)
            assert mask.shape == (rec.height, rec.width) and mask.any()
            assert rle_encode(mask) == " ".join(m.encoded_pixels.split())  # canonical encoding round-trips
    fp = [r for r in ds.records if r.image_id.startswith("000000")]
    assert len(fp) == 2 and all(r.attributes for r in fp)


def test_ccp_dev(ccp_dev):
    ds = read_kaggle(ccp_dev, strict=True)
    assert len(ds.records) == 500 and ds.num_rows_kept == 2497
    assert ds.category_matrix().sum() == 2497  # one merged mask per (image, category)
    assert len(list_images(ccp_dev / "train")) == 500
