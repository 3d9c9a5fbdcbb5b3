"""Embed images: reader -> decoder thread pool -> fixed-size batches -> ONNX Runtime lanes.

Decoding (JPEG draft mode, EXIF, resize: `imat.data_tools.images.decode_image`,
the same decoder training used) runs in a thread pool while model lanes (concurrent
ONNX Runtime runs of one session) run earlier batches, so the two overlap. How many
decoder threads and lanes run is planned from the costs measured on the first
batches and re-planned as the run goes (`imat.engine.thread_plan`). At most
`max_in_flight` decodes are queued, so memory stays bounded on any gallery;
results come back in input order. A bad item (corrupt, unreadable, not an
image) is recorded as an `EmbedError` and skipped; it never stops the run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Self

import numpy as np

from imat.engine.records import display_name, is_garment_crop
from imat.engine.thread_plan import (
    OVERSUBSCRIBE,
    CostMeter,
    Gate,
    fixed_plan,
    plan_threads,
)
from imat.errors import ImatError

logger = logging.getLogger(__name__)

MIN_LANE_BATCH = 8  # the last batch is split across lanes only into pieces of at least this many images


@dataclasses.dataclass(frozen=True)
class EmbedError:
    """One item that could not be embedded."""

    index: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclasses.dataclass
class EmbedTimings:
    """Per-phase seconds. decode_s is summed over decoder threads (CPU time spent decoding)."""

    decode_s: float = 0.0
    model_s: float = 0.0
    wall_s: float = 0.0
    items: int = 0
    embedded: int = 0
    batches: int = 0
    decode_threads: int = 0  # the plan in force at the end of the run
    model_threads: int = 0  # model lanes (concurrent ONNX Runtime runs)
    predicted_items_per_s: float = float("nan")  # what the last measured plan predicted
    bound_items_per_s: float = float("nan")  # cores / (decode + model seconds per item), last measurement
    plans: list[str] = dataclasses.field(default_factory=list)  # each measured plan, in order

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.embedded}/{self.items} images in {self.wall_s:.2f}s ({self.images_per_s:.1f} images/s; "
            f"decode {self.decode_s:.2f}s summed over threads, model {self.model_s:.2f}s in {self.batches} batches; "
            f"{self.decode_threads} decoder threads + {self.model_threads} model lanes)"
        )


@dataclasses.dataclass
class EmbedResult:
    """Embeddings of the good items (row j = items[ok_indices[j]]) plus the errors of the bad ones."""

    embeddings: np.ndarray  # float32[M, D]
    probabilities: np.ndarray | None  # float32[M, C] when the model has a classifier head
    ok_indices: np.ndarray  # int64[M], ascending
    errors: list[EmbedError]
    timings: EmbedTimings


def item_label(item: Any, index: int) -> str:
    """How an item is named in errors and logs: its path (readable, see records.display_name), its garment
    id (or path[box]), or `<array #i>`."""
    if is_garment_crop(item):
        return item.label()
    if isinstance(item, (str, os.PathLike)):
        return display_name(str(item))
    return f"<array #{index}>"


def default_decode_threads(cores: int | None = None) -> int:
    """Half the cores for decoding (at least 1): the model gets the other half. (The static split for
    callers that fix their threads; `embed_items` without `decode_threads` measures and plans instead.)"""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // 2)


def _decode(item: Any, size: int, mode: str) -> tuple[np.ndarray, float]:
    from imat.data_tools.images import decode_image

    t0 = time.perf_counter()
    if is_garment_crop(item):
        # The box (padded as in `imat data prepare --garments`) is cropped before resizing, by the
        # same crop decoder, so a garment model sees the pixels it was trained on.
        from imat.data_tools.garments import decode_crop

        return decode_crop(item.path, item.box, size, mode, item.padding), time.perf_counter() - t0
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3) or (item.ndim == 3 and item.shape[2] != 3):
            raise ValueError(f"expected a uint8 HxWx3 array, got {item.dtype} {item.shape}")
        if item.ndim == 3 and item.shape[:2] == (size, size):
            # Already model-sized: the decoder would return it unchanged; skip the copy.
            image = item
        else:
            image = decode_image(item, size, mode)
    elif isinstance(item, (str, os.PathLike, bytes)):
        image = decode_image(item, size, mode)
    else:
        raise TypeError(f"expected a path or a uint8 array, got {type(item).__name__}")
    return image, time.perf_counter() - t0


class _NoProgress:
    """What `_progress` gives when no bar is shown: tqdm is then not even imported (a faster start)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None


def _progress(total: int, desc: str, enabled: bool | None):
    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    if disable:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def _decode_timed(item: Any, size: int, mode: str, gate, meter: CostMeter) -> tuple[np.ndarray, float]:
    """`_decode` inside the decoder gate; its thread CPU time goes to the meter (waiting for a core is not cost)."""
    with gate:
        c0 = time.thread_time()
        try:
            return _decode(item, size, mode)
        finally:
            meter.add("decode", time.thread_time() - c0)


def _run_timed(session, images: np.ndarray, gate, meter: CostMeter, cpu_scale: int, on_done) -> dict[str, np.ndarray]:
    """One model batch inside the lane gate; (thread CPU or, for a multi-threaded session, wall x threads)
    seconds go to the meter, then `on_done()` (the re-plan) runs with the lane free."""
    with gate:
        c0, t0 = time.thread_time(), time.perf_counter()
        out = session.run(images)
        cpu = time.thread_time() - c0 if cpu_scale == 1 else (time.perf_counter() - t0) * cpu_scale
        meter.add("model", cpu, len(images))
        out["_seconds"] = time.perf_counter() - t0
    on_done()
    return out


def _model_lanes(session, cores: int) -> tuple[int, int]:
    """(most model lanes, CPU cost scale): concurrent runs only pay on a one-thread CPU session; a GPU
    or multi-threaded session runs one batch at a time."""
    threads = int(getattr(session, "intra_op_threads", 1) or 1)
    on_cpu = getattr(session, "provider", "CPUExecutionProvider") == "CPUExecutionProvider"
    if on_cpu and threads == 1:
        return cores, 1
    return 1, threads if on_cpu else 1


def embed_items(
    session,
    items: Sequence[Any],
    *,
    batch_size: int = 64,
    decode_threads: int | None = None,
    max_in_flight: int | None = None,
    progress: bool | None = None,
    desc: str = "embedding",
    model_threads: int | None = None,
    cores: int | None = None,
) -> EmbedResult:
    """Embed `items` (paths or uint8 HxWx3 arrays) with a `ModelSession`; tolerant of bad items.

    `decode_threads` None: the cores are split between decoding and model lanes by
    `thread_plan.plan_threads` from the costs measured on the first batches, re-checked as the run
    goes. An explicit `decode_threads` (and `model_threads`, default 1) is used as given.
    """
    if batch_size < 1:
        raise ImatError(f"--batch-size must be >= 1, got {batch_size}")
    meta = session.metadata
    size, mode = meta.image_size, meta.resize_mode
    cores = cores or os.cpu_count() or 1
    max_lanes, cpu_scale = _model_lanes(session, cores)
    adaptive = decode_threads is None
    if adaptive:
        # Until the first batch is measured there is nothing for the model to do: decoders get the cores.
        plan = fixed_plan(cores, 1, "start, before measuring")
        decode_workers, lane_workers = cores + OVERSUBSCRIBE, max_lanes
    else:
        plan = fixed_plan(decode_threads, min(model_threads or 1, max_lanes), "explicit thread counts")
        decode_workers, lane_workers = plan.decode_threads, plan.model_threads
    decode_gate, lane_gate, meter = Gate(plan.decode_threads), Gate(plan.model_threads), CostMeter()
    in_flight_cap = max_in_flight or (2 * batch_size + 2 * decode_workers)
    items = list(items)
    timings = EmbedTimings(items=len(items), decode_threads=plan.decode_threads, model_threads=plan.model_threads)
    errors: list[EmbedError] = []
    batches: collections.deque = collections.deque()  # (item indices, model future), in input order
    done: list[tuple[list[int], dict[str, np.ndarray]]] = []
    batch_images: list[np.ndarray] = []
    batch_indices: list[int] = []
    # Plan after the first batch, again after two more (the first run pays ORT's allocations), then every 8.
    windows = itertools.chain([1, 2], itertools.repeat(8))
    window = next(windows)

    def collect_oldest() -> None:
        indices, future = batches.popleft()
        out = future.result()
        timings.model_s += out.pop("_seconds")
        done.append((indices, out))

    plan_lock = threading.Lock()

    def replan() -> None:
        # Called by the main thread (after each decoded item) and by the lanes (after each batch).
        if not adaptive:
            return
        with plan_lock:
            _replan_locked()

    def _replan_locked() -> None:
        nonlocal plan, window
        decoded, modelled = meter.counts()  # since the last plan
        if modelled < window * min(batch_size, len(items)) or decoded == 0:
            return
        decode_s, model_s = meter.take()
        new = plan_threads(decode_s, model_s, cores, max_model_threads=max_lanes)
        window = next(windows)
        if (new.decode_threads, new.model_threads) != (plan.decode_threads, plan.model_threads) or not timings.plans:
            logger.debug("thread plan after batch %d: %s", timings.batches, new.describe())
            timings.plans.append(new.describe())
        plan = new
        decode_gate.set_limit(plan.decode_threads)
        lane_gate.set_limit(plan.model_threads)
        timings.decode_threads, timings.model_threads = plan.decode_threads, plan.model_threads
        timings.predicted_items_per_s, timings.bound_items_per_s = plan.items_per_s, plan.bound_items_per_s

    def submit(model_pool, images: list[np.ndarray], indices: list[int]) -> None:
        batches.append((indices, model_pool.submit(_run_timed, session, np.stack(images), lane_gate, meter,
                                                   cpu_scale, replan)))
        timings.batches += 1

    def flush(model_pool, final: bool = False) -> None:
        if not batch_images:
            return
        # The last batch is cut in one piece per possible lane, so no core idles on the tail.
        pieces = max(1, min(max_lanes, len(batch_images) // MIN_LANE_BATCH)) if final else 1
        step = -(-len(batch_images) // pieces)
        for s in range(0, len(batch_images), step):
            submit(model_pool, batch_images[s : s + step], batch_indices[s : s + step])
        batch_images.clear()
        batch_indices.clear()
        # At most one batch waits beyond the running lanes: memory stays bounded, the lanes stay fed.
        while len(batches) > lane_gate.limit + 1:
            collect_oldest()

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="imat-decode") as pool, \
            concurrent.futures.ThreadPoolExecutor(max_workers=lane_workers, thread_name_prefix="imat-model") as model_pool, \
            _progress(len(items), desc, progress) as bar:
        pending: collections.deque = collections.deque()
        next_item = 0
        while next_item < len(items) or pending:
            # Keep the pool fed, bounded, so decoding of later items overlaps the model on earlier batches.
            while next_item < len(items) and len(pending) < in_flight_cap:
                pending.append((next_item, pool.submit(_decode_timed, items[next_item], size, mode, decode_gate, meter)))
                next_item += 1
            index, future = pending.popleft()
            try:
                image, seconds = future.result()
                timings.decode_s += seconds
            except (ImatError, OSError, ValueError, TypeError) as e:
                # ImageDecodeError already says "path: reason"; keep only the reason here.
                message = getattr(e, "reason", None) or str(e) or type(e).__name__
                errors.append(EmbedError(index, item_label(items[index], index), message))
                logger.warning("skipping %s: %s", item_label(items[index], index), message)
                bar.update(1)
                continue
            batch_images.append(image)
            batch_indices.append(index)
            if len(batch_images) == batch_size:
                flush(model_pool)
            replan()
            bar.update(1)
        flush(model_pool, final=True)
        while batches:
            collect_oldest()
    timings.wall_s = time.perf_counter() - start
    ok_indices = [i for indices, _ in done for i in indices]
    emb_chunks = [out["embedding"] for _, out in done]
    prob_chunks = [out["probabilities"] for _, out in done if "probabilities" in out]
    timings.embedded = len(ok_indices)

    dim = meta.embedding_dim
    embeddings = np.concatenate(emb_chunks).astype(np.float32, copy=False) if emb_chunks else np.zeros((0, dim), np.float32)
    probabilities = None
    if session.has_probabilities:
        probabilities = (
            np.concatenate(prob_chunks).astype(np.float32, copy=False)
            if prob_chunks
            else np.zeros((0, len(meta.category_names)), np.float32)
        )
    logger.info("embedded %s", timings.summary())
    return EmbedResult(
        embeddings=embeddings,
        probabilities=probabilities,
        ok_indices=np.asarray(ok_indices, dtype=np.int64),
        errors=errors,
        timings=timings,
    )

