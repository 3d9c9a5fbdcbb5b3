"""Multi-host training for real: two local CPU processes joined by jax.distributed (gloo collectives,
coordinator on 127.0.0.1) train the same steps as one process reading both data shards, only
process 0 writes, and the two-process checkpoint resumes in one process on the same trajectory."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from imat.train_jax.checkpoint import load_model_from_run
from imat.train_jax.train import train_and_evaluate

RUNNER = pathlib.Path(__file__).parent / "_train_subprocess.py"
TIMEOUT_S = 400


def _gloo_available() -> bool:
    try:
        from jax._src.lib import _jax
    except ImportError:
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(
    not _gloo_available(), reason="this jaxlib has no gloo CPU collectives"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(
    config_path: pathlib.Path, workdirs: list[pathlib.Path]
) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for pid, workdir in enumerate(workdirs):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_COORDINATOR_ADDRESS=address,
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(RUNNER), str(config_path), str(workdir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def _wait_all(procs: list[subprocess.Popen]) -> list[dict]:
    """Each process's RESULT line; every process is killed if one fails or runs past the timeout."""
    results = []
    try:
        for pid, proc in enumerate(procs):
            out, err = proc.communicate(timeout=TIMEOUT_S)
            assert proc.returncode == 0, f"process {pid} failed:\n{err[-3000:]}"
            line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
            results.append(json.loads(line[len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=60)
    return results


def _params(run_dir, step):
    model, _ = load_model_from_run(run_dir, step=step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _losses(workdir):
    rows = [
        json.loads(l)
        for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    ]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def test_two_processes_train_like_one_and_resume_in_one(small_config, tmp_path):
    steps, resumed_steps = 4, 6
    config = small_config(
        steps=steps, log_every=1, eval_every=steps, checkpoint_every=2
    )
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json())
    main_dir, other_dir = tmp_path / "process0", tmp_path / "process1"
    other_dir.mkdir()  # process 1's own view: it must stay empty (no shared file system needed)
    procs = _launch_two_processes(config_path, [main_dir, other_dir])

    # Meanwhile, the reference: one process reading both data shards (the same global batches).
    reference = tmp_path / "reference"
    try:
        train_and_evaluate(
            small_config(
                steps=resumed_steps,
                log_every=1,
                eval_every=resumed_steps,
                checkpoint_every=2,
                keep_checkpoints=5,
                data_shards=2,
            ),
            reference,
        )
    finally:
        results = _wait_all(procs)
    assert [r["devices"] for r in results] == [2, 2]
    assert (
        results[0]["val"] == results[1]["val"]
    )  # every process computes the same evaluation

    # (b) Only process 0 wrote; its checkpoints hold process 0's files alone.
    assert list(other_dir.iterdir()) == []
    assert {p.name for p in main_dir.iterdir()} == {
        "config.json",
        "metrics.jsonl",
        "curves.png",
        "checkpoints",
    }
    assert sorted(p.name for p in (main_dir / "checkpoints").iterdir()) == ["2", "4"]
    assert not [
        p for p in (main_dir / "checkpoints").rglob("*") if "process_1" in p.name
    ]
    assert json.loads((main_dir / "config.json").read_text())["data_shards"] == 2

    # (a) The same losses and parameters as the single-process run with the same global batch
    # (to float tolerance: a 2-way all-reduce sums in another order; see test_two_devices_equal_one_device).
    two, one = _losses(main_dir), _losses(reference)
    assert sorted(two) == list(range(1, steps + 1))
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in two], rtol=2e-5)
    for a, b in zip(_params(reference, steps), _params(main_dir, steps)):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-4)

    # (c) One process resumes the two-process checkpoint and continues on the reference's batches.
    resumed = train_and_evaluate(
        small_config(
            steps=resumed_steps,
            log_every=1,
            eval_every=resumed_steps,
            checkpoint_every=2,
        ),
        main_dir,
    )
    assert resumed["step"] == resumed_steps
    assert (
        json.loads((main_dir / "config.json").read_text())["data_shards"] == 2
    )  # kept from the first launch
    two = _losses(main_dir)
    assert sorted(two) == list(range(1, resumed_steps + 1))
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in two], rtol=5e-5)
    for a, b in zip(
        _params(reference, resumed_steps), _params(main_dir, resumed_steps)
    ):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-4)
