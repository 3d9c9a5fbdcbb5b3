"""Fixtures for the export tests: tiny models with randomised weights and BatchNorm statistics."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.fixture
def make_model():
    """make_model(name, seed=0, **create_model_kwargs) -> randomised model (train mode, as created)."""
    from imat.train_jax.models import create_model

    def _make(name: str = "resnet_tiny", seed: int = 0, **kwargs):
        return randomize(create_model(name, rngs=nnx.Rngs(seed), **kwargs), seed)

    return _make


@pytest.fixture(scope="session")
def category_names():
    from imat.data_tools.labels import LabelSpace

    return list(LabelSpace.default().category_names)
