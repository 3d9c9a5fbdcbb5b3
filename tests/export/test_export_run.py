"""export_run: a training run's checkpoint (train_jax's CheckpointStore format) -> model.onnx."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from export_helpers import make_run

from imat.errors import ModelError
from imat.export.onnx_export import export_onnx_report, export_run, export_run_report, read_metadata
from imat.export.validate import random_images


def _fingerprint(model, tmp_path, objective="bce"):
    from imat.data_tools.labels import LabelSpace

    return export_onnx_report(model, tmp_path / "direct.onnx", image_size=32, objective=objective,
                              category_names=LabelSpace.default().category_names, validate=False).fingerprint


def test_export_run_latest_and_given_step(tmp_path, bce_run):
    run_dir, models = bce_run
    out = export_run(run_dir, tmp_path / "latest.onnx")
    meta = read_metadata(out)
    assert meta.architecture == "resnet_tiny" and meta.objective == "bce"
    # bce serves what it trains: the 46 probabilities (L2-normalised), not the 16-d embedding head.
    assert meta.image_size == 32 and meta.embedding_dim == 46 and meta.embedding_source == "probabilities"
    assert meta.outputs == ("embedding", "probabilities")
    assert meta.category_names[0] == "shirt, blouse" and len(meta.category_names) == 46
    assert meta.extra["checkpoint_step"] == "5"
    # The restored weights are exactly the ones saved at that step.
    assert meta.fingerprint == _fingerprint(models[5], tmp_path)

    report = export_run_report(run_dir, tmp_path / "step2.onnx", step=2)
    assert read_metadata(report.path).extra["checkpoint_step"] == "2"
    assert report.fingerprint == _fingerprint(models[2], tmp_path) != meta.fingerprint
    assert report.parity.max_relative < 1e-5


def test_export_run_rotation(tmp_path):
    run_dir = tmp_path / "rot"
    make_run(run_dir, objective="rotation", steps=(1,))
    out = export_run(run_dir, tmp_path / "m.onnx")
    meta = read_metadata(out)
    assert meta.outputs == ("embedding",) and meta.embedding_source == "pooled"
    assert meta.embedding_dim == 64
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(["embedding"], {"images": random_images(3, 32)})
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_export_run_errors(tmp_path, bce_run):
    run_dir, _ = bce_run
    with pytest.raises(ModelError, match="does not exist"):
        export_run(tmp_path / "nope", tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        export_run(tmp_path / "empty", tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="step 3"):
        export_run(run_dir, tmp_path / "m.onnx", step=3)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_export_a_trained_run_end_to_end(tmp_path):
    """synthetic Kaggle folder -> prepare -> train_and_evaluate (3 steps) -> export_run, with the run's
    own prepared validation images in the parity gate."""
    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare
    from imat.train_jax.config import TrainConfig
    from imat.train_jax.train import train_and_evaluate

    raw = write_synthetic(tmp_path / "raw", 40, seed=0, min_side=40, max_side=64, large_fraction=0.0)
    data_dir = prepare(raw, tmp_path / "prepared", image_size=32, workers=1, seed=0)
    config = TrainConfig(data_dir=str(data_dir), arch="resnet_tiny", image_size=32, batch_size=8, steps=3,
                         log_every=1, embedding_dim=32)
    train_and_evaluate(config, tmp_path / "run")
    report = export_run_report(tmp_path / "run", tmp_path / "model.onnx")
    assert report.parity.num_images == 8 + 6  # 8 prepared validation images + 6 random
    assert report.parity.max_relative < 1e-5, report.parity.describe()
    meta = read_metadata(report.path)
    assert meta.extra["checkpoint_step"] == "3" and meta.embedding_dim == 46 and meta.objective == "bce"
    assert meta.resize_mode == "stretch" and meta.embedding_source == "probabilities"
