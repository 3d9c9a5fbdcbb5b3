"""Synthetic Kaggle-layout dataset: exact format, determinism, masks that match the pixels, learnable labels."""

from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest
from PIL import Image

from imat.data_tools.kaggle import read_kaggle, rle_decode, rle_encode
from imat.data_tools.labels import LabelSpace
from imat.data_tools.synthetic import (
    CO_OCCURRENCE_TEMPLATES, DECORATIONS, category_style, image_id_for, write_synthetic,
)
from imat.errors import ConfigError

HEADER = "ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds"
SMALL = dict(min_side=160, max_side=400, large_side=2048)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """40 small images, 2 of them large (long side 2048)."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, 40, seed=3, **SMALL)
    return root


@pytest.fixture(scope="module")
def synth_ds(synth):
    return read_kaggle(synth, strict=True)


def test_layout_and_header(synth, synth_ds):
    lines = (synth / "train.csv").read_text().splitlines()
    assert lines[0] == HEADER
    assert json.loads((synth / "label_descriptions.json").read_text()) == LabelSpace.default().to_json_dict()
    assert LabelSpace.from_json(synth / "label_descriptions.json") == LabelSpace.default()
    jpgs = sorted(p.stem for p in (synth / "train").iterdir())
    assert len(jpgs) == 40 and all(re.fullmatch(r"[0-9a-f]{32}", j) for j in jpgs)
    assert sorted(r.image_id for r in synth_ds.records) == jpgs
    assert jpgs == sorted(image_id_for(3, i) for i in range(40))
    # No temp files left behind by the atomic writes.
    assert not [p for p in synth.rglob("*") if p.name.endswith(".tmp")]


def test_reads_back_without_problems(synth_ds):
    assert synth_ds.problems == []
    assert len(synth_ds.records) == 40
    rows = [m for r in synth_ds.records for m in r.masks]
    assert len(rows) == synth_ds.num_rows_read
    # Attribute ids valid (the strict reader checked), some rows with none and some with several.
    assert any(not m.attribute_ids for m in rows)
    assert any(len(m.attribute_ids) >= 2 for m in rows)
    # Several categories per image.
    assert np.mean([len(r.categories) for r in synth_ds.records]) >= 4


def test_rows_sorted_and_sizes_match_images(synth_ds):
    ids = [r.image_id for r in synth_ds.records]
    assert ids == sorted(ids)  # train.csv is sorted by ImageId, like Kaggle's
    for r in synth_ds.records:
        with Image.open(r.path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (r.width, r.height)


def test_sizes_vary_portrait_dominant_and_large(synth_ds):
    hw = np.array([(r.height, r.width) for r in synth_ds.records])
    big = hw.max(axis=1) > 2000
    assert big.sum() == 2  # round(40 * 0.05)
    assert (hw.max(axis=1)[big] == 2048).all()
    small = hw[~big]
    assert small.min() >= 160 and small.max() <= 400
    assert (small[:, 0] > small[:, 1]).mean() > 0.5  # portrait-dominant
    assert len({tuple(x) for x in hw}) > 30
    assert len({round(h / w, 1) for h, w in hw}) >= 5  # varied aspect ratios


def test_large_fraction_forces_large_images(tmp_path):
    write_synthetic(tmp_path, 2, seed=0, large_fraction=1.0, large_side=2100)
    ds = read_kaggle(tmp_path, strict=True)
    assert all(max(r.height, r.width) == 2100 for r in ds.records)


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 5), (b, 5), (c, 6)):
        write_synthetic(out, 6, seed=seed, min_side=96, max_side=200, large_fraction=0)
    assert (a / "train.csv").read_bytes() == (b / "train.csv").read_bytes()
    names = sorted(p.name for p in (a / "train").iterdir())
    assert names == sorted(p.name for p in (b / "train").iterdir())
    for n in names:
        assert (a / "train" / n).read_bytes() == (b / "train" / n).read_bytes()
    assert (a / "train.csv").read_bytes() != (c / "train.csv").read_bytes()
    assert not set(names) & {p.name for p in (c / "train").iterdir()}


def test_masks_disjoint_nonempty_and_roundtrip(synth_ds):
    for r in synth_ds.records:
        total = np.zeros((r.height, r.width), np.int32)
        for m in r.masks:
            mask = rle_decode(m.encoded_pixels, r.height, r.width)
            assert mask.sum() > 0
            assert rle_encode(mask) == m.encoded_pixels
            total += mask
        # Visible pixels only: each pixel belongs to at most one instance.
        assert total.max() <= 1
        assert 0.05 < total.mean() < 0.9  # the figure covers part of the image, not all of it


def _colour_distance(pixels: np.ndarray, cid: int) -> np.ndarray:
    """Per pixel, the distance to the nearer of the category's two colours."""
    st = category_style(cid)
    d1 = np.linalg.norm(pixels - np.array(st.rgb, float), axis=1)
    d2 = np.linalg.norm(pixels - np.array(st.rgb2, float), axis=1)
    return np.minimum(d1, d2)


def _colour_match(pixels: np.ndarray, cid: int, tol: float = 50.0) -> float:
    return float((_colour_distance(pixels, cid) < tol).mean())


def test_mask_pixels_have_their_category_colour(synth_ds):
    matches, best_is_true = [], []
    for r in synth_ds.records:
        img = np.asarray(Image.open(r.path).convert("RGB"), np.float64)
        for m in r.masks:
            mask = rle_decode(m.encoded_pixels, r.height, r.width).astype(bool)
            if mask.sum() < 1000:  # small parts are mostly anti-aliased edge
                continue
            px = img[mask]
            if len(px) > 4000:
                px = px[:: len(px) // 4000]
            matches.append(_colour_match(px, m.class_id))
            scores = [np.median(_colour_distance(px, c)) for c in range(46)]
            best_is_true.append(int(np.argmin(scores)) == m.class_id)
    assert len(matches) > 50
    assert min(matches) > 0.6 and np.mean(matches) > 0.85
    # The drawn colours identify the category among all 46.
    assert np.mean(best_is_true) > 0.9


def test_category_styles_distinct():
    styles = [category_style(c) for c in range(46)]
    assert len({s.rgb for s in styles}) == 46
    assert {s.texture for s in styles} == {"solid", "stripes", "dots", "checks"}
    assert category_style(7) == category_style(7)  # pure function of the id
    # Frequent garments never share both colour and texture.
    frequent = list(range(13)) + [21, 23, 24, 31, 33]
    for i, a in enumerate(frequent):
        for b in frequent[i + 1:]:
            sa, sb = styles[a], styles[b]
            dist = np.linalg.norm(np.subtract(sa.rgb, sb.rgb))
            assert dist > 60 or sa.texture != sb.texture or sa.shape != sb.shape, (a, b)


def test_cooccurrence_templates_hold(tmp_path):
    write_synthetic(tmp_path, 80, seed=11, min_side=96, max_side=160, large_fraction=0)
    ds = read_kaggle(tmp_path, strict=True)
    cats = [set(r.categories) for r in ds.records]
    assert all(23 in c for c in cats)  # every outfit template has shoes
    with_dress = [c for c in cats if 10 in c]
    assert with_dress and all(33 in c for c in with_dress)  # dress -> neckline
    for c in cats:
        if 29 in c:  # lapels only on jackets, cardigans and coats
            assert c & {3, 4, 9}
        if 31 in c:  # sleeves only with a torso garment
            assert c & set(range(0, 6)) | c & {9, 10, 11, 12}
        if 34 in c:  # buckle rides on a belt
            assert 19 in c
        if 16 in c:  # ties only in suits
            assert {4, 0, 6} <= c
        # Every image is explained by one template: its required categories are present, and
        # nothing appears that the template cannot produce.
        fits = [t for t in CO_OCCURRENCE_TEMPLATES if t.required <= c and c <= t.possible]
        assert fits, sorted(c)
    # Shoes come in pairs (two instances) in most images.
    shoe_rows = collections.Counter(r.image_id for r in ds.records for m in r.masks if m.class_id == 23)
    assert np.mean([v == 2 for v in shoe_rows.values()]) > 0.8
    # Every template shows up, and decorations occur.
    assert sum(bool(c & set(DECORATIONS)) for c in cats) >= 5
    assert {t.name for t in CO_OCCURRENCE_TEMPLATES if any(t.required <= c and c <= t.possible for c in cats)} \
        == {t.name for t in CO_OCCURRENCE_TEMPLATES}


def _features(path) -> np.ndarray:
    """A 4x4x4 colour histogram (normalised) and 8x8 downsampled pixels of a 32x32 thumbnail."""
    im = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR))
    q = (im // 64).reshape(-1, 3)
    hist = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64) / q.shape[0]
    small = im.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).ravel() / 255.0
    return np.concatenate([hist * 8, small])


def test_labels_learnable_by_a_trivial_classifier(tmp_path):
    write_synthetic(tmp_path, 160, seed=21, min_side=96, max_side=160, large_fraction=0)
    ds = read_kaggle(tmp_path, strict=True)
    x = np.stack([_features(r.path) for r in ds.records])
    y_all = ds.category_matrix()
    # Standardise, then logistic regression by plain gradient descent (numpy, a second at most).
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    n_train = 110
    freq = y_all[:n_train].mean(0)
    # The garments (and bags: large objects) whose presence varies most (not shoes: always there).
    balance = np.where(np.isin(np.arange(46), list(range(13)) + [24]), np.minimum(freq, 1 - freq), -1)
    targets = [int(c) for c in np.argsort(-balance)[:3]]
    assert min(freq[targets]) > 0.15
    for c in targets:
        y = y_all[:, c]
        w = np.zeros(x.shape[1])
        for _ in range(300):
            p = 1 / (1 + np.exp(-x[:n_train] @ w))
            w -= 0.5 * (x[:n_train].T @ (p - y[:n_train]) / n_train + 1e-3 * w)
        pred = (x[n_train:] @ w) > 0
        truth = y[n_train:] > 0.5
        tpr = (pred & truth).sum() / max(truth.sum(), 1)
        tnr = (~pred & ~truth).sum() / max((~truth).sum(), 1)
        balanced = (tpr + tnr) / 2
        assert balanced > 0.8, (ds.labels.category_names[c], balanced)


@pytest.mark.parametrize("kwargs", [dict(num_images=0), dict(min_side=500, max_side=100),
                                    dict(large_fraction=1.5), dict(quality=0)])
def test_bad_options_raise_config_error(tmp_path, kwargs):
    args = dict(num_images=2)
    args.update(kwargs)
    with pytest.raises(ConfigError):
        write_synthetic(tmp_path, **args)
