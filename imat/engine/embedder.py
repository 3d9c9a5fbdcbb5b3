"""Embed images: reader -> decoder thread pool -> fixed-size batches -> ONNX Runtime.

Decoding (JPEG draft mode, EXIF, resize: `imat.data_tools.images.decode_image`,
the same decoder training used) runs in a thread pool while the calling thread
runs the model on the previous batch, so the two overlap. At most
`max_in_flight` decodes are queued, so memory stays bounded on any gallery;
results come back in input order. A bad item (corrupt, unreadable, not an
image) is recorded as an `EmbedError` and skipped; it never stops the run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

from imat.engine.records import display_name
from imat.data_tools.garments import GarmentCrop
from imat.errors import ImatError

logger = logging.getLogger(__name__)


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

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.embedded}/{self.items} images in {self.wall_s:.2f}s ({self.images_per_s:.1f} images/s; "
            f"decode {self.decode_s:.2f}s summed over threads, model {self.model_s:.2f}s in {self.batches} batches)"
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
    if isinstance(item, GarmentCrop):
        return item.label()
    if isinstance(item, (str, os.PathLike)):
        return display_name(str(item))
    return f"<array #{index}>"


# What decoding one bad item raises (reported and skipped); anything else is a bug and stops the run.
DECODE_ERRORS = (ImatError, OSError, ValueError, TypeError)


def error_message(error: BaseException) -> str:
    """The reason recorded for an item that failed to decode (ImageDecodeError already names the path)."""
    return getattr(error, "reason", None) or str(error) or type(error).__name__


def default_decode_threads(cores: int | None = None) -> int:
    """Half the cores for decoding (at least 1): the model gets the other half."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // 2)


def _decode(item: Any, size: int, mode: str) -> tuple[np.ndarray, float]:
    from imat.data_tools.images import decode_image

    t0 = time.perf_counter()
    if isinstance(item, GarmentCrop):
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


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit="img", disable=disable, leave=False)


def embed_items(
    session,
    items: Sequence[Any],
    *,
    batch_size: int = 64,
    decode_threads: int | None = None,
    max_in_flight: int | None = None,
    progress: bool | None = None,
    desc: str = "embedding",
    bar=None,
) -> EmbedResult:
    """Embed `items` (paths or uint8 HxWx3 arrays) with a `ModelSession`; tolerant of bad items.

    `bar`: a progress bar (tqdm) to advance per item instead of a bar of this call's own (one bar
    across several calls, as `imat embed` does over its parts)."""
    if batch_size < 1:
        raise ImatError(f"--batch-size must be >= 1, got {batch_size}")
    meta = session.metadata
    size, mode = meta.image_size, meta.resize_mode
    threads = decode_threads or default_decode_threads()
    in_flight_cap = max_in_flight or (2 * batch_size + 2 * threads)
    items = list(items)
    timings = EmbedTimings(items=len(items))
    errors: list[EmbedError] = []
    ok_indices: list[int] = []
    emb_chunks: list[np.ndarray] = []
    prob_chunks: list[np.ndarray] = []
    batch_images: list[np.ndarray] = []
    batch_indices: list[int] = []

    def flush() -> None:
        if not batch_images:
            return
        t0 = time.perf_counter()
        out = session.run(np.stack(batch_images))
        timings.model_s += time.perf_counter() - t0
        timings.batches += 1
        emb_chunks.append(out["embedding"])
        if "probabilities" in out:
            prob_chunks.append(out["probabilities"])
        ok_indices.extend(batch_indices)
        batch_images.clear()
        batch_indices.clear()

    start = time.perf_counter()
    shown = contextlib.nullcontext(bar) if bar is not None else _progress(len(items), desc, progress)
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imat-decode") as pool, \
            shown as progress_bar:
        pending: collections.deque = collections.deque()
        next_item = 0
        while next_item < len(items) or pending:
            # Keep the pool fed, bounded, so decoding of later items overlaps the model on this batch.
            while next_item < len(items) and len(pending) < in_flight_cap:
                pending.append((next_item, pool.submit(_decode, items[next_item], size, mode)))
                next_item += 1
            index, future = pending.popleft()
            try:
                image, seconds = future.result()
                timings.decode_s += seconds
            except DECODE_ERRORS as e:
                message = error_message(e)
                errors.append(EmbedError(index, item_label(items[index], index), message))
                logger.warning("skipping %s: %s", item_label(items[index], index), message)
                progress_bar.update(1)
                continue
            batch_images.append(image)
            batch_indices.append(index)
            if len(batch_images) == batch_size:
                flush()
            progress_bar.update(1)
        flush()
    timings.wall_s = time.perf_counter() - start
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
    # Under an outer bar (one of many parts) a line per call would be noise: the caller reports the total.
    logger.log(logging.DEBUG if bar is not None else logging.INFO, "embedded %s", timings.summary())
    return EmbedResult(
        embeddings=embeddings,
        probabilities=probabilities,
        ok_indices=np.asarray(ok_indices, dtype=np.int64),
        errors=errors,
        timings=timings,
    )

