"""Dataset statistics and the HTML report: numbers checked against the reader and plain loops."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imat.data_tools import eda
from imat.data_tools.kaggle import read_kaggle
from imat.data_tools.synthetic import write_synthetic

PNGS = ("category_frequency.png", "attribute_frequency.png", "categories_per_image.png",
        "image_sizes.png", "cooccurrence.png", "examples.png")


@pytest.fixture(scope="module")
def synth_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("eda_synth")
    write_synthetic(root, 30, seed=4, min_side=160, max_side=360, large_fraction=0.07, large_side=2200)
    return read_kaggle(root, strict=True)


def _check_stats_against_reader(ds, stats):
    cm = ds.category_matrix()
    am = ds.attribute_matrix()
    n = len(ds.records)
    assert stats["images"] == n
    assert stats["mask_rows"] == sum(len(r.masks) for r in ds.records)
    assert [c["images"] for c in stats["categories"]] == cm.sum(0).astype(int).tolist()
    assert sum(c["instances"] for c in stats["categories"]) == stats["mask_rows"]
    for c in stats["categories"]:  # instances: a plain count over rows
        assert c["instances"] == sum(m.class_id == c["id"] for r in ds.records for m in r.masks)
        assert c["name"] == ds.labels.category_names[ds.labels.category_ids.index(c["id"])]
    assert stats["attributes_used"] + stats["attributes_unused"] == ds.labels.num_attributes
    assert stats["attributes_used"] == len({a for r in ds.records for m in r.masks for a in m.attribute_ids})
    top = stats["attributes_top"]
    assert [a["rows"] for a in top] == sorted((a["rows"] for a in top), reverse=True)
    for a in top:
        assert a["images"] == int(am[:, ds.labels.attribute_index(a["id"])].sum())
    hist = stats["categories_per_image"]["histogram"]
    assert sum(hist.values()) == n
    for k, v in hist.items():
        assert v == int((cm.sum(1) == int(k)).sum())
    assert sum(stats["attributes_per_image"]["histogram"].values()) == n
    # Co-occurrence against a plain loop over images.
    m = np.array(stats["cooccurrence"]["matrix"])
    assert m.shape == (46, 46)
    ref = np.zeros((46, 46), int)
    for r in ds.records:
        for a in r.categories:
            for b in r.categories:
                ref[a, b] += 1
    np.testing.assert_array_equal(m, ref)
    assert stats["problems"]["count"] == len(ds.problems)
    json.dumps(stats)  # JSON-able


def _check_report(out, report):
    assert report == out / "report.html"
    text = report.read_text()
    for name in PNGS:
        path = out / name
        assert path.stat().st_size > 2000, name
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) > 100
        assert f'src="{name}"' in text
    assert 'href="stats.json"' in text
    assert "<table>" in text and text.count("<tr>") >= 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_stats_match_reader_on_synthetic(synth_ds):
    stats = eda.compute_stats(synth_ds)
    _check_stats_against_reader(synth_ds, stats)
    assert stats["problems"]["count"] == 0
    sizes = stats["image_sizes"]
    large = {r.image_id for r in synth_ds.records if max(r.height, r.width) > 2000}
    assert len(large) == 2
    assert large <= set(sizes["outlier_ids"])  # very large images are flagged
    assert sizes["larger_than_2000"] == 2
    assert sizes["portrait"] + sizes["landscape"] + sizes["square"] == stats["images"]
    assert stats["rows_without_attributes"] > 0


def test_report_on_synthetic(synth_ds, tmp_path):
    report = eda.write_report(synth_ds, tmp_path / "rep", examples=4, seed=1)
    _check_report(tmp_path / "rep", report)
    saved = json.loads((tmp_path / "rep" / "stats.json").read_text())
    assert saved == json.loads(json.dumps(eda.compute_stats(synth_ds)))
    # Most frequent category named in the table.
    top = max(saved["categories"], key=lambda c: c["images"])
    assert f"<td>{top['name']}</td>" in report.read_text()


def test_format_summary(synth_ds):
    stats = eda.compute_stats(synth_ds)
    text = eda.format_summary(stats)
    lines = text.splitlines()
    assert 10 <= len(lines) <= 60
    assert f"{stats['images']} labelled images, {stats['mask_rows']} mask rows" in text
    top = max(stats["categories"], key=lambda c: (c["images"], -c["id"]))
    assert re.search(rf"{top['id']}\s+{re.escape(top['name'][:34])}\s+{top['images']}\b", text)
    assert "size outliers: 2" in text


def test_size_outliers_rule():
    w = np.array([500, 510, 520, 505, 515, 500, 5000, 1900, 480, 500])
    h = np.array([700, 710, 720, 705, 100, 700, 700, 2100, 700, 640])
    out = eda.size_outliers(w, h)
    # Slow reference: beyond the quartiles by max(3 IQR, 25% of the median), or a side above 2000.
    ref = []
    for i in range(len(w)):
        flag = max(w[i], h[i]) > 2000
        for v in (w, h):
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            margin = max(3 * (q3 - q1), 0.25 * med)
            flag |= v[i] < q1 - margin or v[i] > q3 + margin
        ref.append(bool(flag))
    assert out.tolist() == ref
    # 480 wide and 640 high are a few IQR off a near-constant size, but not far: not flagged.
    assert out.tolist() == [False, False, False, False, True, False, True, True, False, False]


def test_empty_dataset_stats(tmp_path):
    write_synthetic(tmp_path, 1, seed=0, min_side=64, max_side=64, large_fraction=0)
    ds = read_kaggle(tmp_path)
    ds.records = []
    stats = eda.compute_stats(ds)
    assert stats["images"] == 0 and stats["mask_rows"] == 0
    assert "0 labelled images" in eda.format_summary(stats)
    _check_report(tmp_path / "rep", eda.write_report(ds, tmp_path / "rep"))


def test_import_does_not_load_pyplot():
    code = ("import sys, imat.data_tools.eda\n"
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported at import time'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_on_real_smoke(real_smoke, tmp_path):
    ds = read_kaggle(real_smoke)
    stats = eda.compute_stats(ds)
    _check_stats_against_reader(ds, stats)
    assert stats["images"] == 13
    # The 6000x4000 photos are flagged as very large.
    big = {r.image_id for r in ds.records if max(r.height, r.width) > 2000}
    assert big and big <= set(stats["image_sizes"]["outlier_ids"])
    report = eda.write_report(ds, tmp_path, examples=6)
    _check_report(tmp_path, report)
    # Plotted at display size, never at full resolution.
    with Image.open(tmp_path / "examples.png") as im:
        assert max(im.size) < 2500


def test_image_level_stats_and_report(tmp_path):
    from imat.data_tools.sources import read_image_level

    root = tmp_path / "il"
    (root / "images").mkdir(parents=True)
    rows = {"a": "0 23", "b": "23", "c": "", "d": "4 23 33"}
    (root / "labels.csv").write_text("ImageId,ClassIds\n" + "".join(f"{k},{v}\n" for k, v in rows.items()))
    sizes = {"a": (60, 90), "b": (80, 80), "c": (90, 60), "d": (61, 91)}   # (width, height)
    for name, size in sizes.items():
        Image.new("RGB", size, (30, 60, 90)).save(root / "images" / f"{name}.jpg")
    ds = read_image_level(root, strict=True)
    stats = eda.compute_stats(ds)
    _check_stats_against_reader(ds, stats)
    assert (stats["kind"], stats["has_masks"], stats["unlabelled"], stats["mask_rows"]) == ("image-level", False, 1, 0)
    assert {c["id"]: c["images"] for c in stats["categories"] if c["images"]} == {0: 1, 4: 1, 23: 3, 33: 1}
    # Sizes come from the image headers (labels.csv gives none).
    sz = stats["image_sizes"]
    assert (sz["known"], sz["portrait"], sz["landscape"], sz["square"]) == (4, 2, 1, 1)
    assert (sz["width"]["min"], sz["width"]["max"], sz["height"]["max"]) == (60, 90, 91)
    text = eda.format_summary(stats)
    assert text.splitlines()[:2] == [f"dataset: {root} (image-level labels: no masks, no attributes)",
                                     "  4 images, 1 without labels (4 images / 4 rows in labels.csv; 0 problems)"]
    assert "attributes used" not in text and "mask rows" not in text
    out = tmp_path / "rep"
    report = eda.write_report(ds, out)
    html_text = report.read_text()
    assert {p.name for p in out.glob("*.png")} == set(PNGS) - set(eda.MASK_PLOTS)
    assert all(f'src="{name}"' not in html_text for name in eda.MASK_PLOTS)
    assert "No attribute or mask-example plots: this is an image-level source (labels.csv)" in html_text
