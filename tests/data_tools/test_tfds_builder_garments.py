"""prepare(..., garments=True): one example per garment, same TFDS layout, split by parent photo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.data_tools import garments as G
from imat.data_tools import tfds_builder
from imat.data_tools.kaggle import read_kaggle
from imat.data_tools.prepared import PreparedSplit
from imat.data_tools.synthetic import write_synthetic
from imat.errors import ConfigError

SIZE = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "kaggle", 16, seed=2, min_side=64, max_side=160,
                           large_fraction=0.0)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prep")


@pytest.fixture(scope="module")
def prepared(root, out_dir):
    return tfds_builder.prepare(root, out_dir, image_size=SIZE, workers=2, garments=True, val_fraction=0.25)


def test_one_example_per_garment_with_its_crop_and_labels(root, prepared):
    manifest = json.loads((prepared / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["garments"] is True and manifest["garment_padding"] == G.DEFAULT_PADDING
    assert prepared.parent.name == f"s{SIZE}_stretch_garments"
    ds = read_kaggle(root)
    want = {g.id: g for g in G.garments_of(ds).garments}
    seen = {}
    for split in ("train", "validation"):
        sp = PreparedSplit.open(prepared, split)
        assert sp.garments and sp.garment_padding == G.DEFAULT_PADDING
        assert sp.categories.shape[1] == 46 and sp.attributes.shape[1] == 294
        assert (sp.categories.sum(1) == 1).all()             # one-hot: the garment's category
        images = sp.images(np.arange(sp.num_examples))
        for i, gid in enumerate(sp.image_ids):
            g = want[gid]
            assert sp.categories[i].argmax() == g.category_id
            assert set(np.flatnonzero(sp.attributes[i])) == {ds.labels.attribute_index(a) for a in g.attribute_ids}
            np.testing.assert_array_equal(images[i], G.decode_crop(g.path, g.box, SIZE, "stretch", G.DEFAULT_PADDING))
            seen[gid] = split
    assert set(seen) == set(want)
    assert manifest["splits"] == {"train": sum(s == "train" for s in seen.values()),
                                  "validation": sum(s == "validation" for s in seen.values())}
    assert manifest["garment_counts"]["skipped_part_masks"] > 0


def test_split_by_parent_photo_and_same_photo_split_as_whole_photo_prepare(root, prepared):
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(prepared))
    photo_split = {}
    for split in ("train", "validation"):
        source = builder.as_data_source(split=split)
        for ex in source.__getitems__(list(range(len(source)))):
            parent = ex["parent_image_id"].decode() if isinstance(ex["parent_image_id"], bytes) else ex["parent_image_id"]
            gid = ex["image_id"].decode() if isinstance(ex["image_id"], bytes) else ex["image_id"]
            assert gid == f"{parent}:{int(ex['garment_k'])}"
            assert photo_split.setdefault(parent, split) == split, f"{parent} has garments in both splits"
    assert set(photo_split.values()) == {"train", "validation"}
    ids = [r.image_id for r in read_kaggle(root).records]
    train_ids, val_ids = tfds_builder.split_ids(ids, 0, 0.25)
    assert {p for p, s in photo_split.items() if s == "validation"} <= set(val_ids)
    assert {p for p, s in photo_split.items() if s == "train"} <= set(train_ids)


def test_rerun_is_a_no_op_and_options_rebuild(root, out_dir, prepared):
    mtime = (prepared / tfds_builder.MANIFEST_NAME).stat().st_mtime_ns
    again = tfds_builder.prepare(root, out_dir, image_size=SIZE, workers=2, garments=True, val_fraction=0.25)
    assert again == prepared and (prepared / tfds_builder.MANIFEST_NAME).stat().st_mtime_ns == mtime
    with_parts = tfds_builder.prepare(root, out_dir, image_size=SIZE, workers=1, garments=True, val_fraction=0.25,
                                      garment_options=G.GarmentOptions(keep_parts=True))
    manifest = json.loads((with_parts / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["garment_keep_parts"] is True and manifest["garment_counts"]["skipped_part_masks"] == 0


def test_cli_garment_options_need_garments(root, tmp_path):
    from imat.cli.main import main

    assert main(["data", "prepare", str(root), "--out", str(tmp_path / "o"), "--keep-parts"]) != 0


def test_garment_options_are_checked():
    with pytest.raises(ConfigError, match="--crop-padding"):
        G.GarmentOptions(padding=-1)
