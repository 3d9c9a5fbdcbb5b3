"""Embedder: same pixels from paths and arrays, identical to a direct ORT run, tolerant of bad items."""

from __future__ import annotations

import numpy as np
import pytest

from imat.data_tools.images import decode_image
from imat.errors import DataError


def _direct_ort(model_path, arrays):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(["embedding", "probabilities"], {"images": np.stack(arrays)})


def test_paths_arrays_and_direct_ort_agree(engine, tiny_model, photo_dir):
    paths = sorted(photo_dir.glob("*.jpg"))
    arrays = [decode_image(p, 32, "stretch") for p in paths]
    from_paths = engine.embed(paths)
    probs_paths = engine.last_result.probabilities
    from_arrays = engine.embed(arrays)
    emb_ref, prob_ref = _direct_ort(tiny_model, arrays)
    assert from_paths.dtype == np.float32 and from_paths.shape == (len(paths), 16)
    np.testing.assert_array_equal(from_paths, from_arrays)
    np.testing.assert_allclose(from_paths, emb_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs_paths, prob_ref, rtol=1e-5, atol=1e-6)
    # distinct images give distinct embeddings (the test model is not degenerate)
    assert np.unique(from_paths.round(4), axis=0).shape[0] == len(paths)


def test_large_arrays_are_resized_by_the_shared_decoder(engine):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
    emb = engine.embed([big])
    ref = engine.embed([decode_image(big, 32, "stretch")])
    np.testing.assert_array_equal(emb, ref)


def test_bad_items_are_collected_and_order_is_kept(engine, photo_dir, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(paths[0].read_bytes()[:200])  # truncated JPEG
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    items = [paths[0], corrupt, paths[1], tmp_path / "missing.jpg", empty, paths[2],
             np.zeros((4, 4), np.float32)]
    emb, errors = engine.embed_with_errors(items)
    assert [e.index for e in errors] == [1, 3, 4, 6]
    assert errors[0].path == str(corrupt) and errors[1].message == "file not found"
    assert "uint8" in errors[3].message
    np.testing.assert_array_equal(engine.last_result.ok_indices, [0, 2, 5])
    np.testing.assert_array_equal(emb, engine.embed([paths[0], paths[1], paths[2]]))
    with pytest.raises(DataError, match=r"corrupt.jpg: .*and 3 more"):
        engine.embed(items)


def test_many_items_small_batches_keep_order(tiny_model, photo_dir):
    from imat.engine import Engine
    from imat.engine.embedder import embed_items

    paths = sorted(photo_dir.glob("*.jpg")) * 3
    eng = Engine(tiny_model, decode_threads=2, batch_size=5, progress=False)
    res = embed_items(eng.session, paths, batch_size=5, decode_threads=2, max_in_flight=3, progress=False)
    single = np.concatenate([eng.embed([p]) for p in paths[:12]])
    np.testing.assert_allclose(res.embeddings[:12], single, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(res.embeddings[:12], res.embeddings[12:24])
    t = res.timings
    assert t.items == t.embedded == 36 and t.batches == 8  # ceil(36 / 5)
    assert t.decode_s > 0 and t.model_s > 0 and t.images_per_s > 0


def test_empty_input_gives_empty_embeddings(engine):
    emb, errors = engine.embed_with_errors([])
    assert emb.shape == (0, 16) and errors == []
