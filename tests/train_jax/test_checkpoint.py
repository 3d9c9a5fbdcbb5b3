"""Checkpoint save/restore, keep-last-N, corrupt-latest fallback, load_model_from_run."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from imat.errors import ModelError
from imat.train_jax.checkpoint import CheckpointStore, load_model_from_run
from imat.train_jax.config import TrainConfig
from imat.train_jax.models import create_model


def _model_and_opt(seed=0, arch="resnet_tiny"):
    model = create_model(arch, rngs=nnx.Rngs(seed))
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def _perturbed(state, delta):
    return jax.tree.map(lambda x: x + delta if np.issubdtype(np.asarray(x).dtype, np.floating) else x, state)


def _save_run(tmp_path, steps=(1, 2, 3), keep=2):
    model, opt = _model_and_opt()
    ms, os_ = nnx.state(model), nnx.state(opt)
    store = CheckpointStore(tmp_path, keep=keep)
    for s in steps:
        store.save(s, _perturbed(ms, float(s)), os_, {"seed": 0})
    return store, ms, os_


def test_save_keeps_last_and_restores_latest(tmp_path):
    store, ms, os_ = _save_run(tmp_path)
    assert store.all_steps() == [2, 3]
    step, model_state, opt_state, meta = store.restore_latest(ms, os_)
    assert step == 3 and meta["step"] == 3 and meta["seed"] == 0
    for got, want in zip(_leaves(model_state), _leaves(_perturbed(ms, 3.0))):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_leaves(opt_state), _leaves(os_)):
        np.testing.assert_array_equal(got, want)
    # The template is not modified by a restore.
    for got, want in zip(_leaves(ms), _leaves(nnx.state(_model_and_opt()[0]))):
        np.testing.assert_array_equal(got, want)
    # No temporary directories left behind: writes were renamed into place.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()) == ["2", "3"]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    store, ms, os_ = _save_run(tmp_path)
    latest = tmp_path / "checkpoints" / "3" / "model"
    files = [p for p in latest.rglob("*") if p.is_file()]
    assert files
    for p in files:
        if damage == "truncate":
            data = p.read_bytes()
            p.write_bytes(data[: len(data) // 3])
        else:
            p.unlink()
    store = CheckpointStore(tmp_path, keep=2)  # a fresh process would open the directory anew
    with caplog.at_level(logging.WARNING, logger="imat.train_jax.checkpoint"):
        step, model_state, _, _ = store.restore_latest(ms, os_)
    assert step == 2
    for got, want in zip(_leaves(model_state), _leaves(_perturbed(ms, 2.0))):
        np.testing.assert_array_equal(got, want)
    assert "unreadable" in caplog.text and "3" in caplog.text
    # The damaged step was moved aside, so training can save step 3 again.
    assert store.all_steps() == [2]
    assert list((tmp_path / "checkpoints_corrupt").iterdir())
    store.save(3, ms, os_, {})
    assert store.restore_latest(ms, os_)[0] == 3


def test_load_model_from_run(tmp_path):
    model, opt = _model_and_opt(seed=5)
    config = TrainConfig(data_dir="x", arch="resnet_tiny", seed=1)
    (tmp_path / "config.json").write_text(config.to_json())
    CheckpointStore(tmp_path).save(7, nnx.state(model), nnx.state(opt), {})
    loaded, cfg = load_model_from_run(tmp_path)
    assert cfg["arch"] == "resnet_tiny" and cfg["checkpoint_step"] == 7
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    model.eval()
    want = model(images)
    got = loaded(images)  # eval mode: running averages, so outputs match exactly
    np.testing.assert_allclose(np.asarray(got["embedding"]), np.asarray(want["embedding"]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ModelError, match="step 9"):
        load_model_from_run(tmp_path, step=9)


class _DropoutNet(nnx.Module):
    """Like mobilenet_v2's classifier: a Dropout that owns RNG state (typed PRNG keys)."""

    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.linear(x))


def test_model_rng_state_round_trips(tmp_path):
    model = _DropoutNet(nnx.Rngs(0))
    model(np.ones((1, 3), np.float32))  # advance the RNG counter so the saved state is not the initial one
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    store = CheckpointStore(tmp_path)
    store.save(1, nnx.state(model), nnx.state(opt), {})
    step, ms, _, _ = store.restore_latest(nnx.state(model), nnx.state(opt))
    keys = [x for x in jax.tree.leaves(ms) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    want = [x for x in jax.tree.leaves(nnx.state(model)) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]
    assert step == 1 and keys and len(keys) == len(want)
    for got, exp in zip(keys, want):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(exp))
    fresh = _DropoutNet(nnx.Rngs(0))
    nnx.update(fresh, ms)
    x = np.ones((4, 3), np.float32)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))  # same dropout masks


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model_from_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(data_dir="x", arch="resnet_tiny").to_dict()))
    with pytest.raises(ModelError, match="no checkpoint"):
        load_model_from_run(tmp_path)


def test_a_non_finite_checkpoint_is_skipped_on_resume(tmp_path, caplog):
    # A checkpoint left by an older imat (or a diverged run) with NaN parameters: resuming takes the
    # previous finite one and says why, instead of continuing from NaN.
    model, opt = _model_and_opt()
    ms, os_ = nnx.state(model), nnx.state(opt)
    store = CheckpointStore(tmp_path, keep=3)
    store.save(1, _perturbed(ms, 1.0), os_, {"seed": 0})
    store.save(2, _perturbed(ms, float("nan")), os_, {"seed": 0})
    with caplog.at_level(logging.WARNING):
        step, model_state, _, _ = store.restore_latest(ms, os_)
    assert step == 1 and all(np.isfinite(x).all() for x in _leaves(model_state) if x.dtype.kind == "f")
    assert "non-finite" in caplog.text and "/2" in caplog.text
