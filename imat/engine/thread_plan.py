"""How the embedder splits the CPU cores between decoding and the model: a pure function of measured costs.

Decoding (JPEG draft mode + resize) and the model (ONNX Runtime) share the same cores. Measured
per item on one core, they cost `decode_s` and `model_s`; with `cores` cores the best any
pipeline can do is `cores / (decode_s + model_s)` items/s (the all-cores bound). The embedder
reaches it by running `decode_threads` decoder threads and `model_threads` model lanes
(concurrent ONNX Runtime runs, one intra-op thread each, so the number of lanes can change on a
live session, unlike ORT's intra-op thread count). `plan_threads` picks the pair whose
bottleneck stage is fastest; one thread above the core count is allowed, so a lane that waits
for the other stage never leaves a core idle (the OS shares the cores between runnable threads).

`CostMeter` collects the per-item CPU seconds of both stages (thread CPU time, so waiting for a
core is not counted) over a window, so the embedder can plan after the first batches and
re-plan as the run goes (a gallery that moves from 6000x4000 photos to thumbnails).
`Gate` is the resizable concurrency limit the embedder applies the plan with.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Self

# One runnable thread beyond the cores: the lane of the stage that is ahead mostly waits.
OVERSUBSCRIBE = 1


@dataclasses.dataclass(frozen=True)
class ThreadPlan:
    """Decoder threads and model lanes, with the throughput the costs predict for them."""

    decode_threads: int
    model_threads: int
    items_per_s: float  # predicted: min(decoders / decode_s, lanes / model_s, cores / (decode_s + model_s))
    bound_items_per_s: float  # cores / (decode_s + model_s)
    reason: str

    def describe(self) -> str:
        return (f"{self.decode_threads} decoder thread(s) + {self.model_threads} model lane(s): {self.reason}; "
                f"predicted {self.items_per_s:.0f} items/s of the all-cores bound {self.bound_items_per_s:.0f}")


def all_cores_bound(decode_s: float, model_s: float, cores: int) -> float:
    """Items/s when every core decodes or runs the model without pause: cores / (decode_s + model_s)."""
    total = decode_s + model_s
    return float("inf") if total <= 0 else cores / total


def _rate(threads: int, seconds: float) -> float:
    return float("inf") if seconds <= 0 else threads / seconds


def plan_threads(decode_s: float, model_s: float, cores: int, *, max_model_threads: int | None = None) -> ThreadPlan:
    """The split of `cores` between decoding and the model for these per-item single-core costs.

    `decode_s`, `model_s`: CPU seconds per item of each stage on one core (>= 0).
    `max_model_threads`: at most this many model lanes (1 for a GPU session: the device runs one
    batch at a time, and its CPU side is small). Ties go to fewer threads, then to the split whose
    faster stage has more slack (so a cost that drifts does not immediately make it the bottleneck).
    """
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    if decode_s < 0 or model_s < 0:
        raise ValueError(f"costs must be >= 0, got decode {decode_s}, model {model_s}")
    max_lanes = max(1, min(cores, max_model_threads or cores))
    bound = all_cores_bound(decode_s, model_s, cores)
    best = None
    for lanes in range(1, max_lanes + 1):
        for decoders in range(1, cores + OVERSUBSCRIBE - lanes + 1):
            dec_rate, mod_rate = _rate(decoders, decode_s), _rate(lanes, model_s)
            rate = min(dec_rate, mod_rate, bound)
            # slack: how far the slower stage is above the bound (more = robust to drifting costs)
            slack = min(dec_rate, mod_rate) / bound if bound not in (0.0, float("inf")) else 0.0
            key = (round(rate, 6), -(decoders + lanes), slack)
            if best is None or key > best[0]:
                best = (key, decoders, lanes, rate)
    _, decoders, lanes, rate = best
    if decode_s > model_s:
        reason = f"decode-bound (decode {decode_s * 1e3:.2f} ms vs model {model_s * 1e3:.2f} ms per item)"
    else:
        reason = f"model-bound (model {model_s * 1e3:.2f} ms vs decode {decode_s * 1e3:.2f} ms per item)"
    return ThreadPlan(decoders, lanes, rate, bound, reason)


def fixed_plan(decode_threads: int, model_threads: int, reason: str) -> ThreadPlan:
    """A plan that is given, not measured (an explicit --threads, or the start before any measurement)."""
    return ThreadPlan(max(1, decode_threads), max(1, model_threads), float("nan"), float("nan"), reason)


class CostMeter:
    """Per-item CPU seconds of decoding and of the model, over the items seen since the last `take`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums = {"decode": [0.0, 0], "model": [0.0, 0]}

    def add(self, stage: str, seconds: float, items: int = 1) -> None:
        with self._lock:
            entry = self._sums[stage]
            entry[0] += seconds
            entry[1] += items

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self._sums["decode"][1], self._sums["model"][1]

    def take(self) -> tuple[float, float]:
        """(decode s/item, model s/item) since the last take, and start a new window."""
        with self._lock:
            (ds, dn), (ms, mn) = self._sums["decode"], self._sums["model"]
            self._sums = {"decode": [0.0, 0], "model": [0.0, 0]}
        return ds / max(dn, 1), ms / max(mn, 1)


class Gate:
    """A concurrency limit that can be changed while threads wait on it (a resizable semaphore)."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._limit = max(1, limit)
        self._active = 0

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self._limit = max(1, limit)
            self._cond.notify_all()

    def __enter__(self) -> Self:
        with self._cond:
            while self._active >= self._limit:
                self._cond.wait()
            self._active += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify()
