"""End-to-end training on tiny synthetic data: every objective learns, runs resume exactly,
1 device == 2 devices, and a rerun refuses settings that break resume."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from imat.errors import ConfigError
from imat.train_jax.checkpoint import build_model, load_model_from_run
from imat.train_jax.config import TrainConfig
from imat.label_metrics import f1_from_counts as f1_scores
from imat.train_jax.metrics import retrieval_map_at_k
from imat.train_jax.train import train_and_evaluate

HERE = pathlib.Path(__file__).parent
RUNNER = HERE / "_train_subprocess.py"


def _rows(workdir, split):
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
            if json.loads(l)["split"] == split]


def _val_f1(model, prepared_data):
    from imat.data_tools.pipelines import PreparedSplit

    val = PreparedSplit.open(prepared_data, "validation")
    model.eval()
    out = model(val.images(np.arange(val.num_examples)))
    pred, truth = np.asarray(out["logits"]) >= 0, val.categories > 0.5
    return f1_scores((pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0))


def _params(run_dir):
    model, _ = load_model_from_run(run_dir)
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


@pytest.fixture(scope="module")
def bce_run(prepared_data, tmp_path_factory):
    config = TrainConfig(data_dir=str(prepared_data), arch="resnet_tiny", image_size=32, batch_size=16,
                         learning_rate=3e-3, steps=60, eval_every=30, checkpoint_every=30, log_every=5)
    workdir = tmp_path_factory.mktemp("bce_run")
    return config, workdir, train_and_evaluate(config, workdir)


def test_bce_learns_and_writes_run_files(bce_run, prepared_data):
    config, workdir, result = bce_run
    assert result["step"] == 60
    train = _rows(workdir, "train")
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    val = _rows(workdir, "val")
    assert [r["step"] for r in val] == [30, 60]
    assert {"f1_macro", "f1_micro", "map@10", "map@10_pooled", "loss"} <= set(val[-1])
    assert result["val"] == val[-1]
    # Macro/micro F1 of the trained model clearly above the untrained one (same seed, same images).
    trained = _val_f1(load_model_from_run(workdir)[0], prepared_data)
    untrained = _val_f1(build_model(config.to_dict()), prepared_data)
    assert trained["f1_micro"] > untrained["f1_micro"] + 0.2
    assert trained["f1_macro"] > untrained["f1_macro"] + 0.03
    # Run files: config with versions, curves, checkpoints at 30 and 60.
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["arch"] == "resnet_tiny" and saved["rotation_head"] is False
    assert {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "imat"} <= set(saved["versions"])
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["30", "60"]
    assert not list(workdir.glob(".*.tmp"))


def test_rerun_with_incompatible_settings_is_refused(bce_run):
    config, workdir, _ = bce_run
    for change in ({"arch": "resnet18"}, {"batch_size": 8}, {"objective": "triplet"}):
        bad = TrainConfig.from_dict({**config.to_dict(), **change})
        with pytest.raises(ConfigError, match=list(change)[0]):
            train_and_evaluate(bad, workdir)


def test_rerun_of_finished_run_resumes_without_training(bce_run):
    config, workdir, result = bce_run
    before = (workdir / "metrics.jsonl").read_text()
    again = train_and_evaluate(config, workdir)
    assert again["val"] == result["val"]
    assert (workdir / "metrics.jsonl").read_text() == before


def test_image_size_must_match_prepared_data(small_config, tmp_path):
    with pytest.raises(ConfigError, match="--image-size 64.*32 px"):
        train_and_evaluate(small_config(image_size=64), tmp_path)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "offline"])
def test_triplet_learns_without_collapse(small_config, tmp_path, mining):
    steps = 60 if mining == "batch_hard" else 30
    config = small_config(objective="triplet", mining=mining, steps=steps, eval_every=steps, log_every=1)
    result = train_and_evaluate(config, tmp_path)
    train = _rows(tmp_path, "train")
    val = result["val"]
    if mining == "semi_hard":
        # Its loss averages over the semi-hard triplets only, a set that gets harder as the model
        # learns, so it need not fall; learning shows in the triplet accuracy (about 0.5 untrained).
        assert val["triplet_accuracy"] > 0.65
    else:
        third = len(train) // 3  # per-step losses are noisy: compare the first and last thirds
        assert np.mean([r["loss"] for r in train[-third:]]) < np.mean([r["loss"] for r in train[:third]])
    # Not collapsed: unit embeddings stay spread (all-identical would give 0).
    assert val["mean_pairwise_distance"] > 0.3
    assert train[-1]["mean_pairwise_distance"] > 0.3
    if mining == "batch_hard":
        # Retrieval beats random ranking clearly (random embeddings, same labels, averaged).
        from imat.data_tools.pipelines import PreparedSplit

        cats = PreparedSplit.open(config.data_dir, "validation").categories
        rng = np.random.default_rng(0)
        random_map = np.mean([retrieval_map_at_k(rng.normal(size=(len(cats), 16)), cats) for _ in range(5)])
        assert val["map@10"] > random_map + 0.1
        assert val["triplet_accuracy"] > 0.6


def test_rotation_beats_chance(small_config, tmp_path):
    result = train_and_evaluate(small_config(objective="rotation", steps=40), tmp_path)
    train = _rows(tmp_path, "train")
    assert train[-1]["loss"] < 0.7 * train[0]["loss"]
    assert result["val"]["rotation_accuracy"] > 0.5  # chance is 0.25
    assert "map@10" in result["val"]
    _, config = load_model_from_run(tmp_path)
    assert config["rotation_head"] is True


def _run(config: TrainConfig, workdir, *, devices=1, delay=0.0, wait=True):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    cfg_path = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}.config.json"
    cfg_path.write_text(config.to_json())
    cmd = [sys.executable, str(RUNNER), str(cfg_path), str(workdir), str(delay)]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_two_devices_equal_one_device(small_config, tmp_path):
    config = small_config(steps=6, log_every=1, eval_every=6, checkpoint_every=6)
    one = _run(config, tmp_path / "one", devices=1)
    two = _run(config, tmp_path / "two", devices=2)
    assert one["devices"] == 1 and two["devices"] == 2
    loss1 = [r["loss"] for r in _rows(tmp_path / "one", "train")]
    loss2 = [r["loss"] for r in _rows(tmp_path / "two", "train")]
    assert len(loss1) == 6
    np.testing.assert_allclose(loss2, loss1, rtol=2e-5)
    # Parameters agree to a fraction of one Adam step (lr 3e-3): Adam's g/sqrt(v) turns the float
    # rounding differences of a 2-way all-reduce on near-zero gradients into visible but tiny updates.
    for a, b in zip(_params(tmp_path / "one"), _params(tmp_path / "two")):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-4)


def test_killed_run_resumes_to_identical_parameters(small_config, tmp_path):
    # With --ema: the averaged weights (what export reads) and the training weights both resume.
    config = small_config(steps=10, checkpoint_every=2, eval_every=10, log_every=1, ema=0.9)
    reference = train_and_evaluate(config, tmp_path / "reference")

    workdir = tmp_path / "killed"
    proc = _run(config, workdir, delay=0.4, wait=False)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            ckpts = workdir / "checkpoints"
            if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] < 10, steps  # killed mid-training

    resumed = train_and_evaluate(config, workdir)
    assert resumed["step"] == reference["step"] == 10
    for a, b in zip(_params(tmp_path / "reference"), _params(workdir)):
        np.testing.assert_array_equal(b, a)
    # The resumed run's log has one row per step, as if it had never been interrupted.
    assert [r["step"] for r in _rows(workdir, "train")] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in _rows(workdir, "train")],
                               [r["loss"] for r in _rows(tmp_path / "reference", "train")], rtol=1e-6)
    # The checkpoint serves the average; the training weights it resumes from are another state.
    serving, training = _checkpoint_states(config, workdir)
    for a, b in zip(_params(workdir), [np.asarray(x) for x in jax.tree.leaves(serving)]):
        np.testing.assert_array_equal(a, b)
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(nnx.filter_state(serving, nnx.Param)),
                                                   jax.tree.leaves(nnx.filter_state(training, nnx.Param)))]
    assert sum(moved) > len(moved) // 2


def _checkpoint_states(config: TrainConfig, workdir):
    """(serving model state, training model state) of a run's latest checkpoint, read as a resume does."""
    from imat.train_jax import sharding
    from imat.train_jax.checkpoint import CheckpointStore
    from imat.train_jax.train import init_model, restore, serving_state

    model = init_model(config, sharding.make_mesh(), config.steps)
    store = CheckpointStore(workdir, read_only=True)
    try:
        _, state = restore(store, model.state, workdir, None)
    finally:
        store.close()
    return serving_state(state), state[0]


def test_ema_step_follows_a_float64_loop(small_config):
    """The train step's parameter average equals d_t * ema + (1 - d_t) * params after each update,
    d_t = min(decay, (1 + t) / (10 + t)), computed in float64 from the recorded parameters."""
    import optax
    from flax import nnx as _nnx

    from imat.train_jax.objectives import get_objective
    from imat.train_jax.train import make_train_step, serving_state

    decay = 0.8
    model = build_model(small_config().to_dict())
    model.train()
    optimizer = _nnx.Optimizer(model, optax.adam(3e-3), wrt=_nnx.Param)
    step = make_train_step(_nnx.graphdef(model), _nnx.graphdef(optimizer), get_objective("bce").loss_and_metrics, {},
                           ema_decay=decay)
    params0 = _nnx.state(model, _nnx.Param)
    state = (_nnx.state(model), _nnx.state(optimizer), jax.tree.map(np.array, params0))
    reference = [np.asarray(x, np.float64) for x in jax.tree.leaves(params0)]
    rng = np.random.default_rng(0)
    for t in range(1, 6):
        batch = {"images": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
                 "categories": (rng.random((8, 46)) < 0.2).astype(np.float32)}
        state, _ = step(state, batch)
        d = min(decay, (1 + t) / (10 + t))
        params = [np.asarray(x, np.float64) for x in jax.tree.leaves(_nnx.filter_state(state[0], _nnx.Param))]
        reference = [d * r + (1 - d) * p for r, p in zip(reference, params)]
        got = [np.asarray(x, np.float64) for x in jax.tree.leaves(state[2])]
        for g, r in zip(got, reference):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    served = serving_state(state)
    for a, b in zip(jax.tree.leaves(_nnx.filter_state(served, _nnx.Param)), jax.tree.leaves(state[2])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # BatchNorm statistics are served as the model keeps them (no average).
    for a, b in zip(jax.tree.leaves(_nnx.filter_state(served, _nnx.BatchStat)), jax.tree.leaves(_nnx.filter_state(state[0], _nnx.BatchStat))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("objective", ["triplet", "bce_triplet"])
def test_metric_learning_stays_spread_on_real_photos(ccp_dev, tmp_path_factory, objective):
    # Real street photos (ccp-dev), where batch-hard mining once collapsed: the embeddings of a short
    # run with the default (semi-hard) mining stay spread on held-out photos.
    from imat.data_tools.tfds_builder import prepare

    root = tmp_path_factory.getbasetemp() / "ccp32"
    data = prepare(ccp_dev, root, image_size=32, workers=2)
    config = TrainConfig(data_dir=str(data), arch="resnet_tiny", objective=objective, image_size=32, batch_size=32,
                         learning_rate=3e-3, steps=40, log_every=10, eval_every=40, augment=True)
    result = train_and_evaluate(config, tmp_path_factory.mktemp(objective))
    assert result["val"]["mean_pairwise_distance"] > 0.5, result["val"]
    assert result["train"]["mean_pairwise_distance"] > 0.5
