"""imat.relevance: the one rule (Jaccard of category sets), identical in numpy and jax.numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from imat.relevance import Relevance, jaccard, relevance_masks


def _loop_masks(y, pos_t, neg_t):
    sets = [set(np.flatnonzero(r >= 0.5)) for r in y]
    n = len(sets)
    pos = np.zeros((n, n), bool)
    neg = np.zeros((n, n), bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            union = len(sets[i] | sets[j])
            jac = len(sets[i] & sets[j]) / union if union else 0.0
            pos[i, j] = jac >= pos_t
            neg[i, j] = jac < neg_t or jac == 0
    return pos, neg


def test_relevance_masks_are_multilabel_jaccard():
    y = np.array(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1],
        ],
        np.float32,
    )
    pos, neg = relevance_masks(y, 0.5, 0.25)
    assert pos[0, 1] and pos[1, 0]  # {0,1} vs {0,1,2}: J = 2/3
    assert not pos[0, 2] and not neg[0, 2]  # {0,1} vs {0,3}: J = 1/3 -> neither
    assert neg[0, 3] and neg[3, 0]  # share nothing
    assert not neg[1, 3] and not pos[1, 3]  # {0,1,2} vs {2,3}: J = 1/4, not below 0.25 -> neither
    assert neg[4, 5]  # {0,1,2,3} vs {3,4,5}: share one, J = 1/6 < 0.25 -> negative
    assert not pos.diagonal().any() and not neg.diagonal().any()
    assert not (pos & neg).any()




@pytest.mark.parametrize("pos_t,neg_t", [(0.5, 0.25), (0.3, 0.0), (1.0, 0.5)])
def test_numpy_and_jax_masks_equal_the_loop(pos_t, neg_t):
    rng = np.random.default_rng(3)
    y = (rng.random((40, 9)) < 0.3).astype(np.float32)
    y[:3] = 0  # unlabelled rows: never relevant, always negative
    want = _loop_masks(y, pos_t, neg_t)
    for xp in (np, jnp):
        got = relevance_masks(y, pos_t, neg_t, xp=xp)
        assert np.array_equal(np.asarray(got[0]), want[0]) and np.array_equal(np.asarray(got[1]), want[1])
    assert np.array_equal(Relevance(pos_t, neg_t).masks(y)[0], want[0])
    assert jaccard(y)[0, 1] == 0.0


def test_thresholds_are_validated():
    with pytest.raises(ValueError, match="positive_threshold"):
        Relevance(0.0)
    with pytest.raises(ValueError, match="negative_threshold"):
        Relevance(0.5, 0.6)
