"""Retrieval metrics shared by training (validation mAP) and the engine (imat eval): pure numpy.

Relevance between two images is the shared rule of :mod:`imat.relevance`: the
Jaccard index of their category sets (two empty sets count as 0, i.e. unlabelled
images are never relevant).

Definitions (per query, averaged over queries; k = cut-off):

- binary relevance: Jaccard >= 0.5 (`threshold`)
- precision@k = relevant in top k / k  (all queries)
- R_q = number of relevant gallery items, excluding the query itself
- recall@k = relevant in top k / min(R_q, k)  -- capped at k so that a perfect
  ranking scores 1 even when R_q > k; averaged over queries with R_q > 0
- AP@k = sum_i P@i * rel_i / min(R_q, k); mAP@k averages it over queries with R_q > 0
- NDCG@k = DCG / IDCG with graded gain = Jaccard, discount 1/log2(rank+1); IDCG from
  the k best Jaccard values in the gallery (excluding the query); averaged over
  queries with IDCG > 0

Garments (`imat eval --garments`): `query_groups` / `gallery_groups` (the parent photo of each
row) exclude every gallery row of the query's own photo, as the query itself is excluded; with
`query_attributes` / `gallery_attributes`, NDCG's graded gain of a relevant item is
0.5 + 0.5 x the Jaccard of the two attribute sets when both have attributes (else 1), times the
category Jaccard: a same-category garment with the same attributes gains most.
"""

from __future__ import annotations

import numpy as np

from imat.relevance import POSITIVE_THRESHOLD as RELEVANCE_THRESHOLD
from imat.relevance import jaccard

METRIC_NAMES = ("map", "precision", "recall", "ndcg")


def retrieval_metrics(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    retrieved: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    threshold: float = RELEVANCE_THRESHOLD,
    chunk: int = 1024,
    query_groups: np.ndarray | None = None,
    gallery_groups: np.ndarray | None = None,
    query_attributes: np.ndarray | None = None,
    gallery_attributes: np.ndarray | None = None,
) -> dict:
    """mAP@k, precision@k, recall@k, NDCG@k of `retrieved` (int[Q,>=k] gallery rows; -1 = empty slot).

    `exclude[q]` is a gallery row not counted as relevant for query q (the query itself in
    leave-one-out), or -1.
    """
    retrieved = np.asarray(retrieved, dtype=np.int64)[:, :k]
    q_count = retrieved.shape[0]
    if exclude is None:
        exclude = np.full(q_count, -1, dtype=np.int64)
    exclude = np.asarray(exclude, dtype=np.int64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ap, rec, prec, ndcg = [], [], [], []
    for start in range(0, q_count, chunk):
        stop = min(q_count, start + chunk)
        jac = jaccard(query_labels[start:stop], gallery_labels)
        rows = np.arange(stop - start)
        ex = exclude[start:stop]
        has_ex = ex >= 0
        jac[rows[has_ex], ex[has_ex]] = -1.0  # never relevant, never in the ideal ranking
        if query_groups is not None:  # the query's own photo: never relevant either
            jac[np.asarray(query_groups)[start:stop, None] == np.asarray(gallery_groups)[None, :]] = -1.0
        gain = jac
        if query_attributes is not None:
            qa, ga = np.asarray(query_attributes)[start:stop] > 0, np.asarray(gallery_attributes) > 0
            both = qa.any(1)[:, None] & ga.any(1)[None, :]
            gain = np.where(jac > 0, jac * np.where(both, 0.5 + 0.5 * jaccard(qa, ga), 1.0), jac)
        ret = retrieved[start:stop]
        valid = ret >= 0
        graded = np.where(valid, np.take_along_axis(jac, np.where(valid, ret, 0), axis=1), 0.0)
        graded = np.clip(graded, 0.0, None)
        if graded.shape[1] < k:  # fewer slots than k: the missing ones are non-relevant
            graded = np.pad(graded, ((0, 0), (0, k - graded.shape[1])))
        binary = graded >= threshold
        if gain is not jac:
            graded = np.where(valid, np.take_along_axis(gain, np.where(valid, ret, 0), axis=1), 0.0)
            graded = np.clip(graded, 0.0, None)
            if graded.shape[1] < k:
                graded = np.pad(graded, ((0, 0), (0, k - graded.shape[1])))
        n_rel = (jac >= threshold).sum(1)
        hits = binary.sum(1)
        prec.append(hits / k)
        denom = np.minimum(n_rel, k)
        has_rel = n_rel > 0
        cum_prec = np.cumsum(binary, axis=1) / np.arange(1, k + 1)
        ap_q = (cum_prec * binary).sum(1)
        ap.append((ap_q[has_rel] / denom[has_rel]))
        rec.append(hits[has_rel] / denom[has_rel])
        kk = min(k, jac.shape[1])
        # negated so that ascending sort/partition order puts the best Jaccard first
        neg_top = np.partition(-gain, kk - 1, axis=1)[:, :kk] if kk < gain.shape[1] else -gain
        ideal = np.clip(-np.sort(neg_top, axis=1), 0.0, None)
        idcg = (ideal * discounts[:kk]).sum(1)
        dcg = (graded * discounts).sum(1)
        ok = idcg > 0
        ndcg.append(dcg[ok] / idcg[ok])

    def _mean(parts: list[np.ndarray]) -> float:
        values = np.concatenate(parts) if parts else np.zeros(0)
        return float(values.mean()) if values.size else 0.0

    return {
        "map": _mean(ap),
        "precision": _mean(prec),
        "recall": _mean(rec),
        "ndcg": _mean(ndcg),
        "queries": int(q_count),
        "queries_with_relevant": int(sum(len(a) for a in ap)),
    }


def exact_leave_one_out_topk(embeddings: np.ndarray, k: int, *, chunk: int = 1024) -> np.ndarray:
    """int[n, min(k, n-1)]: each row's k most cosine-similar other rows (exact; ties by row index)."""
    x = np.asarray(embeddings, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    kk = min(k, n - 1)
    out = np.empty((n, kk), dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        scores = x[start:stop] @ x.T
        scores[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # leave the query out
        out[start:stop] = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    return out
