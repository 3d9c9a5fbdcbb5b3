"""Helpers shared by the export tests (imported by conftest.py and test modules)."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def randomize(model: nnx.Module, seed: int = 0) -> nnx.Module:
    """Random BatchNorm running stats/affine and Linear biases, so a wrong fold or epsilon shows."""
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            n = module.mean.get_value().shape[0]
            module.mean.set_value(rng.normal(0.0, 0.5, n).astype(np.float32))
            module.var.set_value(rng.uniform(0.3, 2.0, n).astype(np.float32))
            module.scale.set_value(rng.uniform(0.5, 1.5, n).astype(np.float32))
            module.bias.set_value(rng.normal(0.0, 0.3, n).astype(np.float32))
        elif isinstance(module, nnx.Linear) and module.bias is not None:
            n = module.bias.get_value().shape[0]
            module.bias.set_value(rng.normal(0.0, 0.5, n).astype(np.float32))
    return model


def random_resnet(name: str, seed: int = 0, **kwargs) -> nnx.Module:
    """A ResNet from create_model with every weight drawn in numpy (He-normal convs, small Linear).

    ``nnx.eval_shape`` builds the module structure without running JAX initialisers (which
    compile once per distinct shape: ~20 s for ResNet50 on a shared 2-core CI box); the values
    are then filled in here. ResNets hold nothing but Params and BatchStats, which is checked.
    """
    from imat.train_jax.models import create_model

    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(seed), **kwargs))
    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Conv):
            shape = module.kernel.get_value().shape
            module.kernel.set_value(rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape).astype(np.float32))
        elif isinstance(module, nnx.Linear):
            shape = module.kernel.get_value().shape
            module.kernel.set_value(rng.normal(0, np.sqrt(1 / shape[0]), shape).astype(np.float32))
    randomize(model, seed)  # BatchNorm statistics/affine and Linear biases
    left = [p for p, v in nnx.to_flat_state(nnx.state(model)) if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    assert not left, f"variables left abstract: {left[:3]}"
    return model


def make_run(run_dir, *, objective: str = "bce", arch: str = "resnet_tiny", image_size: int = 32,
             steps: tuple[int, ...] = (2, 5), seed: int = 0) -> dict[int, nnx.Module]:
    """A training-run directory written by train_jax's own config and CheckpointStore.

    Each step holds different (randomised) weights; returns {step: model at that step} so a
    test can check that export restores the right one. (No training: export only needs the
    checkpoint format, and a real training loop would cost minutes here.)
    """
    import json
    import pathlib

    import optax

    from imat.train_jax.checkpoint import CheckpointStore, build_model
    from imat.train_jax.config import TrainConfig

    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(data_dir=str(run_dir / "prepared"), arch=arch, objective=objective,
                         image_size=image_size, embedding_dim=16, steps=max(steps), seed=seed).to_dict()
    (run_dir / "config.json").write_text(json.dumps(config))
    store = CheckpointStore(run_dir)
    models = {}
    try:
        for step in steps:
            model = randomize(build_model(config), seed + step)
            optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
            store.save(step, nnx.state(model), nnx.state(optimizer), {"config": config})
            models[step] = model
    finally:
        store.close()
    return models
