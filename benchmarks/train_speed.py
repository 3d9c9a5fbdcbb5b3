"""CPU train-step images/s: imat (standard convolutions and imat's CPU formulations) vs PyTorch,
interleaved in one run, plus the input pipeline's images/s beside them.

    python benchmarks/train_speed.py [--models resnet18,mobilenet_v2,resnet50] [--sizes 64,128,224]
                                     [--torch-python /path/to/venv/bin/python] [--rounds 5]

One train step = forward + backward + Adam on a batch of random images and 46 multi-hot labels
(BCE), the same for both frameworks. imat's step is the trainer's own jitted ``make_train_step``;
"lax" forces XLA's convolution everywhere, "auto" is what training uses (imat's CPU
formulations: Winograd F(4x4) for stride-1 3x3 convs on maps >= 4, im2col products, tap sums for tiny
maps, shifted depthwise). Like the ``imat`` command, the script re-executes itself with glibc's
huge-page malloc tunable (``imat.hugepages``; ``IMAT_HUGEPAGES=0`` measures without), and the
PyTorch worker inherits the same environment. PyTorch runs
torchvision's model of the same name in a separate process (``--torch-python``: a Python with
torch + torchvision, since the project never installs torch; default ``$IMAT_TORCH_PYTHON`` or this
Python when it imports torch) with ``torch.set_num_threads(cores)``, NCHW as a PyTorch user gets
by default, and ``channels_last`` as the tuned variant. The script says when torch is absent.

The machine may be shared: every configuration is timed in ``--rounds`` rounds that alternate
the variants (a few steps each), and the table gives each variant's best round, so a burst of
load elsewhere hits all variants alike instead of one. Ratios are within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from imat.hugepages import hugepages_status, reexec_with_hugepages

TORCH_WORKER = r"""
import json, sys, time
import torch, torchvision
torch.set_num_threads(int(sys.argv[1]))
models = {}
print(json.dumps({"ready": torch.__version__, "torchvision": torchvision.__version__}), flush=True)
for line in sys.stdin:
    arch, size, batch, timed, fmt = line.split()
    size, batch, timed = int(size), int(batch), int(timed)
    steps = timed
    key = (arch, size, batch, fmt)
    if key not in models:
        m = getattr(torchvision.models, arch)(num_classes=46)
        x = torch.randn(batch, 3, size, size)
        if fmt == "channels_last":
            m, x = m.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        m.train()
        opt = torch.optim.Adam(m.parameters(), 5e-4)
        y = (torch.rand(batch, 46) < 0.1).float()
        models.clear()  # one model in memory at a time
        models[key] = (m, opt, x, y)
        steps += 1  # the first step allocates: not timed below
    m, opt, x, y = models[key]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(m(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"seconds": times[-timed:]}), flush=True)
"""


class TorchWorker:
    """A long-lived PyTorch process that times train steps on request (stdin/stdout JSON lines)."""

    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen([python, "-c", TORCH_WORKER, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.versions = json.loads(self.proc.stdout.readline())

    def seconds(self, arch: str, size: int, batch: int, steps: int, fmt: str) -> list[float]:
        self.proc.stdin.write(f"{arch} {size} {batch} {steps} {fmt}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker died on {arch} {size}px {fmt}")
        return json.loads(line)["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def find_torch_python(explicit: str | None) -> str | None:
    candidates = [explicit, os.environ.get("IMAT_TORCH_PYTHON"), sys.executable]
    for python in filter(None, candidates):
        ok = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True, check=False).returncode == 0
        if ok:
            return python
        if python == explicit:
            raise SystemExit(f"--torch-python {python}: cannot import torch and torchvision there")
    return None


def imat_steps(arch: str, size: int, batch: int, impls: tuple[str, ...]):
    """{impl: (compiled step, [state], batch)} for imat's trainer step with each conv formulation."""
    import jax
    import optax
    from flax import nnx

    from imat.train_jax.models import create_model
    from imat.train_jax.models.layers import set_conv_impl
    from imat.train_jax.objectives import get_objective
    from imat.train_jax.train import make_train_step

    rng = np.random.default_rng(0)
    data = {
        "images": jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)),
        "categories": jax.device_put((rng.random((batch, 46)) < 0.1).astype(np.float32)),
    }
    steps = {}
    for impl in impls:
        model = create_model(arch, rngs=nnx.Rngs(0))
        set_conv_impl(model, impl)
        model.train()
        optimizer = nnx.Optimizer(model, optax.adam(5e-4), wrt=nnx.Param)
        step = make_train_step(nnx.graphdef(model), nnx.graphdef(optimizer), get_objective("bce").loss_and_metrics, {})
        state = (nnx.state(model), nnx.state(optimizer))
        t = time.perf_counter()
        compiled = step.lower(state, data).compile()
        state, metrics = compiled(state, data)  # first call allocates: not timed
        jax.block_until_ready(metrics["loss"])
        steps[impl] = (compiled, [state], data, time.perf_counter() - t)
    return steps


def time_imat(entry, steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` steps, after ``warmup`` untimed ones: the first steps after
    another variant ran are up to 2x slower (resnet18 128 px: 1.06-1.11 s, then 0.53-0.55 s;
    resnet50: 1.8 s, once 2.4 s next, then 1.40-1.45 s; presumably re-faulting memory the other step's buffers
    took, not verified), which a training run, one step function over and over, never pays.
    PyTorch's worker likewise runs an untimed step after each switch."""
    import jax

    compiled, holder, data, _ = entry
    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        holder[0], metrics = compiled(holder[0], data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    return times[warmup:]


def pipeline_rate(size: int, batch: int, work: pathlib.Path, steps: int = 20) -> float:
    """images/s of the classification pipeline (augment on) from a prepared synthetic dataset."""
    import tensorflow_datasets as tfds

    from imat.data_tools import tfds_builder
    from imat.data_tools.pipelines import PreparedSplit, make_pipeline
    from imat.data_tools.synthetic import write_synthetic

    tfds.disable_progress_bar()

    root = work / "synthetic"
    if not root.exists():
        write_synthetic(root, 96, seed=0)
    data_dir = tfds_builder.prepare(root, work / f"prepared{size}", image_size=size)
    source = make_pipeline("classification", PreparedSplit.open(data_dir, "train", cache=True),
                           batch_size=batch, seed=0, augment=True)
    source.batch(0)
    t = time.perf_counter()
    for s in range(1, steps + 1):
        source.batch(s)
    return steps * batch / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v2,resnet50")
    ap.add_argument("--sizes", default="64,128,224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds per configuration")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant per round, after the switch")
    ap.add_argument("--torch-python", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-lax", action="store_true", help="skip the standard-convolution variant")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if argv is None:  # as the imat command does (imat.hugepages); the PyTorch worker inherits it
        reexec_with_hugepages([__file__, *sys.argv[1:]])

    import jax

    torch_python = find_torch_python(args.torch_python)
    worker = TorchWorker(torch_python, args.threads) if torch_python else None
    load = os.getloadavg()[0]
    print(f"jax {jax.__version__} backend={jax.default_backend()}, {os.cpu_count()} CPUs, batch {args.batch}, "
          f"load {load:.1f}; {hugepages_status()}; " + (f"torch {worker.versions['ready']} torchvision {worker.versions['torchvision']} "
                                  f"({torch_python}, {args.threads} threads)" if worker else
                                  "PyTorch ABSENT (pass --torch-python or set IMAT_TORCH_PYTHON): imat rows only"))
    impls = ("auto",) if args.no_lax else ("lax", "auto")
    header = (f"{'model':<14}{'px':>5}{'lax':>8}{'imat':>8}{'torch':>8}{'torch CL':>10}{'imat/torch':>12}"
              f"{'imat/CL':>9}{'imat/lax':>10}{'pipeline':>10}   images/s (best round)")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory(prefix="imat-train-speed-") as tmp:
        for size in [int(s) for s in args.sizes.split(",")]:
            feed = pipeline_rate(size, args.batch, pathlib.Path(tmp))
            for arch in args.models.split(","):
                steps = imat_steps(arch, size, args.batch, impls)
                best: dict[str, float] = {}
                for _ in range(args.rounds):
                    for impl, entry in steps.items():
                        best[impl] = max(best.get(impl, 0.0), args.batch / np.median(time_imat(entry, args.steps, args.warmup)))
                    if worker:
                        for fmt in ("contiguous", "channels_last"):
                            secs = worker.seconds(arch, size, args.batch, args.steps, fmt)
                            best[fmt] = max(best.get(fmt, 0.0), args.batch / float(np.median(secs)))
                del steps
                t, cl = best.get("contiguous"), best.get("channels_last")
                row = {"model": arch, "size": size, "lax": best.get("lax"), "imat": best["auto"], "torch": t,
                       "torch_channels_last": cl, "pipeline": feed, "load": os.getloadavg()[0]}
                rows.append(row)

                def fmt_(v, w=8, p=1):
                    return f"{v:>{w}.{p}f}" if v else f"{'-':>{w}}"

                print(f"{arch:<14}{size:>5}{fmt_(best.get('lax'))}{fmt_(best['auto'])}{fmt_(t)}{fmt_(cl, 10)}"
                      f"{fmt_(t and best['auto'] / t, 11, 2)}x{fmt_(cl and best['auto'] / cl, 8, 2)}x"
                      f"{fmt_(best.get('lax') and best['auto'] / best['lax'], 9, 2)}x{feed:>10.0f}", flush=True)
    if worker:
        worker.close()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
