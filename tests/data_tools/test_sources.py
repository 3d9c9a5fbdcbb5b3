"""Source folders: kind detection, the image-level reader, merging, multi-source prepare, reader hardening."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from imat.data_tools import sources, tfds_builder
from imat.data_tools.images import decode_image, read_image_size
from imat.data_tools.kaggle import read_kaggle
from imat.data_tools.labels import LabelSpace
from imat.data_tools.pipelines import PreparedSplit
from imat.data_tools.synthetic import write_synthetic
from imat.errors import ConfigError, DataError

KAGGLE_HEADER = "ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds"
SIZE = 32


def make_image_level(root: pathlib.Path, lines: list[str], images=(), size=(5, 4), header="ImageId,ClassIds"):
    """A hand-written image-level folder: labels.csv from `lines`, a small JPEG per name in `images`."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text("\n".join([header, *lines]) + "\n")
    for i, name in enumerate(images):
        Image.new("RGB", size, (10 * i, 200, 30)).save(root / "images" / f"{name}.jpg")
    return root


def make_kaggle(root: pathlib.Path, rows: list[str], images=("img1", "img2"), size=(4, 3)) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "label_descriptions.json").write_text(json.dumps(LabelSpace.default().to_json_dict()))
    (root / "train.csv").write_text("\n".join([KAGGLE_HEADER, *rows]) + "\n")
    (root / "train").mkdir(exist_ok=True)
    for name in images:
        Image.new("RGB", (size[1], size[0]), (200, 10, 10)).save(root / "train" / f"{name}.jpg")
    return root


# ---- kind detection ----------------------------------------------------------------------------------

def test_detect_kind(tmp_path):
    assert sources.detect_kind(make_kaggle(tmp_path / "k", ["img1,1 3,4,3,1,"])) == "kaggle"
    assert sources.detect_kind(make_image_level(tmp_path / "i", ["a,1"], ["a"])) == "image-level"
    (tmp_path / "neither").mkdir()
    with pytest.raises(DataError) as e:
        sources.detect_kind(tmp_path / "neither")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'neither'}: neither train.csv nor labels.csv found")
    assert "ImageId,ClassIds" in msg and "ImageId,EncodedPixels" in msg
    with pytest.raises(DataError, match="not a folder"):
        sources.detect_kind(tmp_path / "absent")


# ---- image-level reader ------------------------------------------------------------------------------

def test_image_level_good_folder(tmp_path):
    root = make_image_level(tmp_path / "i", ["a,0 13 23", "b,  23  4 23 ", "c,"], ["a", "b", "c"])
    ds = sources.read_source(root, strict=True)
    assert isinstance(ds, sources.ImageLevelDataset) and ds.problems == []
    assert [(r.image_id, r.categories) for r in ds.records] == [("a", (0, 13, 23)), ("b", (4, 23)), ("c", ())]
    r = ds.records[0]
    assert r.path == root / "images" / "a.jpg" and r.masks == () and r.attributes == ()
    assert (r.height, r.width) == (None, None)
    assert [u.image_id for u in ds.unlabelled] == ["c"]
    assert not ds.attribute_matrix().any()
    np.testing.assert_array_equal(np.flatnonzero(ds.category_matrix()[1]), [4, 23])
    assert ds.summary().splitlines() == [
        f"{root}: 3 images read (of 3 images, 3 rows in labels.csv); 1 without labels "
        "(kept out of train/validation, for self-supervision)",
        "no problems found"]


def test_image_level_bad_rows_reported_with_line_and_skipped(tmp_path):
    lines = [
        "a,1 2",            # 2: good
        "b,1 46",           # 3: unknown class id
        "c,1 x",            # 4: non-integer
        "a,3",              # 5: duplicate of line 2
        "ghost,5",          # 6: no image
        "../c,1",           # 7: a path, not a name
        "/abs/c,1",         # 8: absolute
        "d,1,2",            # 9: wrong column count
        "c,-1",             # 10: negative id is unknown
        "c,7",              # 11: good (earlier bad rows of c do not make it a duplicate)
    ]
    root = make_image_level(tmp_path / "i", lines, ["a", "b", "c", "d"])
    ds = sources.read_image_level(root)
    file = str(root / "labels.csv")
    assert [(r.image_id, r.categories) for r in ds.records] == [("a", (1, 2)), ("c", (7,))]
    got = [(p.file, p.line, p.kind) for p in ds.problems]
    assert got == [(file, 3, "unknown ClassId"), (file, 4, "non-integer ClassId"), (file, 5, "duplicate ImageId"),
                   (file, 7, "bad ImageId"), (file, 8, "bad ImageId"), (file, 9, "wrong column count"),
                   (file, 10, "unknown ClassId"), (file, 6, "missing image file")]
    assert "46 is not an iMaterialist category id (0..45)" in ds.problems[0].reason
    assert "already labelled at line 2" in ds.problems[2].reason
    assert str(ds.problems[3]).startswith(f"{file}:7: bad ImageId: '../c' is a path")
    summary = ds.summary()
    assert "dropped 8 rows; 8 problems by reason:" in summary
    assert f"  unknown ClassId: 2 (first: {file}:3: unknown ClassId" in summary
    with pytest.raises(DataError, match=r"labels\.csv:3: unknown ClassId"):
        sources.read_image_level(root, strict=True)
    # without the image check, the missing photo is not a problem
    assert [p.kind for p in sources.read_image_level(root, check_images=False).problems].count("missing image file") == 0


def test_image_level_bad_header_and_files(tmp_path):
    root = make_image_level(tmp_path / "h", ["a,1"], ["a"], header="Image,Classes")
    with pytest.raises(DataError, match=r"labels\.csv:1: header .* lacks column\(s\) ImageId, ClassIds"):
        sources.read_image_level(root)
    (root / "labels.csv").write_bytes(b"ImageId,ClassIds\na\xff,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        sources.read_image_level(root)
    (root / "labels.csv").write_text("")
    with pytest.raises(DataError, match="empty file"):
        sources.read_image_level(root)


# ---- reader hardening in the Kaggle reader -----------------------------------------------------------

@pytest.mark.parametrize("image_id", ["../outside/img1", "sub/img1", "..", "/abs/img1", "a\\b"])
def test_kaggle_image_id_that_is_a_path_is_rejected(tmp_path, image_id):
    root = make_kaggle(tmp_path / "k", ["img1,1 3,4,3,1,", f"{image_id},1 3,4,3,1,"])
    # The traversal target exists, so only the name check can stop it.
    (tmp_path / "k" / "outside").mkdir()
    shutil.copy(root / "train" / "img1.jpg", root / "outside" / "img1.jpg")
    ds = read_kaggle(root)
    assert [r.image_id for r in ds.records] == ["img1"]
    assert [(p.line, p.kind) for p in ds.problems] == [(3, "bad ImageId")]
    assert str(ds.problems[0]).startswith(f"{root / 'train.csv'}:3: bad ImageId")
    with pytest.raises(DataError, match=r"train\.csv:3: bad ImageId"):
        read_kaggle(root, strict=True)


def test_kaggle_height_width_mismatch_is_reported(tmp_path):
    # img1 is 4x3 as its rows say; img2's rows say 4x3 but the photo is 6x5
    root = make_kaggle(tmp_path / "k", ["img1,1 3,4,3,1,", "img2,2 2,4,3,33,", "img2,5 2,4,3,6,"], images=("img1",))
    Image.new("RGB", (5, 6)).save(root / "train" / "img2.jpg")
    ds = read_kaggle(root)
    assert [r.image_id for r in ds.records] == ["img1"]
    assert [(p.line, p.kind) for p in ds.problems] == [(3, "wrong Height/Width")]
    assert str(ds.problems[0]).startswith(
        f"{root / 'train.csv'}:3: wrong Height/Width: 4x3 in train.csv but img2.jpg is 6x5 (height x width)")
    assert "dropped 2 rows and 1 images" in ds.summary() and "  wrong Height/Width: 1 (first:" in ds.summary()
    assert len(read_kaggle(root, check_images=False).records) == 2   # only checked where images are
    # A size given as displayed (after EXIF orientation) is accepted: masks follow the displayed image.
    im = Image.new("RGB", (4, 3))            # stored 3 high x 4 wide, displayed rotated: 4 high x 3 wide
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(root / "train" / "img2.jpg", exif=exif)
    assert read_image_size(root / "train" / "img2.jpg") == (3, 4)
    assert read_kaggle(root, strict=True).records[1].image_id == "img2"


# ---- merging and multi-source prepare ---------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_kaggle(tmp_path_factory) -> pathlib.Path:
    return write_synthetic(tmp_path_factory.mktemp("syn") / "kaggle", 20, seed=3, min_side=64, max_side=128,
                           large_fraction=0.0)


@pytest.fixture()
def image_level(tmp_path) -> pathlib.Path:
    lines = [f"x{i:02d},{i % 46} {(i * 7) % 46}" for i in range(10)] + ["blank1,", "blank2,"]
    names = [line.split(",")[0] for line in lines]
    return make_image_level(tmp_path / "extra", lines, names, size=(40, 30))


def test_merge_rejects_duplicate_ids_naming_both_sources(synth_kaggle, tmp_path):
    first_id = read_kaggle(synth_kaggle).records[0].image_id
    other = make_image_level(tmp_path / "other", [f"{first_id},3", "fresh,4"], [first_id, "fresh"])
    with pytest.raises(DataError) as e:
        tfds_builder.prepare([synth_kaggle, other], tmp_path / "out", image_size=SIZE, workers=1)
    msg = str(e.value)
    assert f"duplicate ImageId {first_id!r}" in msg
    assert str(synth_kaggle.resolve() / "train.csv") in msg and str(other.resolve() / "labels.csv") in msg
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="given twice"):
        tfds_builder.prepare([synth_kaggle, synth_kaggle], tmp_path / "out", image_size=SIZE, workers=1)


def test_multi_source_prepare(synth_kaggle, image_level, tmp_path):
    out = tmp_path / "out"
    d = tfds_builder.prepare([synth_kaggle, image_level], out, image_size=SIZE, workers=2, seed=1)
    kaggle_ds = read_kaggle(synth_kaggle)
    extra_ds = sources.read_image_level(image_level)
    labelled = [r for r in kaggle_ds.records + extra_ds.records if r.categories]
    assert len(labelled) == 30
    # Each source is split on its own, so its held-out photos are the same as when prepared alone.
    parts = [tfds_builder.split_ids([r.image_id for r in ds.records if r.categories], 1, 0.2)
             for ds in (kaggle_ds, extra_ds)]
    train_ids = sorted(parts[0][0] + parts[1][0])
    val_ids = sorted(parts[0][1] + parts[1][1])
    train, val = PreparedSplit.open(d, "train"), PreparedSplit.open(d, "validation")
    unl = PreparedSplit.open(d, "unlabelled")
    assert (train.image_ids, val.image_ids) == (train_ids, val_ids) and len(train) + len(val) == 30
    alone = tfds_builder.prepare(synth_kaggle, tmp_path / "alone", image_size=SIZE, workers=1, seed=1)
    assert set(PreparedSplit.open(alone, "validation").image_ids) <= set(val_ids)
    assert unl.image_ids == ["blank1", "blank2"] and not unl.categories.any() and not unl.attributes.any()
    by_id = {r.image_id: r for r in kaggle_ds.records + extra_ds.records}
    labels = LabelSpace.default()
    for split in (train, val, unl):
        images = split.images(np.arange(len(split)))
        for i, image_id in enumerate(split.image_ids):
            rec = by_id[image_id]
            np.testing.assert_array_equal(split.categories[i], labels.categories_to_multihot(rec.categories))
            np.testing.assert_array_equal(split.attributes[i], labels.attributes_to_multihot(rec.attributes))
            w, h = read_image_size(rec.path)
            assert (split.heights[i], split.widths[i]) == (h, w)
            np.testing.assert_array_equal(images[i], decode_image(rec.path, SIZE))
    assert any(rec.attributes for rec in kaggle_ds.records)   # the Kaggle attributes really travelled
    manifest = json.loads((d / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["splits"] == {"train": len(train_ids), "validation": len(val_ids), "unlabelled": 2}
    assert "source_root" not in manifest
    got = {e["path"]: (e["kind"], e["images"], e["labelled"], e["unlabelled"], e["problems"])
           for e in manifest["sources"]}
    assert got == {str(synth_kaggle.resolve()): ("kaggle", 20, 20, 0, 0),
                   str(image_level.resolve()): ("image-level", 12, 10, 2, 0)}
    # Same sources in another order: already prepared. A changed source: rebuilt.
    mtime = (d / tfds_builder.MANIFEST_NAME).stat().st_mtime_ns
    assert tfds_builder.prepare([image_level, synth_kaggle], out, image_size=SIZE, workers=1, seed=1) == d
    assert (d / tfds_builder.MANIFEST_NAME).stat().st_mtime_ns == mtime
    with open(image_level / "labels.csv", "a") as f:
        f.write("x00b,5\n")
    shutil.copy(image_level / "images" / "x00.jpg", image_level / "images" / "x00b.jpg")
    tfds_builder.prepare([synth_kaggle, image_level], out, image_size=SIZE, workers=1, seed=1)
    splits = json.loads((d / tfds_builder.MANIFEST_NAME).read_text())["splits"]
    assert splits["train"] + splits["validation"] == 31 and "x00b" in PreparedSplit.open(d, "train").image_ids \
        + PreparedSplit.open(d, "validation").image_ids


def test_only_image_level_source_without_unlabelled_photos(tmp_path):
    root = make_image_level(tmp_path / "i", ["a,1", "b,2", "c,3", "d,4", "e,5"], "abcde")
    d = tfds_builder.prepare(root, tmp_path / "out", image_size=SIZE, workers=1)
    manifest = json.loads((d / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["splits"] == {"train": 4, "validation": 1}      # no unlabelled split when none
    assert manifest["source_root"] == str(root.resolve())
    assert [e["kind"] for e in manifest["sources"]] == ["image-level"]


def test_all_unlabelled_is_an_error(tmp_path):
    root = make_image_level(tmp_path / "i", ["a,", "b,"], "ab")
    with pytest.raises(DataError, match="no usable labelled image"):
        tfds_builder.prepare(root, tmp_path / "out", image_size=SIZE, workers=1)


# ---- the real image-level folder ------------------------------------------------------------------------

def test_ccp_extra_in_place(shared_data):
    extra = shared_data / "ccp-extra"
    if not extra.is_dir():
        pytest.skip(f"real data not available: {extra} is absent")
    ds = sources.read_source(extra, strict=True)
    assert sources.detect_kind(extra) == "image-level" and len(ds.records) == 1094 and ds.problems == []
    assert len(ds.unlabelled) == 1
    assert all(r.path.parent == extra / "images" and r.path.is_file() for r in ds.records[:50])
    cats = ds.category_matrix()
    assert cats.shape == (1094, 46) and cats.sum(1).min() == 0 and cats.sum(1).max() > 1
    dev = shared_data / "ccp-dev"
    if dev.is_dir():   # the two are meant to be merged: no ImageId in both
        merged = sources.merge_sources([sources.read_source(dev), ds])
        assert len(merged.labelled) == 500 + 1093 and len(merged.unlabelled) == 1
