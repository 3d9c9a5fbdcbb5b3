"""Triplet mining and in-batch masks against slow pure-Python references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imat.data_tools import triplets


def _random_labels(n: int, c: int, seed: int, density: float = 0.12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < density).astype(np.float32)
    labels[rng.integers(0, n, size=3)] = 0.0   # a few images without any category
    return labels


def _sets(labels):
    return [set(np.flatnonzero(row > 0.5).tolist()) for row in labels]


def _reference(labels, seed, thresholds=(3, 2, 1, 0), relax_negatives=False):
    """Slow loop: same rules and the same per-anchor draws as the vectorised miner."""
    sets = _sets(labels)
    n = len(sets)
    rng = np.random.default_rng(seed)
    u_pos, u_neg = rng.random(n), rng.random(n)
    out, dropped_pos, dropped_neg = [], 0, 0
    for i in range(n):
        level, cands = None, []
        for t in thresholds:
            cands = [j for j in range(n) if j != i and len(sets[i] & sets[j]) > t]
            if cands:
                level = t
                break
        if level is None:
            dropped_pos += 1
            continue
        negs = [j for j in range(n) if j != i and not (sets[i] & sets[j])]
        if not negs and relax_negatives:
            fewest = min(len(sets[i] & sets[j]) for j in range(n) if j != i)
            if fewest <= level:   # fewer than the positive shares
                negs = [j for j in range(n) if j != i and len(sets[i] & sets[j]) == fewest]
        if not negs:
            dropped_neg += 1
            continue
        p = cands[min(int(math.floor(u_pos[i] * len(cands))), len(cands) - 1)]
        q = negs[min(int(math.floor(u_neg[i] * len(negs))), len(negs) - 1)]
        out.append((i, p, q, level))
    return out, dropped_pos, dropped_neg


@pytest.mark.parametrize("seed,chunk,relax", [(0, 7, False), (1, 512, False), (5, 1, False),
                                              (0, 7, True), (2, 16, True)])
def test_offline_matches_loop_reference(seed, chunk, relax):
    labels = _random_labels(60, 12, seed=seed, density=0.3)
    mined = triplets.mine_offline(labels, seed, chunk_size=chunk, relax_negatives=relax)
    ref, dp, dn = _reference(labels, seed, relax_negatives=relax)
    got = list(zip(mined.anchors.tolist(), mined.positives.tolist(), mined.negatives.tolist(),
                   mined.thresholds.tolist()))
    assert got == ref
    assert (mined.dropped_no_positive, mined.dropped_no_negative) == (dp, dn)
    assert dp >= 3   # the all-zero rows cannot have a positive
    assert len(set(mined.thresholds.tolist())) > 1, "the test should exercise the relaxation"


def test_offline_constraints_and_determinism():
    labels = _random_labels(200, 46, seed=3, density=0.15)
    a, p, n = triplets.offline_triplets(labels, seed=11, chunk_size=64)
    a2, p2, n2 = triplets.offline_triplets(labels, seed=11, chunk_size=1000)
    assert np.array_equal(a, a2) and np.array_equal(p, p2) and np.array_equal(n, n2)
    one = triplets.mine_offline(labels, seed=11, chunk_size=64, workers=1)   # threads change nothing
    assert np.array_equal(a, one.anchors) and np.array_equal(p, one.positives) and np.array_equal(n, one.negatives)
    a3, p3, _ = triplets.offline_triplets(labels, seed=12)
    assert not (np.array_equal(a, a3) and np.array_equal(p, p3))
    sets = _sets(labels)
    assert len(a) > 150
    for i, j, k in zip(a, p, n):
        assert i != j and i != k
        assert sets[i] & sets[j], "positive shares a category"
        assert not sets[i] & sets[k], "negative shares none"


def test_offline_prefers_strict_positives():
    # Row 0 shares 4 categories with row 1 and 1 with row 2: only row 1 is allowed.
    labels = np.zeros((4, 10), np.float32)
    labels[0, :5] = 1
    labels[1, :4] = 1
    labels[2, [0, 9]] = 1
    labels[3, 7] = 1
    mined = triplets.mine_offline(labels, seed=0)
    row = dict(zip(mined.anchors.tolist(), zip(mined.positives.tolist(), mined.thresholds.tolist())))
    assert row[0] == (1, 3)
    assert row[2][1] == 0          # relaxed down to "> 0"
    assert 3 not in row            # shares nothing with anyone -> dropped
    assert mined.dropped_no_positive == 1


def test_no_negative_anchor_is_dropped():
    labels = np.zeros((3, 4), np.float32)
    labels[:, 0] = 1                # everybody shares category 0: no negatives at all
    mined = triplets.mine_offline(labels, seed=0)
    assert len(mined) == 0 and mined.dropped_no_negative == 3


def test_masks_and_jaccard_match_loops():
    labels = _random_labels(17, 9, seed=4, density=0.35)
    sets = _sets(labels)
    shared = triplets.shared_counts(labels)
    jac = triplets.jaccard(labels)
    pos = triplets.positive_mask(labels, min_shared=2)
    neg = triplets.negative_mask(labels)
    for i in range(17):
        for j in range(17):
            inter = len(sets[i] & sets[j])
            union = len(sets[i] | sets[j])
            assert shared[i, j] == inter
            assert jac[i, j] == pytest.approx(inter / union if union else 0.0, abs=1e-6)
            assert pos[i, j] == (i != j and inter >= 2)
            assert neg[i, j] == (i != j and inter == 0)
    assert shared.dtype == np.int32 and jac.dtype == np.float32


def test_shared_counts_rectangular():
    a = _random_labels(5, 46, seed=1, density=0.5)
    b = _random_labels(8, 46, seed=2, density=0.5)
    expect = np.array([[len(x & y) for y in _sets(b)] for x in _sets(a)])
    assert np.array_equal(triplets.shared_counts(a, b), expect)


def test_relaxed_negatives_order_the_pair():
    # Everybody shares category 0; rows also share 1-3 more categories in a chain.
    labels = np.zeros((6, 8), np.float32)
    labels[:, 0] = 1
    labels[[0, 1, 2], 1] = 1
    labels[[0, 1], 2] = 1
    labels[[3, 4, 5], 5] = 1
    strict = triplets.mine_offline(labels, seed=0)
    assert len(strict) == 0 and strict.dropped_no_negative == 6
    relaxed = triplets.mine_offline(labels, seed=0, relax_negatives=True)
    shared = triplets.shared_counts(labels)
    assert len(relaxed) == 6
    for a, p, n in zip(relaxed.anchors, relaxed.positives, relaxed.negatives):
        assert shared[a, n] < shared[a, p]
        assert shared[a, n] == min(shared[a, j] for j in range(6) if j != a)
