"""Exact metric accumulation and retrieval mAP@k against slow loop references."""

from __future__ import annotations

import numpy as np
import pytest

from imat.label_metrics import f1_from_counts as f1_scores
from imat.relevance import jaccard
from imat.train_jax.metrics import MetricAccumulator, retrieval_map_at_k


def _f1_loop(pred, truth):
    """Reference F1s from full prediction/label matrices (float64 loops)."""
    c = truth.shape[1]
    per, support = [], []
    TP = FP = FN = 0
    for j in range(c):
        tp = sum(1 for i in range(len(truth)) if pred[i, j] and truth[i, j])
        fp = sum(1 for i in range(len(truth)) if pred[i, j] and not truth[i, j])
        fn = sum(1 for i in range(len(truth)) if not pred[i, j] and truth[i, j])
        TP, FP, FN = TP + tp, FP + fp, FN + fn
        per.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
        support.append(tp + fn > 0)
    macro = np.mean([p for p, s in zip(per, support) if s])
    return 2 * TP / (2 * TP + FP + FN), macro, np.mean(per)


def test_f1_accumulates_counts_exactly_not_batch_means():
    rng = np.random.default_rng(0)
    truth = rng.random((50, 10)) < 0.2
    truth[:, 9] = False  # a class without support
    pred = rng.random((50, 10)) < 0.3
    acc = MetricAccumulator()
    batch_f1 = []
    for s in range(0, 50, 8):  # uneven last batch
        t, p = truth[s : s + 8], pred[s : s + 8]
        m = {"loss": 1.0, "tp": (p & t).sum(0), "fp": (p & ~t).sum(0), "fn": (~p & t).sum(0)}
        acc.update(m)
        batch_f1.append(f1_scores(m["tp"], m["fp"], m["fn"])["f1_macro"])
    out = acc.compute()
    micro, macro, macro_all = _f1_loop(pred, truth)
    assert out["f1_micro"] == pytest.approx(micro)
    assert out["f1_macro"] == pytest.approx(macro)
    assert out["f1_macro_all"] == pytest.approx(macro_all)
    assert out["f1_macro"] != pytest.approx(np.mean(batch_f1))  # batch means would be wrong
    assert out["loss"] == 1.0


def test_accuracies_from_counts():
    acc = MetricAccumulator()
    acc.update({"triplet_correct": 3, "triplet_count": 4, "triplet_accuracy": 0.75, "rotation_correct": 1, "rotation_count": 4})
    acc.update({"triplet_correct": 0, "triplet_count": 0, "triplet_accuracy": 0.0, "rotation_correct": 4, "rotation_count": 4})
    out = acc.compute()
    assert out["triplet_accuracy"] == pytest.approx(0.75)  # a batch without triplets does not count
    assert out["rotation_accuracy"] == pytest.approx(5 / 8)
    assert MetricAccumulator().compute() == {}


def _map_loop(x, y, k=10, threshold=0.5):
    x = np.asarray(x, np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sets = [set(np.flatnonzero(r >= 0.5)) for r in y]
    aps = []
    for q in range(len(x)):
        others = [j for j in range(len(x)) if j != q]
        rel = {j: bool(sets[q] | sets[j]) and len(sets[q] & sets[j]) / len(sets[q] | sets[j]) >= threshold for j in others}
        r = sum(rel.values())
        if r == 0:
            continue
        ranked = sorted(others, key=lambda j: (-float(x[q] @ x[j]), j))[:k]
        hits, s = 0, 0.0
        for i, j in enumerate(ranked, 1):
            if rel[j]:
                hits += 1
                s += hits / i
        aps.append(s / min(k, r))
    return float(np.mean(aps)) if aps else 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_map_at_k_matches_loop_reference(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(57, 6)).astype(np.float32)
    y = (rng.random((57, 5)) < 0.3).astype(np.float32)
    y[:3] = 0  # unlabelled rows: never relevant, skipped as queries
    got = retrieval_map_at_k(x, y, k=10, chunk_size=16)
    assert got == pytest.approx(_map_loop(x, y), rel=1e-9)
    assert 0.0 < got < 1.0


def test_map_perfect_and_random():
    y = np.repeat(np.eye(4, dtype=np.float32), 10, axis=0)
    x = y + 0.01 * np.random.default_rng(0).normal(size=y.shape)
    assert retrieval_map_at_k(x, y) == pytest.approx(1.0)
    rnd = retrieval_map_at_k(np.random.default_rng(1).normal(size=(40, 8)), y)
    assert rnd < 0.6


def test_jaccard_relevance():
    a = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    rel = jaccard(a, a) >= 0.5
    assert rel[0, 0] and not rel[1, 1]  # two empty sets are not relevant
