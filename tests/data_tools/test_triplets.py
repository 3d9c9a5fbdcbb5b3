"""Offline triplet mining (the shared relevance rule) against a slow pure-Python reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imat.data_tools import triplets
from imat.relevance import Relevance


def _random_labels(n: int, c: int, seed: int, density: float = 0.12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < density).astype(np.float32)
    labels[rng.integers(0, n, size=3)] = 0.0   # a few images without any category
    return labels


def _sets(labels):
    return [set(np.flatnonzero(row > 0.5).tolist()) for row in labels]


def _jac(a, b):
    return len(a & b) / len(a | b) if (a | b) else 0.0


def _reference(labels, seed, pos_t=0.5, neg_t=0.25, relax_negatives=False):
    """Slow loop: the same rule and the same per-anchor draws as the vectorised miner."""
    sets = _sets(labels)
    n = len(sets)
    rng = np.random.default_rng(seed)
    u_pos, u_neg = rng.random(n), rng.random(n)
    out, dropped_pos, dropped_neg = [], 0, 0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        cands = [j for j in others if _jac(sets[i], sets[j]) >= pos_t]
        if not cands:
            dropped_pos += 1
            continue
        negs = [j for j in others if _jac(sets[i], sets[j]) < neg_t or _jac(sets[i], sets[j]) == 0]
        relaxed = False
        if not negs and relax_negatives:
            lowest = min(_jac(sets[i], sets[j]) for j in others)
            if lowest < pos_t:
                negs = [j for j in others if _jac(sets[i], sets[j]) == lowest]
                relaxed = True
        if not negs:
            dropped_neg += 1
            continue
        p = cands[min(int(math.floor(u_pos[i] * len(cands))), len(cands) - 1)]
        q = negs[min(int(math.floor(u_neg[i] * len(negs))), len(negs) - 1)]
        out.append((i, p, q, relaxed))
    return out, dropped_pos, dropped_neg


@pytest.mark.parametrize("seed,chunk,relax,thresholds", [(0, 7, False, (0.5, 0.25)), (1, 512, False, (0.4, 0.1)),
                                                         (5, 1, False, (0.5, 0.25)), (0, 7, True, (0.5, 0.25)),
                                                         (2, 16, True, (0.6, 0.3))])
def test_offline_matches_loop_reference(seed, chunk, relax, thresholds):
    labels = _random_labels(60, 12, seed=seed, density=0.3)
    mined = triplets.mine_offline(labels, seed, relevance=Relevance(*thresholds), chunk_size=chunk,
                                  relax_negatives=relax)
    ref, dp, dn = _reference(labels, seed, *thresholds, relax_negatives=relax)
    got = list(zip(mined.anchors.tolist(), mined.positives.tolist(), mined.negatives.tolist(),
                   mined.relaxed.tolist()))
    assert got == ref
    assert (mined.dropped_no_positive, mined.dropped_no_negative) == (dp, dn)
    assert dp >= 3   # the all-zero rows cannot have a positive


def test_offline_constraints_and_determinism():
    labels = _random_labels(200, 20, seed=3, density=0.15)
    a = triplets.mine_offline(labels, seed=11, chunk_size=64)
    b = triplets.mine_offline(labels, seed=11, chunk_size=1000)
    one = triplets.mine_offline(labels, seed=11, chunk_size=64, workers=1)   # threads change nothing
    for m in (b, one):
        assert all(np.array_equal(getattr(a, f), getattr(m, f)) for f in ("anchors", "positives", "negatives"))
    c = triplets.mine_offline(labels, seed=12)
    assert not np.array_equal(a.positives, c.positives)
    sets = _sets(labels)
    assert len(a) > 50
    for i, j, k in zip(a.anchors, a.positives, a.negatives):
        assert i != j and i != k
        assert _jac(sets[i], sets[j]) >= 0.5, "positive is relevant"
        assert _jac(sets[i], sets[k]) < 0.25, "negative is a negative"


def test_no_negative_anchor_is_dropped():
    labels = np.zeros((3, 4), np.float32)
    labels[:, 0] = 1                # everybody has the same set: all positives, no negatives at all
    mined = triplets.mine_offline(labels, seed=0)
    assert len(mined) == 0 and mined.dropped_no_negative == 3


def test_relaxed_negatives_order_the_pair():
    # Everybody shares category 0 and 1, so no pair is below Jaccard 0.25.
    labels = np.zeros((6, 8), np.float32)
    labels[:, :2] = 1
    labels[[0, 1], 2] = 1
    labels[[3, 4, 5], 5] = 1
    labels[5, 6] = 1
    strict = triplets.mine_offline(labels, seed=0)
    assert len(strict) == 0 and strict.dropped_no_negative > 0
    relaxed = triplets.mine_offline(labels, seed=0, relax_negatives=True)
    sets = _sets(labels)
    assert len(relaxed) > 0 and relaxed.relaxed.all()
    for a, p, n in zip(relaxed.anchors, relaxed.positives, relaxed.negatives):
        assert _jac(sets[a], sets[n]) < _jac(sets[a], sets[p])
        assert _jac(sets[a], sets[n]) == min(_jac(sets[a], sets[j]) for j in range(6) if j != a)
