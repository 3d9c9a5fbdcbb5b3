"""An int8 model (imat export --quantize int8) indexes and searches through the same engine code as
its float model; each model refuses the other's index (their embeddings differ slightly)."""

from __future__ import annotations

import numpy as np
import pytest

from imat.data_tools.images import decode_image
from imat.errors import IndexFileError


@pytest.fixture(scope="module")
def int8_model(tiny_model, tmp_path_factory, photos_factory):
    from imat.export.quantize import quantize_int8

    folder = tmp_path_factory.mktemp("calibration")
    photos = [decode_image(p, 32, "stretch") for p in photos_factory(folder, 40, seed=3)]
    out = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    quantize_int8(tiny_model, out, np.stack(photos[:16]), np.stack(photos[16:]))
    return out


def test_int8_and_float_models_index_and_search_alike(tiny_model, int8_model, photo_dir, tmp_path):
    from imat.engine import Engine

    paths = sorted(photo_dir.glob("*.jpg"))
    results = {}
    for name, model in (("fp32", tiny_model), ("int8", int8_model)):
        engine = Engine(model, batch_size=4, progress=False)
        engine.build_index(paths, tmp_path / name)
        results[name] = engine.search(paths[:6], k=5, index=tmp_path / name)
        assert engine.metadata.extra.get("quantization") == (None if name == "fp32" else "int8")
    for a, b in zip(results["fp32"], results["int8"]):
        assert a["query"] == b["query"] and a["results"][0]["id"] == b["results"][0]["id"]  # itself first
        ids_a, ids_b = {r["id"] for r in a["results"]}, {r["id"] for r in b["results"]}
        assert len(ids_a & ids_b) >= 4
        assert [c["name"] for c in a["predicted_categories"]][:1] == [c["name"] for c in b["predicted_categories"]][:1]
    with pytest.raises(IndexFileError, match="different model"):
        Engine(int8_model, progress=False).load_index(tmp_path / "fp32")
