"""Batch sources over a prepared dataset: determinism, sharding, triplet rules, rotation, augmentation."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from imat.data_tools import tfds_builder
from imat.data_tools.pipelines import PreparedSplit, ShardGroup, augment_batch, find_dataset_dir, make_pipeline
from imat.data_tools.synthetic import write_synthetic
from imat.errors import ConfigError, DataError
from imat.relevance import Relevance, jaccard, relevance_masks

SIZE = 32
KINDS = [("classification", "online"), ("triplet", "online"), ("triplet", "offline"), ("rotation", "online")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    root = write_synthetic(tmp_path_factory.mktemp("syn") / "kaggle", 48, seed=1, min_side=96, max_side=200,
                           large_fraction=0.0)
    return tfds_builder.prepare(root, tmp_path_factory.mktemp("prep"), image_size=SIZE, workers=2)


@pytest.fixture(scope="module")
def train(data_dir) -> PreparedSplit:
    return PreparedSplit.open(data_dir, "train")


def _in_memory_split(labels: np.ndarray, seed: int = 0) -> PreparedSplit:
    """A real PreparedSplit over in-memory data, to control the label matrix exactly."""
    n = len(labels)
    images = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return PreparedSplit(data_dir=pathlib.Path("."), split="train", image_ids=[f"{i:03d}" for i in range(n)],
                         categories=labels.astype(np.float32), attributes=np.zeros((n, 294), np.float32),
                         heights=np.full(n, 8, np.int32), widths=np.full(n, 8, np.int32), image_size=8,
                         resize_mode="stretch", _cache=images)


def _random_labels(n, seed, density=0.08):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, 46)) < density).astype(np.float32)
    labels[rng.integers(0, n, 4)] = 0
    return labels


def _outfit_labels(n, seed, templates=6):
    """Street-photo-like labels: each image wears one of a few outfits (3 categories), plus maybe one more."""
    rng = np.random.default_rng(seed)
    outfits = [rng.choice(46, 3, replace=False) for _ in range(templates)]
    labels = np.zeros((n, 46), np.float32)
    for i in range(n):
        labels[i, outfits[rng.integers(templates)]] = 1
        if rng.random() < 0.3:
            labels[i, rng.integers(46)] = 1
    return labels


def _equal_batches(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_open_cached_and_lazy_agree(data_dir, train):
    lazy = PreparedSplit.open(data_dir, "train", cache=False)
    assert train.cached and not lazy.cached
    assert lazy.image_ids == train.image_ids and train.num_examples == 38 == len(train)
    idx = [5, 0, 5, 37]
    assert np.array_equal(lazy.images(idx), train.images(idx))
    assert train.images(idx).dtype == np.uint8 and train.images(idx).shape == (4, SIZE, SIZE, 3)
    # The parent out_dir works too when it holds a single prepared dataset.
    assert find_dataset_dir(data_dir.parents[2]) == data_dir


def test_open_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="no split 'nope'"):
        PreparedSplit.open(data_dir, "nope")
    with pytest.raises(DataError, match="no prepared dataset"):
        PreparedSplit.open(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        PreparedSplit.open(tmp_path / "missing")


@pytest.mark.parametrize("kind,mining", KINDS)
def test_batch_is_deterministic_and_iterate_matches(train, kind, mining):
    make = lambda seed: make_pipeline(kind, train, batch_size=6, seed=seed, mining=mining, augment=True)
    src, again, other = make(3), make(3), make(4)
    steps = list(range(src.steps_per_epoch - 2, src.steps_per_epoch + 3))   # crosses an epoch boundary
    for s in reversed(steps):   # any order: batch(step) depends on nothing but (seed, step)
        assert _equal_batches(src.batch(s), again.batch(s))
    assert not all(_equal_batches(src.batch(s), other.batch(s)) for s in steps)
    got = list(src.iterate(steps[0], len(steps), prefetch_depth=2))
    assert len(got) == len(steps)
    assert all(_equal_batches(g, src.batch(s)) for g, s in zip(got, steps))
    assert all(_equal_batches(g, src.batch(s)) for g, s in zip(src.iterate(0, 3, prefetch_depth=0), range(3)))
    b = got[0]
    assert b["images"].dtype == np.uint8 and b["images"].shape[1:] == (SIZE, SIZE, 3)
    assert b["categories"].dtype == np.float32 and b["categories"].shape == (len(b["images"]), 46)
    factor = {"classification": 1, "triplet": 3 if mining == "offline" else 1, "rotation": 4}[kind]
    assert len(b["images"]) == 6 * factor


def test_iterate_can_stop_early(train):
    src = make_pipeline("classification", train, batch_size=4, seed=0)
    it = src.iterate(0, None, prefetch_depth=3)
    first = [next(it) for _ in range(2)]
    it.close()   # stops the prefetch thread
    assert _equal_batches(first[1], src.batch(1))


def test_classification_epoch_covers_each_image_once(train):
    src = make_pipeline("classification", train, batch_size=5, seed=7)
    assert src.steps_per_epoch == 38 // 5
    rows = np.concatenate([src.batch_indices(s) for s in range(src.steps_per_epoch)])
    assert len(set(rows.tolist())) == len(rows) == 35
    b = src.batch(2)
    assert np.array_equal(b["images"], train.images(src.batch_indices(2)))
    assert np.array_equal(b["categories"], train.categories[src.batch_indices(2)])
    next_epoch = np.concatenate([src.batch_indices(s) for s in range(src.steps_per_epoch, 2 * src.steps_per_epoch)])
    assert not np.array_equal(rows, next_epoch)


@pytest.mark.parametrize("kind,mining", KINDS)
def test_shards_are_disjoint(kind, mining):
    split = _in_memory_split(_outfit_labels(120, seed=2))
    shards = [make_pipeline(kind, split, batch_size=4, seed=1, mining=mining, shard_index=i, num_shards=3)
              for i in range(3)]
    sets = [set(s.indices.tolist()) for s in shards]
    assert all(len(x) == 40 for x in sets)
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert len({s.steps_per_epoch for s in shards}) == 1
    for s, own in zip(shards, sets):
        used = np.concatenate([s.batch_indices(k) for k in range(2 * s.steps_per_epoch)])
        assert set(used.tolist()) <= own
    with pytest.raises(ConfigError, match="shard_index"):
        make_pipeline(kind, split, batch_size=4, seed=1, mining=mining, shard_index=3, num_shards=3)


@pytest.mark.parametrize("kind,mining", KINDS)
def test_shard_group_is_its_shards_end_to_end(kind, mining):
    # One process reading shards 1 and 2 of 4 supplies rows [b, 3b) of the global batch, whatever
    # the number of processes: the group's batch is its shards' batches end to end.
    split = _in_memory_split(_outfit_labels(120, seed=2))
    shards = [make_pipeline(kind, split, batch_size=4, seed=1, mining=mining, shard_index=i, num_shards=4)
              for i in (1, 2)]
    group = ShardGroup(shards)
    assert group.batch_size == 8 and group.steps_per_epoch == min(s.steps_per_epoch for s in shards)
    for step in (0, group.steps_per_epoch + 1):
        batch, parts = group.batch(step), [s.batch(step) for s in shards]
        assert set(batch) == set(parts[0])
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([p[key] for p in parts]))
        np.testing.assert_array_equal(group.batch_indices(step), np.concatenate([s.batch_indices(step) for s in shards]))
    first = next(iter(group.iterate(3, 1)))
    np.testing.assert_array_equal(first["images"], group.batch(3)["images"])


@pytest.mark.parametrize("batch_size,threshold", [(8, 0.5), (7, 0.5), (8, 0.3)])
def test_online_triplet_every_anchor_has_a_positive_the_loss_accepts(batch_size, threshold):
    labels = _outfit_labels(200, seed=5)
    labels[:4] = 0                       # unlabelled: relevant to nobody, never anchors
    split = _in_memory_split(labels)
    relevance = Relevance(threshold, 0.1)
    src = make_pipeline("triplet", split, batch_size=batch_size, seed=0, mining="online", relevance=relevance)
    anchors_seen = []
    for step in range(src.steps_per_epoch + 5):
        rows = src.batch_indices(step)
        b = src.batch(step)
        assert len(rows) == batch_size and np.array_equal(b["categories"], labels[rows])
        # The loss's own masks (imat.relevance, as the jitted loss computes them):
        pos, _ = relevance.masks(b["categories"])
        assert pos[: batch_size // 2].any(axis=1).all(), f"step {step}: an anchor without a positive the loss accepts"
        assert len(set(rows.tolist())) == batch_size        # plenty of images: no repeats
        if step < src.steps_per_epoch:
            anchors_seen += rows[: batch_size // 2].tolist()
    # An epoch uses every usable image once as an anchor.
    assert len(anchors_seen) == len(set(anchors_seen))
    full_pos, _ = relevance_masks(labels, threshold, 0.1)
    usable = np.flatnonzero(full_pos.any(axis=1))
    assert set(anchors_seen) <= set(usable.tolist())
    assert len(anchors_seen) == (len(usable) // (batch_size // 2)) * (batch_size // 2)


def test_offline_triplet_rules_hold():
    rng = np.random.default_rng(8)
    outfits = [rng.choice(45, 3, replace=False) for _ in range(5)]
    labels = np.zeros((150, 46), np.float32)
    for i in range(10, 150):
        labels[i, outfits[i % 5]] = 1
    labels[:, 45] = 1            # shoes on everyone: rows 0-9 wear only shoes, Jaccard 1/4 with every
                                 # other outfit, so they have no strict negative and get relaxed ones
    split = _in_memory_split(labels)
    src = make_pipeline("triplet", split, batch_size=5, seed=2, mining="offline")
    jac = jaccard(labels)
    np.fill_diagonal(jac, np.nan)
    checked = relaxed = 0
    for step in range(src.steps_per_epoch + 3):
        rows = src.batch_indices(step)
        a, p, n = np.split(rows, 3)
        b = src.batch(step)
        assert np.array_equal(b["images"], split.images(rows))
        assert np.array_equal(b["categories"], labels[rows])
        for i, j, k in zip(a, p, n):
            assert jac[i, j] >= 0.5 and i != j and i != k
            others = np.delete(jac[i], i)
            if (others < 0.25).any():
                assert jac[i, k] < 0.25
            else:
                assert jac[i, k] == others.min() < jac[i, j]
                relaxed += 1
            checked += 1
    assert checked >= 5 * src.steps_per_epoch and 0 < relaxed < checked


def test_rotation_labels_match_pixels(train):
    src = make_pipeline("rotation", train, batch_size=3, seed=0)
    b = src.batch(1)
    source = train.images(src.batch_indices(1))
    assert b["rotation"].dtype == np.int32 and b["rotation"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i, (img, k) in enumerate(zip(b["images"], b["rotation"])):
        assert np.array_equal(np.rot90(img, -k), source[i % 3])
        if k:
            assert not np.array_equal(img, source[i % 3])
    assert np.array_equal(b["categories"], np.tile(train.categories[src.batch_indices(1)], (4, 1)))
    assert b["images"].flags["C_CONTIGUOUS"]
    aug = make_pipeline("rotation", train, batch_size=3, seed=0, augment=True).batch(1)
    for i, k in enumerate(aug["rotation"]):   # the same augmented image in all four rotations
        assert np.array_equal(np.rot90(aug["images"][i], -k), aug["images"][i % 3])


def test_augmentation_keeps_shape_dtype_and_is_seeded(train):
    images = train.images(np.arange(8))
    a = augment_batch(images, np.random.default_rng(0))
    assert a.shape == images.shape and a.dtype == np.uint8
    assert not np.array_equal(a, images)
    assert np.array_equal(a, augment_batch(images, np.random.default_rng(0)))
    same = augment_batch(images, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1), flip=False)
    assert np.array_equal(same, images)
    flipped = augment_batch(images, np.random.default_rng(1), scale=(1, 1), ratio=(1, 1))
    assert all(np.array_equal(f, x) or np.array_equal(f, x[:, ::-1]) for f, x in zip(flipped, images))
    many = train.images(np.arange(20))
    assert np.array_equal(augment_batch(many, np.random.default_rng(5), parallel=True),
                          augment_batch(many, np.random.default_rng(5), parallel=False))
    plain = make_pipeline("classification", train, batch_size=4, seed=0).batch(0)
    augd = make_pipeline("classification", train, batch_size=4, seed=0, augment=True).batch(0)
    assert np.array_equal(plain["categories"], augd["categories"]) and not np.array_equal(plain["images"], augd["images"])


def test_mixup_blends_photos_and_labels_alike(train):
    """Each mixed example is lam * own + (1 - lam) * one partner's, lam >= 1/2, the same lam for the
    pixels and the labels; seeded by (seed, step); off at 0."""
    plain = make_pipeline("classification", train, batch_size=8, seed=0).batch(3)
    mixed = make_pipeline("classification", train, batch_size=8, seed=0, mixup=0.4).batch(3)
    again = make_pipeline("classification", train, batch_size=8, seed=0, mixup=0.4).batch(3)
    assert _equal_batches(mixed, again) and mixed["categories"].dtype == np.float32
    assert mixed["images"].dtype == np.uint8 and mixed["images"].shape == plain["images"].shape
    x = plain["images"].astype(np.float64)
    y = plain["categories"].astype(np.float64)
    blended = 0
    for i in range(8):
        # Find the partner and lam that explain example i (lam from the labels where they differ).
        fits = []
        for j in range(8):
            for lam in np.linspace(0.5, 1.0, 501):
                if (np.abs(lam * y[i] + (1 - lam) * y[j] - mixed["categories"][i]).max() < 2e-3
                        and np.abs(lam * x[i] + (1 - lam) * x[j] - mixed["images"][i]).max() <= 1.5):
                    fits.append((j, lam))
                    break
        assert fits, f"example {i} is not a blend of itself and a partner"
        blended += any(j != i and lam < 0.99 for j, lam in fits)
    assert blended >= 4
    assert not np.array_equal(mixed["images"], plain["images"])
    off = make_pipeline("classification", train, batch_size=8, seed=0, mixup=0.0).batch(3)
    assert _equal_batches(off, plain)
    with pytest.raises(ConfigError, match="mixup"):
        make_pipeline("classification", train, batch_size=8, seed=0, mixup=-1)
    with pytest.raises(ConfigError, match="mixup"):
        make_pipeline("rotation", train, batch_size=8, seed=0, mixup=0.4)


def test_bad_options(train):
    with pytest.raises(ConfigError, match="kind"):
        make_pipeline("jigsaw", train, batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="mining"):
        make_pipeline("triplet", train, batch_size=4, seed=0, mining="psychic")
    with pytest.raises(ConfigError, match="batch_size=100"):
        make_pipeline("classification", train, batch_size=100, seed=0)
    with pytest.raises(ConfigError, match="at least 2"):
        make_pipeline("triplet", train, batch_size=1, seed=0)
