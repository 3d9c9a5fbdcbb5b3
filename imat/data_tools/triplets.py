"""Offline triplet mining by the shared relevance rule, vectorised over the multi-hot label matrix.

For every anchor: a positive drawn uniformly among the images relevant to it (Jaccard of the
category sets >= ``positive_threshold``, :mod:`imat.relevance`), a negative drawn uniformly
among its negatives (Jaccard < ``negative_threshold``). The same rule as the in-batch miners of
the triplet loss and the retrieval metrics, so every mined triplet is one the loss accepts.
Anchors are processed in chunks so that the N x N Jaccard matrix never exists at once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os

import numpy as np

from imat.relevance import Relevance, jaccard

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MinedTriplets:
    """Result of offline mining; index arrays are positions in the label matrix."""

    anchors: np.ndarray      # int64[T]
    positives: np.ndarray    # int64[T]
    negatives: np.ndarray    # int64[T]
    relaxed: np.ndarray      # bool[T]: the negative is the least-overlapping image, not a strict negative
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
    relevance: Relevance = Relevance(),
    chunk_size: int = 512,
    relax_negatives: bool = False,
    workers: int | None = None,
) -> MinedTriplets:
    """One (anchor, positive, negative) per row of `labels` that has both, deterministic per seed.

    Anchors without a positive or without a negative are dropped and counted.
    relax_negatives: an anchor without a strict negative (on street photos some outfits overlap
    every other) takes its negative among the images with the lowest Jaccard to it, provided that
    is below ``positive_threshold`` (so the pair is still ordered correctly).
    workers: threads over anchor chunks (default: up to 4).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D multi-hot matrix, got shape {labels.shape}")
    n = labels.shape[0]
    u_pos, u_neg = _draws(seed, n)

    def chunk(start: int):
        stop = min(n, start + chunk_size)
        rows = np.arange(start, stop)
        jac = jaccard(labels[start:stop], labels).astype(np.float32)
        not_self = np.ones_like(jac, dtype=bool)
        not_self[np.arange(stop - start), rows] = False
        positive = (jac >= relevance.positive_threshold) & not_self
        negative = ((jac < relevance.negative_threshold) | (jac <= 0)) & not_self
        pos_idx, pos_count = _pick(positive, u_pos[start:stop])
        has_neg = negative.any(axis=1)
        relaxed = np.zeros(stop - start, bool)
        if relax_negatives:
            lowest = np.where(not_self, jac, np.inf).min(axis=1)
            use = ~has_neg & (lowest < relevance.positive_threshold)
            negative = np.where(use[:, None], (jac == lowest[:, None]) & not_self, negative)
            relaxed = use
        neg_idx, neg_count = _pick(negative, u_neg[start:stop])
        has_pos, has_neg = pos_count > 0, neg_count > 0
        keep = has_pos & has_neg
        return (rows[keep], pos_idx[keep], neg_idx[keep], relaxed[keep],
                int((~has_pos).sum()), int((has_pos & ~has_neg).sum()))

    # numpy releases the GIL in the matrix products and comparisons: chunks run in threads.
    # Results come back in chunk order and the draws are fixed up front, so threads change nothing.
    chunk_size = max(1, int(chunk_size))
    starts = range(0, n, chunk_size)
    threads = max(1, min(int(workers or os.cpu_count() or 1), 4, len(starts)))
    if threads == 1:
        results = [chunk(s) for s in starts]
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(chunk, starts))
    dropped_pos = sum(r[4] for r in results)
    dropped_neg = sum(r[5] for r in results)
    if dropped_pos or dropped_neg:
        logger.info(
            "offline triplets: %d of %d anchors dropped (%d without any positive, %d without a negative)",
            dropped_pos + dropped_neg, n, dropped_pos, dropped_neg,
        )

    def cat(i, dtype):
        parts = [r[i] for r in results]
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return MinedTriplets(anchors=cat(0, np.int64), positives=cat(1, np.int64), negatives=cat(2, np.int64),
                         relaxed=cat(3, bool), dropped_no_positive=dropped_pos, dropped_no_negative=dropped_neg)
