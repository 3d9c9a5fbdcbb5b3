"""GalleryIndex: exact search against brute force, k clamping, "auto", save/load/add round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.engine import gallery_index as gi
from imat.engine import index_dir
from imat.errors import ConfigError, IndexFileError

from index_vectors import brute_force, clustered, small_gallery


def test_flat_equals_brute_force_ids_and_scores():
    x = clustered(3000, 24, 0)
    q = clustered(50, 24, 1)
    idx = gi.build_gallery_index(x, [{"id": str(i)} for i in range(len(x))], "Flat",
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
    idx = gi.build_gallery_index(x, [{"id": str(i)} for i in range(7)], "auto",
                                 model_fingerprint="f", model_architecture="a")
    assert idx.index_type == "Flat"
    scores, ids = idx.search(x[:2], 50)
    assert ids.shape == (2, 7) and sorted(ids[0].tolist()) == list(range(7))
    assert ids[0, 0] == 0 and ids[1, 0] == 1
    with pytest.raises(ConfigError, match="--k"):
        idx.search(x[:1], 0)


def test_auto_uses_the_memory_budget():
    # 2000 x 16 floats = 128 kB flat; a 60 kB budget forces 8-bit codes (48 kB), resolved and recorded once.
    x = clustered(2000, 16, 0)
    idx = gi.build_gallery_index(x, [{"id": str(i)} for i in range(2000)], "auto", model_fingerprint="f",
                                 model_architecture="a", memory_budget_bytes=60_000)
    assert idx.index_type == "IVF51,SQ8"
    assert idx.meta["index_type"] == idx.index_type and idx.meta["search_params"]["nprobe"] >= 1


def test_save_load_add_round_trip(tmp_path):
    g, x = small_gallery(30)
    g.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["index.faiss", "index.json", "items.jsonl"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert {k: meta[k] for k in ("index_type", "metric", "dim", "count", "model_fingerprint")} == {
        "index_type": "Flat", "metric": "inner_product", "dim": 16, "count": 30, "model_fingerprint": "fp"}
    assert set(index_dir.SIDECAR_KEYS) <= set(meta)
    loaded = gi.load_index(tmp_path / "idx")
    assert loaded.count == 30 and loaded.items[3] == {"id": "i0-3", "path": "/p/3.jpg", "categories": ["shoe"]}
    np.testing.assert_array_equal(loaded.search(x[:5], 3)[1], g.search(x[:5], 3)[1])

    extra = clustered(5, 16, 9)
    loaded.add(extra, [{"id": f"new{i}", "path": None, "categories": []} for i in range(5)])
    loaded.save(tmp_path / "idx")
    again = gi.load_index(tmp_path / "idx")
    assert again.count == 35 and again.meta["count"] == 35 and again.items[30]["id"] == "new0"
    _, ids = again.search(extra, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(30, 35))  # new row ids continue
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "idx"]
    assert leftovers == []


def test_two_adders_do_not_lose_each_others_rows(tmp_path):
    g, _ = small_gallery(10)
    g.save(tmp_path / "idx")
    first, second = gi.load_index(tmp_path / "idx"), gi.load_index(tmp_path / "idx")
    first.add(clustered(2, 16, 5), [{"id": "a1"}, {"id": "a2"}])
    first.save(tmp_path / "idx")
    second.add(clustered(3, 16, 6), [{"id": "b1"}, {"id": "b2"}, {"id": "b3"}])
    with pytest.raises(IndexFileError, match=r"idx: changed on disk since this index was loaded"):
        second.save(tmp_path / "idx")
    assert gi.load_index(tmp_path / "idx").count == 12  # the first adder's rows are kept
    first.add(clustered(1, 16, 7), [{"id": "a3"}])
    first.save(tmp_path / "idx")  # a writer's own earlier save is not a conflict
    assert gi.load_index(tmp_path / "idx").count == 13
    second.save(tmp_path / "copy")  # saving elsewhere is not checked
    assert [it["id"] for it in gi.load_index(tmp_path / "copy").items[10:]] == ["b1", "b2", "b3"]
