"""FAISS index: the type-choice table, exactness/recall against brute force, disk format, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.engine import index as ix
from imat.errors import ConfigError, IndexFileError


def clustered(n, d, seed, *, clusters=50, spread=0.4):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(gallery, queries, k):
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def recall_at(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


@pytest.mark.parametrize(
    "count,dim,budget,expected",
    [
        (1, 16, None, "Flat"),
        (50_000, 128, None, "Flat"),
        (50_001, 128, None, "HNSW32,Flat"),
        (1_000_000, 128, None, "HNSW32,Flat"),
        (1_000_001, 128, None, "IVF4000,SQ8"),
        (4_000_000, 96, None, "IVF8000,SQ8"),
        (4_000_000, 96, 4_000_000 * 104, "IVF8000,SQ8"),  # SQ8 exactly fits
        (4_000_000, 96, 4_000_000 * 103, "IVF8000,PQ24"),  # it does not: PQ with m = D/4
        (10_000_000, 100, 10_000_000 * 50, "IVF12649,PQ25"),
        # memory-bound: 20k x 128 flat = 10 MB does not fit 2 MB -> IVF-PQ; nlist capped at n/39
        (20_000, 128, 2_000_000, "IVF512,PQ32"),
        # small and memory-bound: 4-bit codebooks (too few points for 256 centroids), then OPQ + shorter codes
        (5_000, 64, 80_000, "IVF128,PQ16x4"),
        (5_000, 64, 60_000, "OPQ8,IVF128,PQ8x4"),
        (200_000, 128, 60 * 2**20, "IVF1789,SQ8"),
        (200_000, 128, 20 * 2**20, "IVF1789,PQ32"),
        (200_000, 128, 5_000_000, "OPQ16,IVF1789,PQ16"),
    ],
)
def test_choose_index_type_table(count, dim, budget, expected):
    assert ix.choose_index_type(count, dim, budget) == expected


def test_choose_index_type_rejects_impossible_inputs():
    with pytest.raises(ConfigError, match="at least one vector"):
        ix.choose_index_type(0, 16)
    with pytest.raises(ConfigError, match="too small"):
        ix.choose_index_type(1_000_000, 64, 1000)


def test_search_params_are_stored_defaults():
    assert ix.default_search_params("Flat") == {}
    assert ix.default_search_params("HNSW32,Flat") == {"efSearch": ix.HNSW_EF_SEARCH}
    assert ix.default_search_params("IVF4000,PQ32") == {"nprobe": 250}
    assert ix.default_search_params("IVF4000,SQ8") == {"nprobe": 250}
    assert ix.default_search_params("IVF64,Flat") == {"nprobe": 16}


def test_flat_equals_brute_force_ids_and_scores():
    x = clustered(3000, 24, 0)
    q = clustered(50, 24, 1)
    idx = ix.build_gallery_index(x, [{"id": str(i)} for i in range(len(x))], "Flat",
                                 model_fingerprint="f", model_architecture="a")
    scores, ids = idx.search(q, 10)
    ref_scores, ref_ids = brute_force(x, q, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    # ids equal except where two neighbours tie to float32 precision
    mismatch = ids != ref_ids
    assert np.all(np.abs(scores[mismatch] - ref_scores[mismatch]) < 1e-5)
    assert mismatch.mean() < 0.01


def test_k_is_clamped_to_the_gallery_size():
    x = clustered(7, 8, 0)
    idx = ix.build_gallery_index(x, [{"id": str(i)} for i in range(7)], "auto",
                                 model_fingerprint="f", model_architecture="a")
    scores, ids = idx.search(x[:2], 50)
    assert ids.shape == (2, 7) and sorted(ids[0].tolist()) == list(range(7))
    assert ids[0, 0] == 0 and ids[1, 0] == 1
    with pytest.raises(ConfigError, match="--k"):
        idx.search(x[:1], 0)


@pytest.mark.parametrize("index_type", ["HNSW32,Flat", "IVF100,Flat", "IVF100,SQ8"])
def test_approximate_indexes_reach_recall(index_type):
    x = clustered(10_000, 32, 0)
    q = clustered(200, 32, 1)
    index = ix.build_faiss_index(x, index_type)
    _, ids = index.search(q, 10)
    _, truth = brute_force(x, q, 10)
    r10 = recall_at(ids, truth)  # 10-recall@10: overlap of the top 10 with the exact top 10
    assert r10 >= 0.95, r10


@pytest.mark.slow
def test_ivf_pq_reaches_recall():
    # PQ training (k-means per sub-space) is the slow part on a shared CPU: keep it small.
    x = clustered(3000, 16, 0)
    q = clustered(200, 16, 1)
    index = ix.build_faiss_index(x, "IVF50,PQ8")
    _, ids = index.search(q, 10)
    _, truth = brute_force(x, q, 10)
    r1 = np.mean([t[0] in f for f, t in zip(ids, truth)])  # 1-recall@10: exact nearest found in the top 10
    r10 = recall_at(ids, truth)
    # PQ codes are lossy by design (8 bytes for 64 bytes of floats): the exact nearest neighbour
    # is found, the order of the rest of the top 10 is approximate.
    assert r1 >= 0.95 and r10 >= 0.75, (r1, r10)


def test_bad_user_index_types_are_config_errors():
    x = clustered(100, 8, 0)
    with pytest.raises(ConfigError, match="not a valid FAISS factory string"):
        ix.build_faiss_index(x, "Nonsense42")
    with pytest.raises(ConfigError, match="needs at least 1024 vectors"):
        ix.build_faiss_index(x, "IVF1024,Flat")
    with pytest.raises(ConfigError, match="PQ codebooks"):
        ix.build_faiss_index(x, "IVF2,PQ4")


def test_gpu_is_not_used_without_gpus():
    import faiss

    if faiss.get_num_gpus() == 0:
        assert not ix._gpu_worthwhile("Flat", 10_000_000)
    assert not ix._gpu_worthwhile("HNSW32,Flat", 10_000_000)


def _gallery(n, seed=0, labelled=True):
    x = clustered(n, 16, seed)
    items = [{"id": f"i{seed}-{r}", "path": f"/p/{r}.jpg", **({"categories": ["shoe"]} if labelled else {})}
             for r in range(n)]
    return ix.build_gallery_index(x, items, "Flat", model_fingerprint="fp", model_architecture="arch"), x


def test_save_load_add_round_trip(tmp_path):
    g, x = _gallery(30)
    g.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["index.faiss", "index.json", "items.jsonl"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert {k: meta[k] for k in ("index_type", "metric", "dim", "count", "model_fingerprint")} == {
        "index_type": "Flat", "metric": "inner_product", "dim": 16, "count": 30, "model_fingerprint": "fp"}
    assert set(ix.SIDECAR_KEYS) <= set(meta)
    loaded = ix.load_index(tmp_path / "idx")
    assert loaded.count == 30 and loaded.items[3] == {"id": "i0-3", "path": "/p/3.jpg", "categories": ["shoe"]}
    np.testing.assert_array_equal(loaded.search(x[:5], 3)[1], g.search(x[:5], 3)[1])

    extra = clustered(5, 16, 9)
    loaded.add(extra, [{"id": f"new{i}", "path": None, "categories": []} for i in range(5)])
    loaded.save(tmp_path / "idx")
    again = ix.load_index(tmp_path / "idx")
    assert again.count == 35 and again.meta["count"] == 35 and again.items[30]["id"] == "new0"
    _, ids = again.search(extra, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(30, 35))  # new row ids continue
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "idx"]
    assert leftovers == []


def test_interrupted_write_leaves_the_old_index_usable(tmp_path, monkeypatch):
    import faiss

    g, _ = _gallery(10)
    g.save(tmp_path / "idx")
    bigger, _ = _gallery(20, seed=1)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError, match="simulated"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    old = ix.load_index(tmp_path / "idx")
    assert old.count == 10 and old.items[0]["id"] == "i0-0"
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # the temp folder was cleaned up


def test_interrupted_swap_is_recoverable(tmp_path, monkeypatch):
    # Failing the rename of the new folder into place puts the old one back.
    g, _ = _gallery(10)
    g.save(tmp_path / "idx")
    bigger, _ = _gallery(20, seed=1)
    real_rename = ix.os.rename

    def flaky(src, dst):
        if ".tmp-" in str(src):
            raise OSError("power cut (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(ix.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    assert ix.load_index(tmp_path / "idx").count == 10


def test_refuses_to_overwrite_a_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    g, _ = _gallery(5)
    with pytest.raises(IndexFileError, match="is not an imat index"):
        g.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").exists()


def test_load_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(IndexFileError, match="nothere: index folder not found"):
        ix.load_index(tmp_path / "nothere")
    g, _ = _gallery(5)
    g.save(tmp_path / "idx")
    (tmp_path / "idx" / "items.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(IndexFileError, match="counts disagree"):
        ix.load_index(tmp_path / "idx")
    g.save(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{not json")
    with pytest.raises(IndexFileError, match=r"index.json: unreadable sidecar"):
        ix.load_index(tmp_path / "idx")
    g.save(tmp_path / "idx2")
    (tmp_path / "idx2" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match=r"index.faiss: not a readable FAISS index"):
        ix.load_index(tmp_path / "idx2")
    (tmp_path / "idx2" / "index.faiss").unlink()
    with pytest.raises(IndexFileError, match=r"index.faiss: missing"):
        ix.load_index(tmp_path / "idx2")
