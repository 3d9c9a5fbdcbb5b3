"""Live index operations: category-filtered search, remove and upsert, checked against brute force
and against a fresh build of the same items."""

from __future__ import annotations

import numpy as np
import pytest

from imat.engine import gallery_index as gi
from imat.errors import ConfigError, DataError

from index_vectors import brute_force, clustered, recall_at

CATS = ("shoe", "bag", "hat", "dress")


def _items(n, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for r in range(n):
        cats = [c for c in CATS if rng.random() < 0.35]
        items.append({"id": f"r{r}", "path": None, "categories": cats})
    return items


def _build(x, items, index_type):
    return gi.build_gallery_index(x, items, index_type, model_fingerprint="fp", model_architecture="arch")


def _mask(items, cats, match):
    sets = [set(it["categories"]) for it in items]
    want = set(cats)
    return np.array([(bool(s & want) if match == "any" else want <= s) for s in sets])


def _filtered_reference(x, items, q, k, cats, match):
    rows = np.flatnonzero(_mask(items, cats, match))
    scores, sub = brute_force(x[rows], q, k)
    return scores, rows[sub]


@pytest.mark.parametrize("match", ["any", "all"])
def test_flat_filtered_search_equals_brute_force_on_the_subset(match):
    x = clustered(2000, 16, 0)
    items = _items(2000)
    q = clustered(40, 16, 1)
    idx = _build(x, items, "Flat")
    cats = ["shoe", "hat"]
    scores, ids = idx.search(q, 10, categories=cats, match=match)
    ref_scores, ref_ids = _filtered_reference(x, items, q, 10, cats, match)
    assert ids.shape == ref_ids.shape
    assert _mask(items, cats, match)[ids].all()
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    mismatch = ids != ref_ids
    assert np.all(np.abs(scores[mismatch] - ref_scores[mismatch]) < 1e-5)  # only float ties differ


@pytest.mark.parametrize("index_type", ["HNSW32,Flat", "IVF32,SQ8"])
def test_ann_filtered_search_has_recall_against_brute_force(index_type):
    x = clustered(3000, 16, 0)
    items = _items(3000)
    q = clustered(40, 16, 1)
    idx = _build(x, items, index_type)
    for cats, match in ((["bag"], "any"), (["shoe", "dress"], "all")):
        scores, ids = idx.search(q, 10, categories=cats, match=match)
        _, ref_ids = _filtered_reference(x, items, q, 10, cats, match)
        valid = ids[ids >= 0]
        assert _mask(items, cats, match)[valid].all()
        assert recall_at(ids, ref_ids) >= 0.9, (index_type, cats, match)


def test_filter_edge_cases():
    x = clustered(50, 16, 0)
    items = _items(50)
    idx = _build(x, items, "Flat")
    scores, ids = idx.search(x[:2], 5, categories=["no-such-category"])
    assert ids.shape == (2, 0)
    with pytest.raises(ConfigError, match="--match"):
        idx.search(x[:1], 5, categories=["shoe"], match="most")
    plain = _build(x, [{"id": str(i)} for i in range(50)], "Flat")
    with pytest.raises(ConfigError, match="no categories"):
        plain.search(x[:1], 5, categories=["shoe"])


@pytest.mark.parametrize("index_type", ["Flat", "IVF16,Flat", "HNSW32,Flat"])
def test_remove_upsert_then_reload_equals_a_fresh_build(tmp_path, index_type):
    x = clustered(1200, 16, 0)
    items = _items(1200)
    idx = _build(x, items, index_type)
    gone = [f"r{r}" for r in range(0, 1200, 7)]
    assert idx.remove(gone) == len(gone)
    assert idx.get("r0") is None and idx.get("r1")["id"] == "r1"
    # searches right after the remove never return a removed item
    _, ids = idx.search(x[:20], 10)
    assert not {idx.items[i]["id"] for i in ids[ids >= 0].ravel()} & set(gone)
    # upsert: r1 gets a new vector and categories, "new" is added
    new_vecs = clustered(2, 16, 5)
    idx.upsert(new_vecs, [{"id": "r1", "path": None, "categories": ["hat"]},
                          {"id": "new", "path": None, "categories": []}])
    assert idx.get("r1")["categories"] == ["hat"] and len(idx.rows_of("r1")) == 1
    idx.save(tmp_path / "idx")
    loaded = gi.load_index(tmp_path / "idx")

    keep = [r for r in range(1200) if f"r{r}" not in set(gone) and r != 1]
    ref_x = np.concatenate([x[keep], new_vecs])
    ref_items = [items[r] for r in keep] + [{"id": "r1", "path": None, "categories": ["hat"]},
                                           {"id": "new", "path": None, "categories": []}]
    assert [it["id"] for it in loaded.items] == [it["id"] for it in ref_items]
    assert loaded.count == len(ref_items) and loaded.tombstones == 0
    q = clustered(30, 16, 2)
    _, ref_ids = brute_force(ref_x, q, 10)
    _, got = loaded.search(q, 10)
    if index_type == "Flat":
        fresh = _build(ref_x, ref_items, "Flat")
        np.testing.assert_array_equal(got, fresh.search(q, 10)[1])
        np.testing.assert_array_equal(loaded.index.reconstruct_n(0, loaded.count), ref_x)
    assert recall_at(got, ref_ids) >= (0.999 if index_type == "Flat" else 0.9)
    # filtered search on the reloaded index still matches brute force on the subset
    _, f_ids = loaded.search(q, 5, categories=["hat"])
    _, f_ref = _filtered_reference(ref_x, ref_items, q, 5, ["hat"], "any")
    assert recall_at(f_ids, f_ref) >= (0.999 if index_type == "Flat" else 0.9)


def test_ivf_remove_keeps_codes_and_renumbers_rows():
    x = clustered(800, 16, 0)
    items = [{"id": str(r)} for r in range(800)]
    idx = _build(x, items, "IVF8,Flat")
    idx.index.nprobe = 8  # every list: exact, so the comparison is about ids only
    idx.meta["search_params"] = {"nprobe": 8}
    idx.remove([str(r) for r in range(0, 800, 3)])
    keep = [r for r in range(800) if r % 3]
    scores, ids = idx.search(x[keep[:10]], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(10))  # each kept vector finds itself at its new row


def test_hnsw_tombstones_are_compacted_past_the_threshold():
    x = clustered(500, 16, 0)
    idx = _build(x, [{"id": str(r)} for r in range(500)], "HNSW32,Flat")
    idx.remove([str(r) for r in range(50)])
    assert idx.tombstones == 50 and idx.count == 500 and idx.live_count == 450
    idx.remove([str(r) for r in range(50, 120)])  # 120/500 > 20 %: rebuilt
    assert idx.tombstones == 0 and idx.count == 380
    assert idx.items[0]["id"] == "120"


def test_remove_unknown_id_is_an_error_and_changes_nothing():
    x = clustered(20, 16, 0)
    idx = _build(x, [{"id": str(r)} for r in range(20)], "Flat")
    with pytest.raises(DataError, match="'nope'"):
        idx.remove(["3", "nope"])
    assert idx.count == 20 and idx.get("3") is not None
    with pytest.raises(ConfigError, match="more than once"):
        idx.upsert(clustered(2, 16, 1), [{"id": "a"}, {"id": "a"}])
