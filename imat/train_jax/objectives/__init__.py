"""Training objectives, chosen by name.

Each objective is a pure, jit-able function
``loss_and_metrics(outputs, batch, **cfg) -> (scalar loss, metrics dict)``:
``outputs`` is the model's dict of named outputs, ``batch`` the pipeline's batch
dict. Metrics are scalars, except count vectors (e.g. per-class TP/FP/FN) that
:mod:`imat.train_jax.metrics` sums exactly over many batches.
"""

from __future__ import annotations

from typing import Callable

from imat.errors import ConfigError
from imat.train_jax.objectives import bce, rotation, triplet

OBJECTIVES: dict[str, Callable] = {
    "bce": bce.loss_and_metrics,
    "triplet": triplet.loss_and_metrics,
    "rotation": rotation.loss_and_metrics,
}

# The pipeline kind (imat.data_tools.pipelines.make_pipeline) each objective trains on.
PIPELINE_KIND = {"bce": "classification", "triplet": "triplet", "rotation": "rotation"}


def get_objective(name: str) -> Callable:
    """The loss_and_metrics function registered under ``name``."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"unknown objective {name!r} (option --objective); choose one of {sorted(OBJECTIVES)}") from None


__all__ = ["OBJECTIVES", "PIPELINE_KIND", "get_objective"]
