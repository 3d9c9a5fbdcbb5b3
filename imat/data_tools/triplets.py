"""Triplet and pair selection by shared categories, vectorised over the multi-hot label matrix.

Offline mining follows the seed report: a positive shares *more than* 3 categories with its
anchor, relaxed step by step (>3, >2, >1, >0) when no image qualifies; a negative shares none.
Anchors are processed in chunks so that the N x N shared-count matrix never exists at once.

The in-batch helpers (`shared_counts`, `jaccard`, `positive_mask`, `negative_mask`) are plain
numpy; the JAX objective computes its own masks under jit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os

import numpy as np

logger = logging.getLogger(__name__)

# Thresholds tried in order: a positive must share more than `t` categories with the anchor.
DEFAULT_THRESHOLDS: tuple[int, ...] = (3, 2, 1, 0)


def _binary(labels: np.ndarray) -> np.ndarray:
    """Multi-hot (any numeric dtype, threshold 0.5) -> float32 {0,1} for BLAS matrix products."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D multi-hot matrix, got shape {labels.shape}")
    return (labels > 0.5).astype(np.float32)


def shared_counts(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """int32[len(a), len(b)]: number of categories shared by each pair of rows.

    Computed as a float32 matrix product (BLAS), which is exact here: every term is 0 or 1 and a
    sum of at most a few hundred such terms is represented exactly in float32.
    """
    fa = _binary(a)
    fb = fa if b is None else _binary(b)
    return np.rint(fa @ fb.T).astype(np.int32)


def jaccard(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """float32[len(a), len(b)]: |A ∩ B| / |A ∪ B| of the category sets (0 where both are empty)."""
    fa = _binary(a)
    fb = fa if b is None else _binary(b)
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 0.0).astype(np.float32)


def positive_mask(labels_batch: np.ndarray, min_shared: int = 1) -> np.ndarray:
    """bool[B,B]: j is a positive of i when they share at least `min_shared` categories (i != j)."""
    mask = shared_counts(labels_batch) >= min_shared
    np.fill_diagonal(mask, False)
    return mask


def negative_mask(labels_batch: np.ndarray) -> np.ndarray:
    """bool[B,B]: j is a negative of i when they share no category (i != j)."""
    mask = shared_counts(labels_batch) == 0
    np.fill_diagonal(mask, False)
    return mask


@dataclasses.dataclass(frozen=True)
class MinedTriplets:
    """Result of offline mining; index arrays are positions in the label matrix."""

    anchors: np.ndarray      # int64[T]
    positives: np.ndarray    # int64[T]
    negatives: np.ndarray    # int64[T]
    thresholds: np.ndarray   # int32[T]: the positive shares more than this many categories
    dropped_no_positive: int
    dropped_no_negative: int

    def __len__(self) -> int:
        return int(self.anchors.shape[0])


def _draws(seed: int | np.random.SeedSequence, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One uniform draw per anchor for the positive and one for the negative.

    Drawn up front for all N rows so the choice of an anchor does not depend on the chunking
    (and the slow reference in the tests can replay exactly the same draws).
    """
    rng = np.random.default_rng(seed)
    return rng.random(n), rng.random(n)


def _pick(mask: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the floor(u * count)-th True column of `mask` (in column order); -1 when none."""
    counts = np.count_nonzero(mask, axis=1)
    k = np.minimum(np.floor(u * counts).astype(np.int64), np.maximum(counts - 1, 0))
    cum = np.cumsum(mask, axis=1, dtype=np.int32)
    idx = np.argmax(cum > k[:, None], axis=1)
    return np.where(counts > 0, idx, -1), counts


def mine_offline(
    labels: np.ndarray,
    seed: int | np.random.SeedSequence = 0,
    *,
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
    chunk_size: int = 512,
    relax_negatives: bool = False,
    workers: int | None = None,
) -> MinedTriplets:
    """One (anchor, positive, negative) per row of `labels` that has both, deterministic per seed.

    For each anchor the first threshold t in `thresholds` for which some other row shares more
    than t categories is used; the positive is drawn uniformly among those rows, the negative
    uniformly among rows sharing no category. Anchors without a positive (even at the last
    threshold) or without a negative are dropped and counted.

    relax_negatives: an anchor that shares a category with every other row (frequent on street
    photos: shoes are everywhere) then takes its negative among the rows sharing the fewest
    categories with it, provided that is fewer than its positive shares (<= the threshold), so
    the triplet still orders the pair correctly. Off by default (the seed report's rule).
    workers: threads over anchor chunks (default: up to 4); memory is about workers x chunk_size x
    N x 10 bytes.
    """
    lab = _binary(labels)
    n = lab.shape[0]
    if lab.shape[1] > np.iinfo(np.int16).max:
        raise ValueError(f"{lab.shape[1]} label columns: more than the int16 shared counts can hold")
    u_pos, u_neg = _draws(seed, n)
    big = np.iinfo(np.int16).max
    order = sorted(thresholds)

    def chunk(start: int):
        stop = min(n, start + chunk_size)
        rows = np.arange(start, stop)
        # [C, N], never N x N; exact small integers (int16: half the memory traffic of int32).
        shared = (lab[start:stop] @ lab.T).astype(np.int16)
        shared[np.arange(stop - start), rows] = -1                   # an image is not its own pair
        best = shared.max(axis=1)
        # The strictest threshold that still has a candidate (-1: no positive at all).
        level = np.full(stop - start, -1, dtype=np.int16)
        for t in order:
            level = np.where(best > t, t, level).astype(np.int16)
        has_pos = level >= 0
        pos_idx, _ = _pick(shared > level[:, None], u_pos[start:stop])
        if relax_negatives:
            neg_level = np.where(shared < 0, big, shared).min(axis=1)   # 0 whenever a strict negative exists
            wanted = np.where(neg_level <= level, neg_level, -2).astype(np.int16)
            neg_idx, neg_count = _pick(shared == wanted[:, None], u_neg[start:stop])
        else:
            neg_idx, neg_count = _pick(shared == 0, u_neg[start:stop])
        has_neg = neg_count > 0
        keep = has_pos & has_neg
        return (rows[keep], pos_idx[keep], neg_idx[keep], level[keep],
                int((~has_pos).sum()), int((has_pos & ~has_neg).sum()))

    # numpy releases the GIL in the matrix product, comparisons and cumsum: chunks run in threads.
    # Results come back in chunk order and the draws are fixed up front, so threads change nothing.
    chunk_size = max(1, int(chunk_size))
    starts = range(0, n, chunk_size)
    threads = max(1, min(int(workers or os.cpu_count() or 1), 4, len(starts)))
    if threads == 1:
        results = [chunk(s) for s in starts]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(chunk, starts))
    anchors, positives, negatives, levels = ([r[i] for r in results] for i in range(4))
    dropped_pos = sum(r[4] for r in results)
    dropped_neg = sum(r[5] for r in results)
    if dropped_pos or dropped_neg:
        logger.info(
            "offline triplets: %d of %d anchors dropped (%d without any positive, %d without a negative)",
            dropped_pos + dropped_neg, n, dropped_pos, dropped_neg,
        )

    def cat(parts, dtype):
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return MinedTriplets(
        anchors=cat(anchors, np.int64),
        positives=cat(positives, np.int64),
        negatives=cat(negatives, np.int64),
        thresholds=cat(levels, np.int32),
        dropped_no_positive=dropped_pos,
        dropped_no_negative=dropped_neg,
    )


def offline_triplets(
    labels: np.ndarray,
    seed: int | np.random.SeedSequence = 0,
    *,
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
    chunk_size: int = 512,
    relax_negatives: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchors, positives, negatives) index arrays; see `mine_offline` for the rules."""
    mined = mine_offline(labels, seed, thresholds=thresholds, chunk_size=chunk_size,
                         relax_negatives=relax_negatives)
    return mined.anchors, mined.positives, mined.negatives
