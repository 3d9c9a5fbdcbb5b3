"""Start a model from another training run: ``imat train --init-from RUN_DIR``.

Pre-train then fine-tune: e.g. rotation self-supervision on every photo, labels unused, then
bce or triplet on the labelled ones. The backbone is always copied (its structure must match:
same architecture and options); each head (classifier, embedding, rotation) is copied when the
source has it with the same shapes, else it keeps its fresh initialisation (logged). The
optimizer state is never copied: a fine-tuning run starts its own.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
from flax import nnx

from imat.errors import ConfigError

logger = logging.getLogger(__name__)

# Top-level attributes that are heads; everything else of a model is its backbone.
HEAD_ATTRIBUTES = ("fc", "classifier", "embedding_head", "rotation_head")


def is_head_path(path: tuple) -> bool:
    return bool(path) and str(path[0]) in HEAD_ATTRIBUTES


def init_from_run(model: nnx.Module, run_dir) -> dict[str, list[str]]:
    """Copy ``run_dir``'s latest checkpoint into ``model`` in place; returns which heads were
    copied and which kept their initialisation: ``{"copied": [...], "fresh": [...]}``."""
    from imat.train_jax.checkpoint import load_model_from_run

    run_dir = pathlib.Path(run_dir)
    try:
        source, source_config = load_model_from_run(run_dir)
    except ConfigError:
        raise
    except Exception as e:  # ModelError for a missing run or checkpoint: name the option
        raise ConfigError(f"--init-from {run_dir}: {e}") from None
    src = {tuple(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(source))}
    dst = nnx.state(model)
    flat = list(nnx.to_flat_state(dst))
    mismatched = []
    for path, var in flat:
        key = tuple(map(str, path))
        if is_head_path(key):
            continue
        other = src.get(key)
        if other is None or np.shape(other.get_value()) != np.shape(var.get_value()):
            mismatched.append("/".join(key))
    if mismatched:
        raise ConfigError(
            f"--init-from {run_dir}: its backbone ({source_config.get('arch')}) does not match this model's "
            f"({len(mismatched)} variables differ, e.g. {mismatched[0]}); use the same --arch and options")
    heads: dict[str, bool] = {}
    for path, var in flat:
        key = tuple(map(str, path))
        other = src.get(key)
        same = other is not None and np.shape(other.get_value()) == np.shape(var.get_value())
        if is_head_path(key):
            heads[key[0]] = heads.get(key[0], True) and same
    copy_heads = {h for h, ok in heads.items() if ok}
    for path, var in flat:
        key = tuple(map(str, path))
        if not is_head_path(key) or key[0] in copy_heads:
            var.set_value(src[key].get_value())
    nnx.update(model, nnx.from_flat_state(flat))
    report = {"copied": sorted(copy_heads), "fresh": sorted(set(heads) - copy_heads)}
    logger.info("initialised from %s (step %s): backbone and heads %s copied; fresh heads: %s", run_dir,
                source_config.get("checkpoint_step"), report["copied"] or "none", report["fresh"] or "none")
    return report
