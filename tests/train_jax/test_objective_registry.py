"""The objective registry end to end: a new objective is one spec (trained and exported without
touching another file), every objective's exported embedding is what its training changes,
--init-from / --freeze-backbone, divergence, and the resize mode travelling into model.onnx."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flax import nnx

from imat.errors import ModelError
from imat.export.onnx_export import export_run, export_run_report
from imat.train_jax import sharding
from imat.train_jax.checkpoint import load_model_from_run
from imat.train_jax.init_from import is_head_path
from imat.train_jax.objectives import ObjectiveSpec, get_objective, objective_names, register, unregister
from imat.train_jax.train import init_model, train_and_evaluate


def _embed(model_path, images):
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"images": images})[0]


def _images(prepared_data, n=8):
    from imat.data_tools.prepared import PreparedSplit

    return PreparedSplit.open(prepared_data, "validation").images(np.arange(n))


def _flat(state):
    return {tuple(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _toy_loss(outputs, batch):
    """Pull the first embedding coordinate towards 'has category 0': trains the embedding head only."""
    target = batch["categories"][:, 0] * 2.0 - 1.0
    loss = jnp.mean((outputs["embedding"][:, 0] - 0.5 * target) ** 2)
    return loss, {"loss": loss, "toy_error": loss}


@pytest.fixture
def toy_objective():
    spec = register(ObjectiveSpec(name="toy", help="a test objective", loss_and_metrics=_toy_loss,
                                  pipeline="classification", embedding_source="embedding",
                                  trains=frozenset({"pooled", "embedding"}), curve_metrics=("loss", "toy_error")))
    yield spec
    unregister("toy")


def test_a_registered_objective_trains_and_exports(toy_objective, small_config, tmp_path):
    assert "toy" in objective_names()
    result = train_and_evaluate(small_config(objective="toy", steps=6, log_every=3), tmp_path / "run")
    assert {"loss", "toy_error", "map@10", "map@10_pooled"} <= set(result["val"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["objective"] == "toy" and saved["retrieval_output"] == "embedding"
    report = export_run_report(tmp_path / "run", tmp_path / "toy.onnx")
    assert report.outputs == ("embedding",)  # the toy does not train the classifier: no probabilities
    meta = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    assert meta["objective"] == "toy" and meta["embedding_source"] == "embedding" and meta["embedding_dim"] == "128"


@pytest.mark.parametrize("objective", ["bce", "triplet", "rotation", "bce_triplet"])
def test_the_exported_embedding_is_what_training_changes(objective, small_config, prepared_data, tmp_path):
    assert objective in objective_names()
    run = tmp_path / objective
    train_and_evaluate(small_config(objective=objective, steps=4, checkpoint_every=1, log_every=2,
                                    learning_rate=1e-2, keep_checkpoints=5), run)
    early = export_run(run, tmp_path / "early.onnx", step=1)
    late = export_run(run, tmp_path / "late.onnx", step=4)
    images = _images(prepared_data)
    a, b = _embed(early, images), _embed(late, images)
    spec = get_objective(objective)
    assert a.shape == b.shape and a.shape[1] == {"embedding": 128, "pooled": 64, "probabilities": 46}[spec.embedding_source]
    assert np.abs(a - b).max() > 1e-3, f"{objective}: training did not change the served embedding"
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)


@pytest.fixture(scope="module")
def rotation_run(prepared_data, tmp_path_factory):
    from imat.train_jax.config import TrainConfig

    run = tmp_path_factory.mktemp("rotation") / "run"
    train_and_evaluate(TrainConfig(data_dir=str(prepared_data), arch="resnet_tiny", image_size=32, batch_size=16,
                                   learning_rate=3e-3, objective="rotation", steps=4, log_every=2), run)
    return run


def test_init_from_restores_exactly_the_backbone(rotation_run, small_config):
    config = small_config(objective="bce", init_from=str(rotation_run))
    config.validate()
    mesh = sharding.make_mesh()
    started = _flat(init_model(config, mesh, 10).state[0])
    source = _flat(nnx.state(load_model_from_run(rotation_run)[0]))
    fresh = _flat(init_model(small_config(objective="bce"), mesh, 10).state[0])
    backbone = [k for k in started if not is_head_path(k)]
    assert backbone and all(np.array_equal(started[k], source[k]) for k in backbone)
    assert any(not np.array_equal(started[k], fresh[k]) for k in backbone)  # really copied, not the same init
    # Heads of matching shape come along; the rotation head has no counterpart in a bce model.
    assert not any(k[0] == "rotation_head" for k in started)
    assert all(np.array_equal(started[k], source[k]) for k in started if k[0] == "embedding_head")


def test_init_from_refuses_another_architecture(rotation_run, small_config):
    from imat.errors import ConfigError

    with pytest.raises(ConfigError, match="--init-from .*backbone"):
        init_model(small_config(objective="bce", arch="resnet18", init_from=str(rotation_run)), sharding.make_mesh(), 1)


def test_freeze_backbone_trains_only_the_heads(rotation_run, small_config, tmp_path):
    run = tmp_path / "probe"
    train_and_evaluate(small_config(objective="bce", init_from=str(rotation_run), freeze_backbone=True, steps=4,
                                    learning_rate=1e-2, log_every=2), run)
    after = _flat(nnx.state(load_model_from_run(run)[0]))
    source = _flat(nnx.state(load_model_from_run(rotation_run)[0]))
    backbone = [k for k in after if not is_head_path(k)]
    assert all(np.array_equal(after[k], source[k]) for k in backbone)  # weights AND BatchNorm statistics
    assert not np.array_equal(after[("fc", "kernel")], source[("fc", "kernel")])


def test_a_diverging_run_stops_and_cannot_be_exported(small_config, tmp_path):
    run = tmp_path / "diverged"
    with pytest.raises(ModelError, match="diverged"):
        train_and_evaluate(small_config(objective="bce", learning_rate=1e6, steps=20, log_every=1,
                                        checkpoint_every=1), run)
    # No checkpoint holds non-finite parameters.
    for step_dir in (run / "checkpoints").glob("[0-9]*"):
        model, _ = load_model_from_run(run, step=int(step_dir.name))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))
    if list((run / "checkpoints").glob("[0-9]*")):
        with pytest.raises(ModelError, match="diverged"):
            export_run(run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_resize_mode_travels_from_the_dataset_into_model_onnx(tmp_path):
    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare
    from imat.train_jax.config import TrainConfig

    raw = write_synthetic(tmp_path / "raw", 40, seed=3, min_side=48, max_side=96, large_fraction=0.0)
    data = prepare(raw, tmp_path / "prepared", image_size=32, resize_mode="letterbox", workers=1)
    config = TrainConfig(data_dir=str(data), arch="resnet_tiny", image_size=32, batch_size=8, steps=2, log_every=1)
    train_and_evaluate(config, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resize_mode"] == "letterbox"
    model = export_run(tmp_path / "run", tmp_path / "m.onnx")
    meta = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert meta["resize_mode"] == "letterbox"
    # The engine decodes queries as training did.
    from imat.engine import Engine

    assert Engine(model).metadata.resize_mode == "letterbox"
    # A run that claims another mode than its dataset's is refused.
    from imat.errors import ConfigError

    with pytest.raises(ConfigError, match="resize mode 'center_crop' does not match"):
        train_and_evaluate(dataclasses.replace(config, resize_mode="center_crop"), tmp_path / "r2")
