"""The parity measure itself: relative errors, the probabilities' logit scale, NaN, shape mismatches."""

from __future__ import annotations

import numpy as np
import pytest

from imat.errors import ModelError
from imat.export.validate import compare, random_images


def test_relative_error_is_max_abs_error_over_max_abs_value():
    e = {"embedding": np.array([[0.6, -0.8], [1.0, 0.0]])}
    a = {"embedding": e["embedding"] + np.array([[0, 2e-5], [0, 0]])}
    r = compare(a, e, ["embedding"], 1e-4, 2)
    assert r.relative["embedding"] == pytest.approx(2e-5) and r.absolute["embedding"] == pytest.approx(2e-5)
    assert r.ok and "embedding: rel 2.00e-05" in r.describe()
    assert not compare(a, e, ["embedding"], 1e-5, 2).ok


def test_probabilities_are_judged_on_the_logit_scale():
    logits = np.array([[2000.0, 0.1, -900.0]])
    p = np.exp(-np.logaddexp(0, -logits))  # overflow-free sigmoid
    actual = {"probabilities": p + np.array([[0, 7e-4, 0]])}  # a logit error of ~3e-3 at scale 2000
    r = compare(actual, {"probabilities": p, "logits": logits}, ["probabilities"], 1e-4, 1)
    assert r.ok and r.relative["probabilities"] == pytest.approx(7e-4 / 500)
    # Small logits: the scale is the probabilities' own, and the same error fails.
    small = np.array([[2.0, 0.1, -1.0]])
    ps = 1 / (1 + np.exp(-small))
    r = compare({"probabilities": ps + np.array([[0, 7e-4, 0]])}, {"probabilities": ps, "logits": small},
                ["probabilities"], 1e-4, 1)
    assert not r.ok and r.relative["probabilities"] == pytest.approx(7e-4 / ps.max())


def test_nan_never_passes_and_mismatches_are_model_errors():
    e = {"embedding": np.ones((2, 3))}
    a = {"embedding": np.full((2, 3), np.nan)}
    assert not compare(a, e, ["embedding"], 1.0, 2).ok
    with pytest.raises(ModelError, match="shape"):
        compare({"embedding": np.ones((2, 4))}, e, ["embedding"], 1e-4, 2)
    with pytest.raises(ModelError, match="no output 'probabilities'"):
        compare(e, e, ["probabilities"], 1e-4, 2)


def test_random_images_cover_the_range():
    x = random_images(5, 8, seed=1)
    assert x.dtype == np.uint8 and x.shape == (5, 8, 8, 3)
    assert (x[-2] == 0).all() and (x[-1] == 255).all()
    np.testing.assert_array_equal(x, random_images(5, 8, seed=1))
