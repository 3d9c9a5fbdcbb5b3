"""Engine end to end on the tiny model: build, load (fingerprint check), add, search records."""

from __future__ import annotations

import numpy as np
import pytest

from imat.engine import Engine
from imat.engine.evaluate import neighbour_votes
from imat.errors import ConfigError, DataError, IndexFileError


def test_build_search_returns_contract_records(engine, photo_dir, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))
    labels = [["shoe"] if i % 2 else ["dress", "bag, wallet"] for i in range(len(paths))]
    gallery = engine.build_index(paths, tmp_path / "idx", labels=labels)
    assert gallery.count == len(paths) and gallery.index_type == "Flat" and gallery.labelled
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    records = engine.search([paths[3], bad, paths[4]], k=4, index=tmp_path / "idx")
    assert [r["query"] for r in records] == [str(paths[3]), str(bad), str(paths[4])]
    assert records[1]["error"] and records[1]["results"] == []
    first = records[0]
    assert set(first) == {"query", "results", "predicted_categories"}
    assert [r["rank"] for r in first["results"]] == [1, 2, 3, 4]
    assert first["results"][0]["id"] == "img_003" and first["results"][0]["path"] == str(paths[3])
    assert first["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    scores = [r["score"] for r in first["results"]]
    assert scores == sorted(scores, reverse=True)
    # neighbour votes: recompute from the returned neighbours
    emb = engine.embed(paths)
    q = engine.embed([paths[3]])
    sims = (q @ emb.T)[0]
    top = np.argsort(-sims)[:4]
    names = list(engine.metadata.category_names)
    lab = np.zeros((len(paths), len(names)), bool)
    for i, cats in enumerate(labels):
        for c in cats:
            lab[i, names.index(c)] = True
    votes = neighbour_votes(top[None], sims[top][None], lab)[0]
    got = {p["name"]: p["score"] for p in first["predicted_categories"] if p["source"] == "neighbours"}
    want = {names[j]: float(votes[j]) for j in np.flatnonzero(votes >= 0.2)}
    assert got.keys() == want.keys() and all(got[n] == pytest.approx(want[n], abs=1e-5) for n in got)
    model = [p for p in first["predicted_categories"] if p["source"] == "model"]
    assert model and all(0.2 <= p["score"] <= 1 for p in model)


def test_k_larger_than_gallery_is_clamped(engine, photo_dir, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))[:3]
    engine.build_index(paths, tmp_path / "idx")
    records = engine.search(paths[:1], k=10, index=tmp_path / "idx")
    assert len(records[0]["results"]) == 3
    assert all(p["source"] == "model" for p in records[0]["predicted_categories"])  # unlabelled index


def test_fingerprint_mismatch_names_the_building_model(engine, other_model, photo_dir, tmp_path):
    engine.build_index(sorted(photo_dir.glob("*.jpg")), tmp_path / "idx")
    other = Engine(other_model, decode_threads=1, progress=False)
    with pytest.raises(IndexFileError, match=r"built by a different model \(architecture tiny_test_pool_projection, "
                                             r"fingerprint [0-9a-f]{12}"):
        other.load_index(tmp_path / "idx")


def test_add_to_index_continues_row_ids(engine, photo_dir, photos_factory, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))
    engine.build_index(paths, tmp_path / "idx", ids=[f"a{i}" for i in range(len(paths))])
    new = photos_factory(tmp_path / "new", 3, seed=7)
    bad = tmp_path / "new" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    gallery = engine.add_to_index(tmp_path / "idx", new + [bad])
    assert gallery.count == len(paths) + 3
    reloaded = engine.load_index(tmp_path / "idx")
    assert reloaded.count == len(paths) + 3 and reloaded.meta["skipped"] == 1
    assert [it["id"] for it in reloaded.items[-3:]] == ["img_000", "img_001", "img_002"]
    top = engine.search(new, k=1, index=reloaded)
    assert [r["results"][0]["path"] for r in top] == [str(p) for p in new]
    with pytest.raises(ConfigError, match="has no labels"):
        engine.add_to_index(tmp_path / "idx", new, labels=[["shoe"]] * 3)


def test_integer_labels_are_named_and_bad_ones_refused(engine, photo_dir, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))[:2]
    g = engine.build_index(paths, tmp_path / "idx", labels=[[0, 23], [23]])
    names = engine.metadata.category_names
    assert g.items[0]["categories"] == [names[0], names[23]]
    with pytest.raises(DataError, match="category id 99"):
        engine.build_index(paths, tmp_path / "idx2", labels=[[99], [1]])
    with pytest.raises(ConfigError, match="labels has 1 entries for 2 items"):
        engine.build_index(paths, tmp_path / "idx3", labels=[[1]])


def test_nothing_readable_is_a_clear_error(engine, tmp_path):
    bad = tmp_path / "x.jpg"
    bad.write_bytes(b"")
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        engine.build_index([bad], tmp_path / "idx")
    with pytest.raises(DataError, match="no images to index"):
        engine.build_index([], tmp_path / "idx")


def test_evaluate_on_a_kaggle_folder(engine, kaggle_dir):
    r = engine.evaluate(kaggle_dir, k=5)
    assert r["count"] == r["images"] == 24 and r["k"] == 5
    for key in ("map@5", "precision@5", "recall@5", "ndcg@5", "f1_macro_neighbours", "f1_micro_model"):
        assert 0.0 <= r[key] <= 1.0
    assert set(r["baseline"]) >= {"map@5", "precision@5", "recall@5", "ndcg@5"}


def test_real_photos_index_and_search(engine, real_smoke, tmp_path):
    """The 13 real-smoke photos (up to 6000x4000 JPEGs) index, and each finds itself first."""
    from imat.data_tools.kaggle import read_kaggle

    ds = read_kaggle(real_smoke)
    paths = [rec.path for rec in ds.records]
    names = dict(zip(ds.labels.category_ids, ds.labels.category_names))
    labels = [[names[c] for c in rec.categories] for rec in ds.records]
    gallery = engine.build_index(paths, tmp_path / "idx", labels=labels, ids=[r.image_id for r in ds.records])
    assert gallery.count == len(paths) >= 10 and engine.last_result.errors == []
    records = engine.search(paths, k=3, index=tmp_path / "idx")
    assert [r["results"][0]["id"] for r in records] == [rec.image_id for rec in ds.records]
    assert all(r["predicted_categories"] for r in records)
