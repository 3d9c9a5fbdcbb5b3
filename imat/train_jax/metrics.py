"""Exact metric accumulation over many batches, and retrieval mAP@k.

Objectives return per-batch metrics; :class:`MetricAccumulator` sums them so that
epoch-level numbers are exact:

* multi-label F1 at threshold 0.5 from summed per-class TP/FP/FN counts (never an
  average of per-batch F1s), as defined in :mod:`imat.label_metrics` (shared with
  `imat eval`); ``f1_macro`` is the headline metric, as in the seed report.
* triplet and rotation accuracy from summed correct/count.
* every other scalar (losses, active fraction, ...) is a mean over batches.

Retrieval: :func:`retrieval_map_at_k`, leave-one-out mAP@k on cosine similarity,
relevance by :mod:`imat.relevance`; numpy, chunked over queries.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from imat.label_metrics import f1_from_counts
from imat.retrieval_metrics import exact_leave_one_out_topk, retrieval_metrics

logger = logging.getLogger(__name__)

# Metrics summed across batches (counts); everything else is averaged per batch.
SUM_KEYS = frozenset(
    {"tp", "fp", "fn", "triplet_correct", "triplet_count", "rotation_correct", "rotation_count"}
)


class MetricAccumulator:
    """Sums per-batch metric dicts (from any objective) and computes exact epoch metrics."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._means: dict[str, float] = {}
        self.num_batches = 0

    def update(self, metrics: Mapping) -> None:
        self.num_batches += 1
        for key, value in metrics.items():
            value = np.asarray(value, np.float64)
            if key in SUM_KEYS:
                self._sums[key] = self._sums.get(key, 0.0) + value
            elif value.ndim == 0:
                self._means[key] = self._means.get(key, 0.0) + float(value)
            # other non-scalar values (none today) are not aggregated

    def compute(self) -> dict[str, float]:
        if self.num_batches == 0:
            return {}
        out = {k: v / self.num_batches for k, v in self._means.items()}
        s = self._sums
        if {"tp", "fp", "fn"} <= s.keys():
            f1 = f1_from_counts(s["tp"], s["fp"], s["fn"])
            f1.pop("categories_scored")
            out.update(f1)
        if "triplet_count" in s:
            out["triplet_accuracy"] = float(s["triplet_correct"] / max(s["triplet_count"], 1.0))
            out["triplet_count"] = float(s["triplet_count"])
        if "rotation_count" in s:
            out["rotation_accuracy"] = float(s["rotation_correct"] / max(s["rotation_count"], 1.0))
        return out


def retrieval_map_at_k(
    embeddings: np.ndarray,
    categories: np.ndarray,
    *,
    k: int = 10,
    threshold: float = 0.5,
    chunk_size: int = 1024,
) -> float:
    """Leave-one-out mAP@k of every item queried against all others (exact cosine search).

    The same definition as `imat eval` (imat.retrieval_metrics): AP@k of a query =
    (1 / min(k, R)) * sum_{i<=k} P@i * rel_i, R = relevant items among the others;
    queries with R = 0 are skipped; 0.0 when no query has a relevant item. Ties in
    score are broken by item index, so the result is deterministic.
    """
    n = np.asarray(embeddings).shape[0]
    if n < 2:
        return 0.0
    topk = exact_leave_one_out_topk(embeddings, k, chunk=chunk_size)
    cats = (np.asarray(categories) >= 0.5)
    return retrieval_metrics(cats, cats, topk, topk.shape[1], exclude=np.arange(n), threshold=threshold,
                             chunk=chunk_size)["map"]
