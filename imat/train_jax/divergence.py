"""Divergence: when a run's losses say training has failed, even if they are still finite.

A NaN is the obvious case; a learning rate far too high more often gives finite losses that
explode (``--lr 1e6``: validation loss 4e8 while training exits 0). The rule, shared by the
training loop (which stops) and export (which refuses such a run): the loss is non-finite, or
it has stayed above ``factor`` x its first value (plus ``floor`` for losses that start near 0)
for ``patience`` consecutive logged values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

FACTOR = 10.0
FLOOR = 1.0
PATIENCE = 3


def divergence(losses: Sequence[float], *, reference: float | None = None, factor: float = FACTOR,
               floor: float = FLOOR, patience: int = PATIENCE) -> str | None:
    """Why ``losses`` (in logging order) show a diverged run, or None. ``reference`` is the
    healthy starting loss (default: the first value)."""
    if not losses:
        return None
    if not math.isfinite(losses[-1]):
        return f"the loss is {losses[-1]}"
    start = losses[0] if reference is None else reference
    if not math.isfinite(start):
        return f"the first loss is {start}"
    limit = factor * abs(start) + floor
    recent = list(losses[-patience:])
    if len(recent) == patience and all(v > limit for v in recent):
        return (f"the loss has stayed above {limit:.4g} (>{factor:g}x its first value {start:.4g}) for "
                f"{patience} logged values (last {recent[-1]:.4g})")
    return None
