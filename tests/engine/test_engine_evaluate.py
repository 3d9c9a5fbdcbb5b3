"""Metrics against hand-computed cases and slow float64 loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imat.engine import evaluate as ev
from imat.relevance import jaccard


def slow_metrics(qlab, glab, retrieved, k, exclude, thr=0.5):
    """Straight from the definitions in imat.engine.evaluate, one query and one item at a time."""
    def jac(a, b):
        a, b = set(np.flatnonzero(a)), set(np.flatnonzero(b))
        return len(a & b) / len(a | b) if a | b else 0.0

    aps, recs, precs, ndcgs = [], [], [], []
    for q in range(len(qlab)):
        js = [jac(qlab[q], glab[g]) if g != exclude[q] else None for g in range(len(glab))]
        rel_count = sum(1 for j in js if j is not None and j >= thr)
        graded = []
        for g in retrieved[q][:k]:
            graded.append(0.0 if g < 0 or js[g] is None else js[g])
        binary = [j >= thr for j in graded]
        precs.append(sum(binary) / k)
        if rel_count:
            denom = min(rel_count, k)
            hits, ap = 0, 0.0
            for i, b in enumerate(binary, 1):
                if b:
                    hits += 1
                    ap += hits / i
            aps.append(ap / denom)
            recs.append(sum(binary) / denom)
        ideal = sorted((j for j in js if j is not None), reverse=True)[:k]
        idcg = sum(j / math.log2(i + 2) for i, j in enumerate(ideal))
        dcg = sum(j / math.log2(i + 2) for i, j in enumerate(graded))
        if idcg > 0:
            ndcgs.append(dcg / idcg)
    mean = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    return {"map": mean(aps), "recall": mean(recs), "precision": mean(precs), "ndcg": mean(ndcgs)}


def test_hand_computed_case():
    # query {0,1}; gallery J = [1, 0.5, 0, 2/3]; ranking [g2, g0, g1]
    q = np.array([[1, 1, 0]])
    g = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]])
    m = ev.retrieval_metrics(q, g, np.array([[2, 0, 1]]), 3)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)  # 3 relevant (J >= .5), 2 retrieved
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3) / 3)
    dcg = 0 + 1 / math.log2(3) + 0.5 / math.log2(4)
    idcg = 1 + (2 / 3) / math.log2(3) + 0.5 / math.log2(4)
    assert m["ndcg"] == pytest.approx(dcg / idcg)


def test_jaccard_matrix():
    a = np.array([[1, 1, 0], [0, 0, 0]])
    b = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]])
    np.testing.assert_allclose(jaccard(a, b), [[0.5, 0, 2 / 3], [0, 0, 0]])


def test_perfect_ranking_scores_one_with_recall_capped_at_k():
    g = np.array([[1, 0]] * 5 + [[0, 1]] * 5)
    q = np.array([[1, 0]])
    m = ev.retrieval_metrics(q, g, np.array([[0, 1, 2]]), 3)
    assert m["map"] == m["recall"] == m["precision"] == m["ndcg"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_metrics_match_the_slow_loop(seed):
    rng = np.random.default_rng(seed)
    n, c, k = 40, 6, 7
    labels = rng.random((n, c)) < 0.3
    labels[rng.integers(0, n, 3)] = False  # a few unlabelled images
    retrieved = np.stack([rng.permutation(n)[:k] for _ in range(n)])
    retrieved[0, -1] = -1  # an empty slot
    exclude = np.arange(n)
    retrieved[retrieved == exclude[:, None]] = -1  # the query itself is never retrieved
    fast = ev.retrieval_metrics(labels, labels, retrieved, k, exclude=exclude, chunk=7)
    slow = slow_metrics(labels, labels, retrieved, k, exclude)
    for name in ("map", "recall", "precision", "ndcg"):
        assert fast[name] == pytest.approx(slow[name], abs=1e-12), name


def test_neighbour_votes_weighted_and_normalised():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    votes = ev.neighbour_votes(np.array([[0, 1], [1, 2], [2, -1]]),
                               np.array([[0.75, 0.25], [0.5, -0.5], [-0.2, 0.0]]), labels)
    np.testing.assert_allclose(votes[0], [1.0, 0.25, 0.0])
    np.testing.assert_allclose(votes[1], [1.0, 1.0, 0.0])  # the dissimilar neighbour does not vote
    np.testing.assert_allclose(votes[2], [0.0, 0.0, 1.0])  # all weights <= 0: equal votes of valid slots
    assert votes.min() >= 0 and votes.max() <= 1


def test_f1_macro_and_micro():
    true = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]])
    pred = np.array([[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]])
    f = ev.f1_scores(true, pred)
    # c0: tp1 fn1 -> 2/3; c1: tp1 fp1 -> 2/3; c2: fn1 -> 0; c3 absent everywhere -> skipped
    assert f["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert f["f1_micro"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))
    assert f["categories_scored"] == 3


def test_drop_self():
    ids, scores = ev.drop_self(np.array([[0, 3, 2], [4, 5, 6]]), np.array([[1, .9, .8], [.9, .8, .7]]),
                               np.array([0, 9]), 2)
    np.testing.assert_array_equal(ids, [[3, 2], [4, 5]])
    np.testing.assert_allclose(scores, [[.9, .8], [.9, .8]])


def test_random_baseline_matches_its_expectation():
    rng = np.random.default_rng(0)
    labels = rng.random((60, 4)) < 0.4
    base = ev.random_ranking_metrics(labels, 5, samples=40, seed=3)
    jac = jaccard(labels, labels)
    np.fill_diagonal(jac, -1)
    expected_precision = ((jac >= 0.5).sum(1) / 59).mean()  # E[P@k] of a random ranking
    assert base["precision"] == pytest.approx(expected_precision, abs=0.02)
    assert ev.random_ranking_metrics(labels, 5, samples=2, seed=3) == ev.random_ranking_metrics(labels, 5, samples=2, seed=3)


def test_leave_one_out_on_separable_embeddings_is_perfect_and_beats_random():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.eye(3, dtype=bool), 10, axis=0)
    centres = np.eye(3, 8, dtype=np.float32)
    emb = centres[labels.argmax(1)] + 0.05 * rng.standard_normal((30, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    probs = labels.astype(np.float32) * 0.9
    r = ev.evaluate_embeddings(emb, labels, 5, probabilities=probs)
    assert r["k"] == 5 and r["count"] == 30
    assert r["map@5"] == r["precision@5"] == r["recall@5"] == r["ndcg@5"] == pytest.approx(1.0)
    assert r["f1_macro_neighbours"] == r["f1_micro_neighbours"] == r["f1_macro_model"] == 1.0
    assert r["baseline"]["precision@5"] < 0.5


def test_leave_one_out_matches_a_brute_force_loop():
    rng = np.random.default_rng(1)
    labels = rng.random((25, 5)) < 0.4
    emb = rng.standard_normal((25, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    r = ev.evaluate_embeddings(emb, labels, 4, baseline_samples=1)
    sims = emb.astype(np.float64) @ emb.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    retrieved = np.argsort(-sims, axis=1)[:, :4]
    slow = slow_metrics(labels, labels, retrieved, 4, np.arange(25))
    assert r["map@4"] == pytest.approx(slow["map"], abs=1e-9)
    assert r["ndcg@4"] == pytest.approx(slow["ndcg"], abs=1e-9)
