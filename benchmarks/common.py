"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import time

import numpy as np


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one warm-up call (compile, allocate)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def train_step_rate(arch: str, image_size: int, batch_size: int, repeats: int = 5, objective: str = "bce",
                    configure=None):
    """(images/s of imat's jitted train step, the trained model): what the input pipeline must keep up with.

    `configure(model)` runs before the step is traced (e.g. to force a conv formulation)."""
    import jax
    import optax
    from flax import nnx

    from imat.train_jax.models import create_model
    from imat.train_jax.objectives import get_objective
    from imat.train_jax.train import make_train_step

    model = create_model(arch, rngs=nnx.Rngs(0))
    if configure is not None:
        configure(model)
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(5e-4), wrt=nnx.Param)
    step = make_train_step(nnx.graphdef(model), nnx.graphdef(optimizer), get_objective(objective).loss_and_metrics, {})
    rng = np.random.default_rng(0)
    batch = {
        "images": jax.device_put(rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)),
        "categories": jax.device_put((rng.random((batch_size, 46)) < 0.1).astype(np.float32)),
    }
    holder = {"state": (nnx.state(model), nnx.state(optimizer))}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    seconds = median_seconds(run, repeats)
    nnx.update(model, holder["state"][0])
    model.eval()
    return batch_size / seconds, model
