"""Steps/s of a two-process jax.distributed training run vs one process, on this machine.

Both runs train resnet_tiny on the same synthetic prepared dataset with the same global batch
(the two-process run reads one data shard per process; the baseline reads both shards, so the
batches are identical). The rate is taken from metrics.jsonl (``images_per_s`` of the log windows
after the first, which holds the compiles), divided by the global batch. On one machine both
processes share its cores, so the ratio is the overhead of the multi-host machinery (gloo
all-reduce over TCP on 127.0.0.1, one process per device) and not a speed-up.

    python benchmarks/multihost.py                  # 40 steps, batch 32, 32 px
    python benchmarks/multihost.py --steps 60 --batch 64 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

RUN = """
import sys
from imat.train_jax.config import TrainConfig
from imat.train_jax.train import train_and_evaluate
train_and_evaluate(TrainConfig.from_json(sys.argv[1]), sys.argv[2])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(
    config_path: pathlib.Path, workdirs: list[pathlib.Path], timeout_s: float
) -> float:
    """Wall seconds of one run over len(workdirs) processes (process i writes to workdirs[i])."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    t0 = time.perf_counter()
    for pid, workdir in enumerate(workdirs):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
        )
        if len(workdirs) > 1:
            env.update(
                JAX_COORDINATOR_ADDRESS=address,
                JAX_NUM_PROCESSES=str(len(workdirs)),
                JAX_PROCESS_ID=str(pid),
            )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RUN, str(config_path), str(workdir)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        for pid, proc in enumerate(procs):
            _, err = proc.communicate(timeout=timeout_s)
            if proc.returncode:
                raise SystemExit(f"process {pid} failed:\n{err[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return time.perf_counter() - t0


def _steps_per_s(workdir: pathlib.Path, batch: int) -> float:
    rows = [
        json.loads(line)
        for line in (workdir / "metrics.jsonl").read_text().splitlines()
    ]
    rates = [r["images_per_s"] for r in rows if r["split"] == "train"][
        1:
    ]  # the first window holds the compiles
    return float(np.median(rates)) / batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--arch", default="resnet_tiny")
    parser.add_argument("--timeout-s", type=float, default=900)
    args = parser.parse_args()

    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare
    from imat.train_jax.config import TrainConfig

    root = pathlib.Path(tempfile.mkdtemp(prefix="imat-multihost-"))
    raw = write_synthetic(
        root / "raw", 400, seed=0, min_side=48, max_side=96, large_fraction=0.0
    )
    data = prepare(raw, root / "prepared", image_size=args.size, workers=1, seed=0)
    config = TrainConfig(
        data_dir=str(data),
        arch=args.arch,
        image_size=args.size,
        batch_size=args.batch,
        steps=args.steps,
        log_every=max(1, args.steps // 8),
        eval_every=args.steps,
        checkpoint_every=args.steps,
        data_shards=2,
    )
    config_path = root / "config.json"
    config_path.write_text(config.to_json())

    wall1 = _run(config_path, [root / "one"], args.timeout_s)
    (root / "two-1").mkdir()
    wall2 = _run(config_path, [root / "two", root / "two-1"], args.timeout_s)
    one, two = (
        _steps_per_s(root / "one", args.batch),
        _steps_per_s(root / "two", args.batch),
    )
    print(
        f"{args.arch} {args.size}px, global batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores"
    )
    print(
        f"1 process  : {one:7.2f} steps/s  (whole run incl. start and compiles {wall1:6.1f} s)"
    )
    print(
        f"2 processes: {two:7.2f} steps/s  (whole run incl. start and compiles {wall2:6.1f} s)"
    )
    print(
        f"ratio 2 processes / 1 process: {two / one:.2f} steps/s, {wall2 / wall1:.2f} wall time"
    )


if __name__ == "__main__":
    main()
