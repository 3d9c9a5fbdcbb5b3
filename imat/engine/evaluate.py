"""Retrieval and label metrics (pure numpy), leave-one-out evaluation, random-ranking baseline.

Retrieval metric definitions (Jaccard relevance, mAP@k, P@k, R@k, NDCG@k) live in
imat.retrieval_metrics, shared with training's validation mAP. Here:

- F1 of predicted categories (neighbour votes, model probabilities): imat.label_metrics,
  the same definition as training's validation F1.
"""

from __future__ import annotations

import logging

import numpy as np

from imat.label_metrics import f1_scores
from imat.retrieval_metrics import (  # noqa: F401  (re-exported: the engine's metric API)
    METRIC_NAMES,
    RELEVANCE_THRESHOLD,
    retrieval_metrics,
)

logger = logging.getLogger(__name__)

VOTE_THRESHOLD = 0.5


def neighbour_votes(ids: np.ndarray, scores: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """float32[Q,C] similarity-weighted vote of the neighbours' label sets, in [0,1].

    Weight = max(score, 0) (cosine similarity; dissimilar neighbours do not vote); when every
    weight is 0 the neighbours vote equally. Empty slots (id -1) do not vote.
    """
    ids = np.asarray(ids, dtype=np.int64)
    valid = ids >= 0
    w = np.where(valid, np.clip(np.asarray(scores, dtype=np.float64), 0.0, None), 0.0)
    total = w.sum(1, keepdims=True)
    w = np.where(total > 0, w, valid.astype(np.float64))  # all non-positive: equal votes
    total = w.sum(1, keepdims=True)
    labels = (np.asarray(gallery_labels) > 0).astype(np.float64)
    gathered = labels[np.where(valid, ids, 0)]  # [Q,k,C]
    votes = np.einsum("qk,qkc->qc", w, gathered)
    out = np.zeros_like(votes)
    np.divide(votes, total, out=out, where=total > 0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def drop_self(ids: np.ndarray, scores: np.ndarray, self_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out: from k+1 neighbours drop the query's own row (or the last one when absent)."""
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores)
    q = ids.shape[0]
    out_ids = np.full((q, k), -1, dtype=np.int64)
    out_scores = np.zeros((q, k), dtype=np.float32)
    for r in range(q):
        keep = ids[r] != self_ids[r]
        row_ids, row_scores = ids[r][keep][:k], scores[r][keep][:k]
        out_ids[r, : len(row_ids)] = row_ids
        out_scores[r, : len(row_scores)] = row_scores
    return out_ids, out_scores


def random_ranking_metrics(
    labels: np.ndarray, k: int, *, samples: int = 5, seed: int = 0, threshold: float = RELEVANCE_THRESHOLD
) -> dict:
    """Expected leave-one-out metrics of a random ranking, estimated by `samples` seeded draws."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    k_eff = min(k, n - 1)
    rng = np.random.default_rng(seed)
    totals: dict[str, float] = {}
    self_ids = np.arange(n)
    for _ in range(samples):
        retrieved = np.empty((n, k_eff), dtype=np.int64)
        for q in range(n):
            # k distinct rows other than q: draw from n-1 and shift past q.
            pick = rng.choice(n - 1, size=k_eff, replace=False)
            retrieved[q] = pick + (pick >= q)
        m = retrieval_metrics(labels, labels, retrieved, k_eff, exclude=self_ids, threshold=threshold)
        for name in METRIC_NAMES:
            totals[name] = totals.get(name, 0.0) + m[name] / samples
    return {**totals, "samples": samples, "seed": seed}


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    k: int = 10,
    *,
    probabilities: np.ndarray | None = None,
    threshold: float = RELEVANCE_THRESHOLD,
    baseline_samples: int = 5,
    seed: int = 0,
) -> dict:
    """Leave-one-out over a labelled set: each image queries all the others (exact search).

    Returns {"k", "count", "map@k", "precision@k", "recall@k", "ndcg@k", "f1_macro_neighbours",
    "f1_micro_neighbours", ["f1_macro_model", "f1_micro_model"], "baseline": {...}, ...}.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels) > 0
    n = x.shape[0]
    if n < 2:
        from imat.errors import DataError

        raise DataError(f"leave-one-out evaluation needs at least 2 embedded images, got {n}")
    k_eff = min(k, n - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, ids = index.search(x, k_eff + 1)
    self_ids = np.arange(n)
    ids, scores = drop_self(ids, scores, self_ids, k_eff)
    m = retrieval_metrics(labels, labels, ids, k_eff, exclude=self_ids, threshold=threshold)
    predicted = None if probabilities is None else np.asarray(probabilities) >= VOTE_THRESHOLD
    base = random_ranking_metrics(labels, k_eff, samples=baseline_samples, seed=seed, threshold=threshold)
    return _result(k_eff, {"count": n, "relevance": f"jaccard>={threshold}"}, m,
                   neighbour_votes(ids, scores, labels), labels, predicted, base)


def _result(k: int, head: dict, m: dict, votes: np.ndarray, labels: np.ndarray, predicted, base: dict) -> dict:
    """The evaluation record: `head`, the retrieval metrics `m` at k, F1 of the neighbours' votes and
    (when given) of the model's `predicted` categories, and the random-ranking `base`line."""
    f1_n = f1_scores(labels, votes >= VOTE_THRESHOLD)
    result = {"k": k, **head, **{f"{name}@{k}": m[name] for name in METRIC_NAMES},
              "queries_with_relevant": m["queries_with_relevant"],
              "f1_macro_neighbours": f1_n["f1_macro"], "f1_micro_neighbours": f1_n["f1_micro"]}
    if predicted is not None:
        f1_m = f1_scores(labels, predicted)
        result["f1_macro_model"] = f1_m["f1_macro"]
        result["f1_micro_model"] = f1_m["f1_micro"]
    result["baseline"] = {f"{name}@{k}": base[name] for name in METRIC_NAMES} | {
        "samples": base["samples"], "seed": base["seed"]}
    return result


# ---- garments: leave-one-photo-out -------------------------------------------------------------

def _group_codes(groups) -> np.ndarray:
    """int64 codes of the rows' groups (parent photos), whatever their type."""
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return codes.astype(np.int64)


def leave_group_out_topk(embeddings: np.ndarray, groups, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64[n,k], scores float32[n,k]): each row's k most similar rows of OTHER groups (exact inner
    product search; slots without a candidate are -1)."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    codes = _group_codes(groups)
    n = x.shape[0]
    largest = int(np.bincount(codes).max()) if n else 0
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, ids = index.search(x, min(n, k + largest))   # the own photo takes at most `largest` slots
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_scores = np.zeros((n, k), dtype=np.float32)
    for r in range(n):
        keep = (ids[r] >= 0) & (codes[np.maximum(ids[r], 0)] != codes[r])
        row_ids, row_scores = ids[r][keep][:k], scores[r][keep][:k]
        out_ids[r, : len(row_ids)] = row_ids
        out_scores[r, : len(row_scores)] = row_scores
    return out_ids, out_scores


def random_group_ranking_metrics(labels: np.ndarray, groups, k: int, *, attributes: np.ndarray | None = None,
                                 samples: int = 5, seed: int = 0, threshold: float = RELEVANCE_THRESHOLD) -> dict:
    """Expected metrics of a random ranking of the rows of other groups, by `samples` seeded draws."""
    labels = np.asarray(labels)
    codes = _group_codes(groups)
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    totals: dict[str, float] = {}
    for _ in range(samples):
        retrieved = np.full((n, k), -1, dtype=np.int64)
        for q in range(n):
            allowed = np.flatnonzero(codes != codes[q])
            pick = rng.choice(allowed, size=min(k, allowed.size), replace=False)
            retrieved[q, : pick.size] = pick
        m = retrieval_metrics(labels, labels, retrieved, k, threshold=threshold, query_groups=codes,
                              gallery_groups=codes, query_attributes=attributes, gallery_attributes=attributes)
        for name in METRIC_NAMES:
            totals[name] = totals.get(name, 0.0) + m[name] / samples
    return {**totals, "samples": samples, "seed": seed}


def evaluate_garment_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    groups,
    k: int = 10,
    *,
    attributes: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
    threshold: float = RELEVANCE_THRESHOLD,
    baseline_samples: int = 5,
    seed: int = 0,
) -> dict:
    """Leave-one-photo-out over garments: each garment queries the garments of every OTHER photo.

    `labels`: one-hot categories [n, C] (relevance = same category); `groups`: the parent photo of each
    row; `attributes`: multi-hot [n, A] for NDCG's graded gain (see imat.retrieval_metrics).
    Same keys as `evaluate_embeddings`, plus "photos".
    """
    from imat.errors import DataError

    labels = np.asarray(labels) > 0
    codes = _group_codes(groups)
    n = labels.shape[0]
    photos = int(codes.max()) + 1 if n else 0
    if photos < 2:
        raise DataError(f"garment evaluation needs garments of at least 2 photos, got {n} garments of {photos}")
    k_eff = min(k, n - int(np.bincount(codes).max()))
    ids, scores = leave_group_out_topk(embeddings, codes, k_eff)
    m = retrieval_metrics(labels, labels, ids, k_eff, threshold=threshold, query_groups=codes, gallery_groups=codes,
                          query_attributes=attributes, gallery_attributes=attributes)
    predicted = None
    if probabilities is not None:
        # one category per garment: the model's top category (not a 0.5 threshold)
        predicted = np.zeros_like(labels)
        predicted[np.arange(n), np.asarray(probabilities).argmax(1)] = True
    base = random_group_ranking_metrics(labels, codes, k_eff, attributes=attributes, samples=baseline_samples,
                                        seed=seed, threshold=threshold)
    relevance = "same category, never the query's own photo" + (
        "; NDCG gain graded by attribute Jaccard" if attributes is not None else "")
    return _result(k_eff, {"count": n, "photos": photos, "relevance": relevance}, m,
                   neighbour_votes(ids, scores, labels), labels, predicted, base)
