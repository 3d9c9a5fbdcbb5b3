"""Embeddings folder (npy + parquet parts, manifest), resume, and the index built from parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_vectors import brute_force, clustered, recall_at

from imat.engine.embed_run import embed_to_dir, folder_inputs
from imat.engine.embedding_parts import PartOutput, open_for_writing, part_files, read_embedding_dir
from imat.engine.gallery_index import build_gallery_index
from imat.engine.index_dir import model_fields
from imat.engine.parts_index import build_index_from_parts, gather_rows
from imat.errors import ConfigError, DataError

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, photos_factory):
    """13 photos, one corrupt and one empty file: 15 inputs."""
    folder = tmp_path_factory.mktemp("parts-photos")
    photos_factory(folder, 13)
    (folder / "img_005b.jpg").write_bytes(b"this is not an image")
    (folder / "img_009b.jpg").write_bytes(b"")
    return folder


def _embed(engine, folder, out, part_size=None):
    return embed_to_dir(engine, folder_inputs(engine, folder), out, part_size=part_size, progress=False)


def test_parts_manifest_and_metadata_format(engine, gallery, tmp_path):
    out = tmp_path / "emb"
    summary = _embed(engine, gallery, out, part_size=4)
    assert (summary.parts, summary.written_parts, summary.items, summary.embedded) == (4, 4, 15, 13)
    assert sorted(why for _, why in summary.errors) == ["empty file (0 bytes)", "not an image (unrecognised format)"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "imat-embeddings" and manifest["complete"] is True
    assert manifest["model"] == model_fields(engine.metadata) and manifest["dim"] == 16
    assert manifest["counts"] == {"parts": 4, "parts_complete": 4, "items": 15, "embedded": 13, "errors": 2}
    assert [p["rows"] for p in manifest["parts"]] == [4, 4, 4, 3]

    direct, errors = engine.embed_with_errors(folder_inputs(engine, gallery).items)
    rows, vectors = [], []
    for entry in manifest["parts"]:
        npy, parquet = part_files(entry["part"])
        x = np.load(out / npy)
        assert x.dtype == np.float32 and x.shape == (entry["embedded"], 16)
        table = pq.read_table(out / parquet)
        assert table.column_names == ["row", "id", "path", "path_bytes_b64", "categories", "error", "embedding_row"]
        meta = table.to_pylist()
        assert len(meta) == entry["rows"]
        ok = [m for m in meta if m["error"] is None]
        assert [m["embedding_row"] for m in ok] == list(range(len(ok)))
        assert all(m["embedding_row"] is None and m["categories"] is None for m in meta if m["error"])
        rows += [m["row"] for m in meta]
        vectors.append(x)
    assert rows == list(range(15))
    np.testing.assert_allclose(np.concatenate(vectors), direct, atol=1e-6)

    parts = read_embedding_dir(out)
    assert [it["id"] for it in parts.items()] == [p.stem for p in folder_inputs(engine, gallery).items
                                                 if p.stem not in ("img_005b", "img_009b")]
    assert {e["id"]: e["error"] for e in parts.errors()} == {
        "img_005b": "not an image (unrecognised format)", "img_009b": "empty file (0 bytes)"}
    assert len(errors) == 2


def test_rerun_skips_complete_parts_and_redoes_damaged_ones(engine, gallery, tmp_path):
    out = tmp_path / "emb"
    _embed(engine, gallery, out, part_size=4)
    before = gather_rows(read_embedding_dir(out), None)

    again = _embed(engine, gallery, out)  # part size taken from the folder
    assert (again.written_parts, again.skipped_parts) == (0, 4)
    assert again.resume_note == f"resuming {out}: 4 of 4 parts complete, skipped"

    # a killed run: part 1's npy cut short, part 2's parquet gone, a temp file left behind
    npy1 = out / part_files(1)[0]
    npy1.write_bytes(npy1.read_bytes()[:-8])
    (out / part_files(2)[1]).unlink()
    tmp = out / "embeddings" / ".part-00003.npy.x1y2.tmp"
    tmp.write_bytes(b"half")
    redo = _embed(engine, gallery, out, part_size=4)
    assert (redo.written_parts, redo.skipped_parts, redo.redone_parts) == (2, 2, 2)
    assert "2 of 4 parts complete, skipped; redoing partial parts 1, 2" in redo.resume_note
    assert not tmp.exists()
    after = read_embedding_dir(out)
    assert after.manifest["complete"] and [p["part"] for p in after.parts] == [0, 1, 2, 3]
    np.testing.assert_array_equal(gather_rows(after, None), before)


def test_rerun_refuses_another_input_model_or_part_size(engine, gallery, other_model, tmp_path):
    from imat.engine import Engine

    out = tmp_path / "emb"
    _embed(engine, gallery, out, part_size=4)
    with pytest.raises(ConfigError, match="--part-size 4, not 5"):
        _embed(engine, gallery, out, part_size=5)
    other = Engine(other_model, decode_threads=1, batch_size=4, progress=False)
    with pytest.raises(ConfigError, match="another model"):
        _embed(other, gallery, out)
    more = tmp_path / "more"
    more.mkdir()
    for p in gallery.iterdir():
        (more / p.name).write_bytes(p.read_bytes())
    (more / "zz_extra.jpg").write_bytes((gallery / "img_000.jpg").read_bytes())
    with pytest.raises(ConfigError, match="another input list .15 items then, 16 now"):
        _embed(engine, more, out)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not an imat embeddings folder"):
        _embed(engine, gallery, tmp_path / "junk")


def _synthetic_dir(path, x, part_size, *, errors_every=0):
    """An embeddings folder of given vectors (as a backend would produce them); returns the kept rows."""
    records = [{"id": f"v{r}", "path": f"/g/{r}.jpg"} for r in range(len(x))]
    model = {"model_fingerprint": "f" * 64, "model_architecture": "synthetic", "model_objective": "bce",
             "image_size": 32, "resize_mode": "stretch"}
    kept = np.ones(len(x), dtype=bool)
    with open_for_writing(path, records, model=model, dim=x.shape[1], part_size=part_size) as writer:
        for plan in writer.pending:
            bad = {pos: "corrupt" for pos in range(plan.rows) if errors_every and (plan.start + pos) % errors_every == 0}
            keep = np.array([pos not in bad for pos in range(plan.rows)])
            kept[plan.start:plan.stop] = keep
            writer.write_part(PartOutput(plan.index, x[plan.start:plan.stop][keep], bad))
    return kept


def test_incomplete_folder_is_refused_for_indexing(tmp_path):
    x = clustered(30, 8, 0)
    records = [{"id": f"v{r}", "path": None} for r in range(30)]
    model = {"model_fingerprint": "f" * 64, "model_architecture": "a", "model_objective": "bce", "image_size": 32,
             "resize_mode": "stretch"}
    with open_for_writing(tmp_path / "emb", records, model=model, dim=8, part_size=10) as writer:
        writer.write_part(PartOutput(1, x[10:20], {}))
    with pytest.raises(DataError, match="incomplete, 1 of 3 parts written"):
        read_embedding_dir(tmp_path / "emb")


def test_flat_from_parts_searches_exactly_as_flat_from_memory(tmp_path):
    x = clustered(2_000, 24, 1)
    kept = _synthetic_dir(tmp_path / "emb", x, 300, errors_every=97)
    parts = read_embedding_dir(tmp_path / "emb")
    from_parts = build_index_from_parts(parts, "Flat")
    items = [{"id": f"v{r}", "path": f"/g/{r}.jpg"} for r in np.flatnonzero(kept)]
    from_memory = build_gallery_index(x[kept], items, "Flat", model_fingerprint="f" * 64,
                                      model_architecture="synthetic")
    assert from_parts.items == from_memory.items and from_parts.meta["skipped"] == int((~kept).sum())
    queries = clustered(50, 24, 2)
    s1, i1 = from_parts.search(queries, 10)
    s2, i2 = from_memory.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_ivf_from_parts_in_parallel_matches_memory_and_brute_force(tmp_path):
    x = clustered(12_000, 32, 3)
    _synthetic_dir(tmp_path / "emb", x, 1_000)
    parts = read_embedding_dir(tmp_path / "emb")
    from_parts = build_index_from_parts(parts, "IVF64,SQ8", workers=3)
    items = [{"id": f"v{r}", "path": f"/g/{r}.jpg"} for r in range(len(x))]
    from_memory = build_gallery_index(x, items, "IVF64,SQ8", model_fingerprint="f" * 64,
                                      model_architecture="synthetic")
    queries = clustered(200, 32, 4)
    _, truth = brute_force(x, queries, 10)
    _, found = from_parts.search(queries, 10)
    assert recall_at(found, truth) >= 0.95
    # same training rows, lists merged in part order: what one add of all vectors gives
    np.testing.assert_array_equal(found, from_memory.search(queries, 10)[1])
    from_parts.save(tmp_path / "idx")
    from imat.engine.gallery_index import load_index

    loaded = load_index(tmp_path / "idx")
    assert loaded.count == 12_000 and loaded.search_params == from_memory.search_params
