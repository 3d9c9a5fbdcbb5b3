"""Fixtures for the export tests: tiny models with randomised weights and BatchNorm statistics."""

from __future__ import annotations

import pytest
from export_helpers import make_run, randomize
from flax import nnx


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


@pytest.fixture(scope="module")
def bce_run(tmp_path_factory):
    """(run_dir, {step: model}) for a resnet_tiny bce run at 32 px with checkpoints 2 and 5."""
    run_dir = tmp_path_factory.mktemp("run") / "bce"
    return run_dir, make_run(run_dir)
