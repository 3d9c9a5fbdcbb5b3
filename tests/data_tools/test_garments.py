"""Garment instances: boxes from RLE (against a loop over the decoded mask), padding at the borders,
part categories and small masks left out, crops equal to a plain crop-then-resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imat.data_tools import garments as G
from imat.data_tools.images import decode_image
from imat.data_tools.kaggle import read_kaggle, rle_decode, rle_encode
from imat.errors import ConfigError


def _loop_box(mask: np.ndarray):
    """Reference: the bounding box by scanning every pixel."""
    x0 = y0 = None
    x1 = y1 = -1
    area = 0
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                area += 1
                x0 = x if x0 is None else min(x0, x)
                y0 = y if y0 is None else min(y0, y)
                x1, y1 = max(x1, x), max(y1, y)
    return (None, 0) if x0 is None else ((x0, y0, x1 + 1, y1 + 1), area)


def test_rle_box_matches_a_loop_over_the_decoded_mask():
    rng = np.random.default_rng(0)
    for trial in range(60):
        h, w = rng.integers(1, 30, size=2)
        mask = np.zeros((h, w), np.uint8)
        kind = trial % 4
        if kind == 0:        # random speckle (runs cross columns)
            mask = (rng.random((h, w)) < rng.uniform(0.01, 0.6)).astype(np.uint8)
        elif kind == 1:      # one rectangle
            ya, yb = sorted(rng.integers(0, h + 1, size=2))
            xa, xb = sorted(rng.integers(0, w + 1, size=2))
            mask[ya:yb, xa:xb] = 1
        elif kind == 2:      # a run ending at the bottom of one column and starting the next at the top
            mask[h - 1, 0] = 1
            if w > 1:
                mask[0, 1] = 1
        # kind 3: empty
        rle = rle_encode(mask)
        assert np.array_equal(rle_decode(rle, h, w), mask)
        assert G.rle_box(rle, h, w) == _loop_box(mask), (trial, h, w)


def test_padded_box_is_clamped_at_the_photo_borders():
    assert G.padded_box((10, 20, 30, 60), 100, 100, 0.1) == (8, 16, 32, 64)
    assert G.padded_box((0, 0, 50, 40), 60, 45, 0.5) == (0, 0, 60, 45)       # clamped on all sides
    assert G.padded_box((55, 38, 60, 45), 60, 45, 1.0) == (50, 31, 60, 45)   # bottom-right corner
    assert G.padded_box((5, 5, 9, 9), 60, 45, 0.0) == (5, 5, 9, 9)


@pytest.mark.parametrize("box", [(-1, 0, 5, 5), (0, 0, 61, 5), (10, 10, 5, 20), (3, 3, 3, 9), (1, 1, 1.5, 1.5),
                                 ("a", 0, 1, 1), (0, 0, 1)])
def test_bad_boxes_are_clear_errors_naming_the_option(box):
    with pytest.raises(ConfigError, match="--box"):
        G.check_box(box, 60, 45)


@pytest.mark.parametrize("text", ["1,2,3", "a,b,c,d", "1,2,3,nan", "", "1;2;3;4"])
def test_parse_box_rejects_non_numbers(text):
    with pytest.raises(ConfigError, match="--box"):
        G.parse_box(text)


def test_crop_equals_crop_then_resize_and_batches_equal_singles(tmp_path):
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)
    png = tmp_path / "p.png"
    Image.fromarray(photo).save(png)
    box = (5, 10, 40, 80)
    for mode in ("stretch", "letterbox", "center_crop"):
        want = decode_image(photo[10:80, 5:40], 32, mode)
        assert np.array_equal(G.decode_crop(png, box, 32, mode, padding=0.0), want)
    # padding 0.2 on a 35x70 box: 7 px and 14 px each side, clamped at the top border
    want = decode_image(photo[0:90, 0:47], 24, "stretch")
    assert np.array_equal(G.decode_crop(png, box, 24, "stretch", padding=0.2), want)

    # A big JPEG decoded in draft mode: the batch decoder gives each crop exactly what the single one does.
    jpg = tmp_path / "big.jpg"
    Image.fromarray(np.kron(photo, np.ones((20, 20, 1), np.uint8))).save(jpg, quality=90)
    boxes = [(0, 0, 1400, 1800), (100, 200, 300, 500), (1000, 1000, 1040, 1060)]
    many = G.decode_crops(jpg, boxes, 32, "stretch", 0.1)
    for b, crop in zip(boxes, many):
        assert crop.shape == (32, 32, 3)
        assert np.array_equal(crop, G.decode_crop(jpg, b, 32, "stretch", 0.1))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from imat.data_tools.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("g") / "ds", 12, seed=3, min_side=64, max_side=128,
                           large_fraction=0.0)


def test_instances_one_per_mask_row_parts_left_out_by_default(synthetic):
    ds = read_kaggle(synthetic)
    parts = G.part_category_ids(ds.labels)
    assert {31, 28, 35, 38} <= parts and not parts & set(range(27))   # sleeve, collar, zipper, bow; no garments
    everything = G.garments_of(ds, G.GarmentOptions(keep_parts=True, min_area_fraction=0.0))
    rows = sum(len(r.masks) for r in ds.records)
    assert len(everything.garments) + everything.skipped_empty == rows
    default = G.garments_of(ds)
    assert all(g.category_id not in parts for g in default.garments)
    assert default.skipped_parts == sum(g.category_id in parts for g in everything.garments)
    assert default.skipped_parts > 0
    assert len(default.garments) + default.skipped_parts + default.skipped_small == len(everything.garments)
    # k is the row's position among the photo's rows, whatever was left out
    rec = ds.records[0]
    ks = {g.k: g for g in everything.garments if g.image_id == rec.image_id}
    for k, row in enumerate(rec.masks):
        if k in ks:
            assert ks[k].category_id == row.class_id
            assert ks[k].box == G.rle_box(row.encoded_pixels, rec.height, rec.width)[0]
            assert ks[k].id == f"{rec.image_id}:{k}"


def test_small_masks_are_skipped_and_counted(synthetic):
    ds = read_kaggle(synthetic)
    everything = G.garments_of(ds, G.GarmentOptions(min_area_fraction=0.0))
    cut = float(np.median([g.area / (g.height * g.width) for g in everything.garments]))
    some = G.garments_of(ds, G.GarmentOptions(min_area_fraction=cut))
    assert some.skipped_small == sum(g.area < cut * g.height * g.width for g in everything.garments) > 0
    assert all(g.area >= cut * g.height * g.width for g in some.garments)


def test_real_photo_boxes_match_the_decoded_masks(real_smoke):
    ds = read_kaggle(real_smoke)
    gs = G.garments_of(ds, G.GarmentOptions(keep_parts=True, min_area_fraction=0.0))
    assert len(gs.garments) >= 40
    for g in gs.garments[:6]:
        rec = next(r for r in ds.records if r.image_id == g.image_id)
        mask = rec.masks[g.k].decode(rec.height, rec.width)
        ys, xs = np.nonzero(mask)
        assert g.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert g.area == int(mask.sum())
