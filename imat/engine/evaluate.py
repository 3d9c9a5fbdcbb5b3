"""Retrieval and label metrics (pure numpy), leave-one-out evaluation, random-ranking baseline.

Relevance between two images is the Jaccard index of their category sets
(|A & B| / |A | B|; two empty sets count as 0, i.e. unlabelled images are never
relevant). Street photos nearly always share *some* category (shoes, bags), so
"shares any" would make every ranking look good; Jaccard does not.

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
- F1 of predicted categories: micro over all (image, category) pairs; macro = mean of
  per-category F1 over categories that occur in the truth or the predictions
  (a category absent from both has undefined F1 and is skipped)
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

RELEVANCE_THRESHOLD = 0.5
VOTE_THRESHOLD = 0.5
METRIC_NAMES = ("map", "precision", "recall", "ndcg")


def jaccard_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64[Q,N] Jaccard of the label sets in rows of a (bool/0-1 [Q,C]) and b ([N,C]); empty-empty = 0."""
    a = (np.asarray(a) > 0).astype(np.float64)
    b = (np.asarray(b) > 0).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def retrieval_metrics(
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    retrieved: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    threshold: float = RELEVANCE_THRESHOLD,
    chunk: int = 1024,
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
        jac = jaccard_matrix(query_labels[start:stop], gallery_labels)
        rows = np.arange(stop - start)
        ex = exclude[start:stop]
        has_ex = ex >= 0
        jac[rows[has_ex], ex[has_ex]] = -1.0  # never relevant, never in the ideal ranking
        ret = retrieved[start:stop]
        valid = ret >= 0
        graded = np.where(valid, np.take_along_axis(jac, np.where(valid, ret, 0), axis=1), 0.0)
        graded = np.clip(graded, 0.0, None)
        if graded.shape[1] < k:  # fewer slots than k: the missing ones are non-relevant
            graded = np.pad(graded, ((0, 0), (0, k - graded.shape[1])))
        binary = graded >= threshold
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
        neg_top = np.partition(-jac, kk - 1, axis=1)[:, :kk] if kk < jac.shape[1] else -jac
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


def f1_scores(true: np.ndarray, pred: np.ndarray) -> dict:
    """Macro and micro F1 of multi-label predictions (bool/0-1 [N,C])."""
    t = np.asarray(true) > 0
    p = np.asarray(pred) > 0
    tp = (t & p).sum(0).astype(np.float64)
    fp = (~t & p).sum(0).astype(np.float64)
    fn = (t & ~p).sum(0).astype(np.float64)
    denom = 2 * tp + fp + fn
    present = denom > 0
    per_class = np.where(present, 2 * tp / np.where(present, denom, 1), 0.0)
    micro_denom = denom.sum()
    return {
        "f1_macro": float(per_class[present].mean()) if present.any() else 0.0,
        "f1_micro": float(2 * tp.sum() / micro_denom) if micro_denom > 0 else 0.0,
        "categories_scored": int(present.sum()),
    }


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
    votes = neighbour_votes(ids, scores, labels)
    f1_n = f1_scores(labels, votes >= VOTE_THRESHOLD)
    result = {
        "k": k_eff,
        "count": n,
        "relevance": f"jaccard>={threshold}",
        f"map@{k_eff}": m["map"],
        f"precision@{k_eff}": m["precision"],
        f"recall@{k_eff}": m["recall"],
        f"ndcg@{k_eff}": m["ndcg"],
        "queries_with_relevant": m["queries_with_relevant"],
        "f1_macro_neighbours": f1_n["f1_macro"],
        "f1_micro_neighbours": f1_n["f1_micro"],
    }
    if probabilities is not None:
        f1_m = f1_scores(labels, np.asarray(probabilities) >= VOTE_THRESHOLD)
        result["f1_macro_model"] = f1_m["f1_macro"]
        result["f1_micro_model"] = f1_m["f1_micro"]
    base = random_ranking_metrics(labels, k_eff, samples=baseline_samples, seed=seed, threshold=threshold)
    result["baseline"] = {f"{name}@{k_eff}": base[name] for name in METRIC_NAMES} | {
        "samples": base["samples"],
        "seed": base["seed"],
    }
    return result
