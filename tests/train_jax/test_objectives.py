"""Objectives against slow float64 loop references; jit-ability; no NaN without active triplets."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imat.errors import ConfigError
from imat.train_jax.objectives import get_objective, objective_names

RNG = np.random.default_rng(0)


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _labels(b, c=6, p=0.35, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((b, c)) < p).astype(np.float32)
    y[np.arange(b), rng.integers(0, c, b)] = 1.0  # at least one category each
    return y


def _sets(y):
    return [set(np.flatnonzero(row >= 0.5)) for row in y]


def _rel(sa, sb, threshold=0.5, negative_threshold=0.25):
    union = len(sa | sb)
    jac = len(sa & sb) / union if union else 0.0
    pos = union > 0 and jac >= threshold
    neg = len(sa & sb) == 0 or jac < negative_threshold
    return pos, neg


def _sqd(a, b):
    return float(np.sum((a - b) ** 2))


def test_registry_and_unknown_name():
    assert {"bce", "triplet", "rotation"} <= set(objective_names())
    with pytest.raises(ConfigError, match="--objective"):
        get_objective("contrastive")


@pytest.mark.parametrize("name", objective_names())
def test_every_spec_serves_what_it_trains(name):
    spec = get_objective(name)
    assert spec.embedding_source in spec.trains and spec.embedding_candidates()[0] == spec.embedding_source
    assert spec.exports_probabilities == ("probabilities" in spec.trains)
    assert "loss" in spec.curve_metrics


def test_bce_matches_loop_reference():
    b, c = 7, 46
    logits = RNG.normal(0, 3, (b, c)).astype(np.float32)
    labels = _labels(b, c, 0.1, seed=1)
    loss, m = jax.jit(get_objective("bce").loss_and_metrics)({"logits": logits}, {"categories": labels})
    ref, tp, fp, fn = 0.0, np.zeros(c), np.zeros(c), np.zeros(c)
    for i in range(b):
        for j in range(c):
            z, y = float(logits[i, j]), float(labels[i, j])
            p = 1 / (1 + np.exp(-z))
            ref += -(y * np.log(p) + (1 - y) * np.log(1 - p))
            pred = p >= 0.5
            tp[j] += pred and y == 1
            fp[j] += pred and y == 0
            fn[j] += (not pred) and y == 1
    np.testing.assert_allclose(float(loss), ref / (b * c), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["tp"]), tp)
    np.testing.assert_array_equal(np.asarray(m["fp"]), fp)
    np.testing.assert_array_equal(np.asarray(m["fn"]), fn)


def test_bce_is_stable_for_huge_logits():
    logits = np.array([[1e4, -1e4]], np.float32)
    loss, _ = get_objective("bce").loss_and_metrics({"logits": logits}, {"categories": np.array([[0.0, 1.0]], np.float32)})
    assert np.isfinite(float(loss)) and float(loss) > 1e3


def test_rotation_matches_loop_reference():
    logits = RNG.normal(0, 2, (12, 4)).astype(np.float32)
    labels = RNG.integers(0, 4, 12).astype(np.int32)
    loss, m = jax.jit(get_objective("rotation").loss_and_metrics)({"rotation_logits": logits}, {"rotation": labels})
    ref, correct = 0.0, 0
    for z, y in zip(logits.astype(np.float64), labels):
        ref += -(z[y] - np.log(np.sum(np.exp(z))))
        correct += int(np.argmax(z) == y)
    np.testing.assert_allclose(float(loss), ref / 12, rtol=1e-5)
    assert float(m["rotation_accuracy"]) == pytest.approx(correct / 12)
    assert float(m["rotation_correct"]) == correct and float(m["rotation_count"]) == 12


def _reference_online(e, y, margin, mining, threshold=0.5):
    """Slow loop reference of the online miners, float64. Returns (loss, n_active, n_valid, acc_correct, acc_total)."""
    e = _unit(e)
    sets = _sets(y)
    b = len(sets)
    pos = [[j for j in range(b) if j != i and _rel(sets[i], sets[j], threshold)[0]] for i in range(b)]
    neg = [[j for j in range(b) if j != i and _rel(sets[i], sets[j], threshold)[1]] for i in range(b)]
    losses = []
    for a in range(b):
        if not pos[a] or not neg[a]:
            continue
        if mining == "batch_hard":
            hp = max(_sqd(e[a], e[p]) for p in pos[a])
            hn = min(_sqd(e[a], e[n]) for n in neg[a])
            losses.append(max(hp - hn + margin, 0.0))
        else:
            for p in pos[a]:
                dap = _sqd(e[a], e[p])
                semi = [_sqd(e[a], e[n]) for n in neg[a] if _sqd(e[a], e[n]) > dap]
                dn = min(semi) if semi else max(_sqd(e[a], e[n]) for n in neg[a])
                losses.append(max(dap - dn + margin, 0.0))
    active = [l for l in losses if l > 0]
    loss = sum(active) / len(active) if active else 0.0
    correct = total = 0
    for a in range(b):
        for p, n in itertools.product(pos[a], neg[a]):
            total += 1
            correct += _sqd(e[a], e[p]) < _sqd(e[a], e[n])
    return loss, len(active), len(losses), correct, total


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_triplet_matches_loop_reference(mining, seed):
    b = 16
    rng = np.random.default_rng(seed)
    e = _unit(rng.normal(size=(b, 8))).astype(np.float32)
    y = _labels(b, 5, 0.3, seed=seed + 10)
    fn = jax.jit(lambda o, bt: get_objective("triplet").loss_and_metrics(o, bt, margin=0.3, mining=mining))
    loss, m = fn({"embedding": e}, {"categories": y})
    ref_loss, n_active, n_valid, correct, total = _reference_online(e, y, 0.3, mining)
    assert n_valid > 0 and total > 0, "test data must contain valid triplets"
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4, atol=1e-6)
    assert float(m["active_fraction"]) == pytest.approx(n_active / n_valid, abs=1e-6)
    assert float(m["triplet_correct"]) == correct and float(m["triplet_count"]) == total
    ref_mpd = np.mean([np.sqrt(_sqd(e[i], e[j])) for i in range(b) for j in range(b) if i != j])
    assert float(m["mean_pairwise_distance"]) == pytest.approx(ref_mpd, rel=1e-4)


def test_offline_triplet_matches_loop_reference():
    n = 6
    e = _unit(RNG.normal(size=(3 * n, 8))).astype(np.float32)
    loss, m = jax.jit(lambda o: get_objective("triplet").loss_and_metrics(o, {}, margin=0.5, mining="offline"))({"embedding": e})
    losses = [max(_sqd(e[i], e[n + i]) - _sqd(e[i], e[2 * n + i]) + 0.5, 0.0) for i in range(n)]
    active = [l for l in losses if l > 0]
    np.testing.assert_allclose(float(loss), sum(active) / max(len(active), 1), rtol=1e-5)
    correct = sum(_sqd(e[i], e[n + i]) < _sqd(e[i], e[2 * n + i]) for i in range(n))
    assert float(m["triplet_accuracy"]) == pytest.approx(correct / n)
    assert float(m["active_fraction"]) == pytest.approx(len(active) / n)


@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "offline"])
def test_no_active_triplets_gives_zero_loss_and_finite_grads(mining):
    # Two perfectly separated clusters: every triplet satisfied with a margin of 0.1 -> nothing active.
    y = np.zeros((6, 4), np.float32)
    y[:3, 0] = 1
    y[3:, 1] = 1
    e = np.zeros((6, 4), np.float32)
    e[:3, 0] = 1
    e[3:, 1] = 1
    if mining == "offline":
        e = np.concatenate([e[:2], e[1:3], e[3:5]])  # anchors (cluster 0), positives (cluster 0), negatives
    f = lambda emb: get_objective("triplet").loss_and_metrics({"embedding": emb}, {"categories": y}, margin=0.1, mining=mining)
    loss, m = jax.jit(f)(e)
    grads = jax.grad(lambda emb: f(emb)[0])(jnp.asarray(e))
    assert float(loss) == 0.0
    assert float(m["active_fraction"]) == 0.0
    assert np.all(np.isfinite(np.asarray(grads)))
    # And with no valid triplet at all (no negatives in the batch): still 0, not NaN.
    if mining != "offline":
        same = np.ones((6, 4), np.float32)
        loss2, m2 = get_objective("triplet").loss_and_metrics({"embedding": e}, {"categories": same}, mining=mining)
        assert float(loss2) == 0.0 and np.isfinite(float(m2["triplet_accuracy"]))


def test_triplet_loss_gradient_reduces_loss():
    e = _unit(RNG.normal(size=(16, 8))).astype(np.float32)
    y = _labels(16, 5, 0.3, seed=3)
    f = lambda emb: get_objective("triplet").loss_and_metrics({"embedding": emb}, {"categories": y}, margin=0.3)[0]
    g = jax.grad(f)(jnp.asarray(e))
    assert float(f(jnp.asarray(e) - 0.05 * g)) < float(f(jnp.asarray(e)))
