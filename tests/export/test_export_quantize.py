"""int8 export: a quantized model whose retrieval agrees with the float model is written; one that
disagrees (calibrated on black images: every real activation range clips) is refused, nothing written."""

from __future__ import annotations

import numpy as np
import pytest

from imat.errors import ConfigError, ModelError
from imat.export.quantize import quantize_int8, topk_overlap


@pytest.fixture(scope="module")
def float_model(tmp_path_factory, category_names):
    """A real exported network (resnet_tiny, 32 px, random BatchNorm statistics): convs, dense heads."""
    from export_helpers import randomize
    from flax import nnx

    from imat.export.onnx_export import export_onnx
    from imat.train_jax.models import create_model

    model = randomize(create_model("resnet_tiny", rngs=nnx.Rngs(0)), 0)
    return export_onnx(model, tmp_path_factory.mktemp("q") / "model.onnx", image_size=32, objective="bce",
                       category_names=category_names, validate=False)


def _photos(n: int, seed: int) -> np.ndarray:
    """Structured images (colour blocks on a background, like the engine's test photos), not noise."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 32, 32, 3), np.uint8)
    for i in range(n):
        images[i] = rng.integers(0, 256, 3)
        for _ in range(3):
            y, x = rng.integers(0, 16, 2)
            images[i, y : y + 16, x : x + 16] = rng.integers(0, 256, 3)
    return images


def test_topk_overlap_counts_shared_neighbours():
    x = np.random.default_rng(0).standard_normal((30, 8))
    assert topk_overlap(x, x, 10) == 1.0
    assert topk_overlap(x, x * 3.0, 10) == 1.0  # rows are compared after L2 normalisation
    assert topk_overlap(x, np.random.default_rng(1).standard_normal((30, 8)), 10) < 0.6
    with pytest.raises(ConfigError, match="more than 10 held-out"):
        topk_overlap(x[:10], x[:10], 10)


def test_int8_model_agrees_and_keeps_the_contract(float_model, tmp_path):
    from imat.engine.session import ModelSession

    out = tmp_path / "model.int8.onnx"
    report = quantize_int8(float_model, out, _photos(48, 0), _photos(40, 1))
    assert report.agreement.ok and report.agreement.embedding_overlap >= 0.9
    assert report.agreement.probability_overlap >= 0.9
    assert out.is_file() and report.size_bytes < report.float_size_bytes
    int8, fp32 = ModelSession(out), ModelSession(float_model)
    assert int8.metadata.extra["quantization"] == "int8"
    assert int8.metadata.extra["float_fingerprint"] == fp32.metadata.fingerprint != int8.metadata.fingerprint
    assert int8.metadata.category_names == fp32.metadata.category_names and int8.has_probabilities
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_int8(out, tmp_path / "again.onnx", _photos(16, 0), _photos(16, 1))


def test_int8_model_that_disagrees_is_refused_and_not_written(float_model, tmp_path):
    out = tmp_path / "model.int8.onnx"
    black = np.zeros((16, 32, 32, 3), np.uint8)  # calibration that has never seen a real pixel range
    with pytest.raises(ModelError, match=r"refused: embedding top-10 overlap 0\.\d+.*not written"):
        quantize_int8(float_model, out, black, _photos(40, 1))
    assert not out.exists() and list(tmp_path.iterdir()) == []
