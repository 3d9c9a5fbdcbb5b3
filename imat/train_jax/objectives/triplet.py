"""Triplet loss on L2-normalised embeddings with multi-label relevance and in-batch mining.

Distance: squared Euclidean between unit vectors, ``d = 2 - 2 cos`` (in [0, 4]).

Relevance: the shared rule of :mod:`imat.relevance` (Jaccard of the category sets: positive
>= ``positive_threshold``, negative < ``negative_threshold``), the same masks that the online
sampler, offline mining and the retrieval metrics use.

Mining (all fixed-shape masks, so everything jits):
* ``batch_hard``: per anchor, the farthest positive and the closest negative (BxB).
* ``semi_hard``: FaceNet semi-hard over all (a, p, n) via BxBxB masks: per
  (anchor, positive) pair, the closest negative that is farther than the positive;
  when none exists, the farthest negative (as TF-Addons' triplet_semihard_loss).
* ``offline``: the batch is ``[anchors; positives; negatives]`` (3B rows) chosen by
  the pipeline; each row triple is one triplet.

The loss is ``relu(d(a,p) - d(a,n) + margin)`` averaged over *active* triplets
(loss > 0) only, so easy triplets do not dilute it; with no active triplet the
loss is exactly 0 (never 0/0 = NaN). margin > 0 by default: with margin 0 and
unnormalised embeddings the seed report's model collapsed.

Metrics: ``triplet_accuracy`` (the seed report's: fraction of valid triplets with
d(a,p) < d(a,n), over all valid in-batch (a,p,n), plus exact correct/count sums),
``active_fraction`` (share of mined triplets with loss > 0) and
``mean_pairwise_distance`` (mean Euclidean distance between the batch's
embeddings: a collapse monitor; it goes to 0 when every image maps to one point,
and is about sqrt(2) for spread-out unit vectors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imat.relevance import NEGATIVE_THRESHOLD, POSITIVE_THRESHOLD, relevance_masks
from imat.train_jax.models.heads import l2_normalize
from imat.train_jax.objectives.spec import ObjectiveSpec

MINING = ("batch_hard", "semi_hard", "offline")
DEFAULT_MARGIN = 0.2


def pairwise_sq_distances(embeddings: jax.Array) -> jax.Array:
    """BxB squared Euclidean distances of unit vectors, 2 - 2cos, clipped at 0, zero diagonal."""
    e = l2_normalize(embeddings.astype(jnp.float32))
    d = jnp.maximum(2.0 - 2.0 * (e @ e.T), 0.0)
    return d * (1.0 - jnp.eye(e.shape[0], dtype=d.dtype))


def _mean_pairwise_distance(d: jax.Array) -> jax.Array:
    n = d.shape[0]
    dist = jnp.sqrt(jax.lax.stop_gradient(d) + 1e-12) * (1.0 - jnp.eye(n, dtype=d.dtype))
    return jnp.sum(dist) / max(n * (n - 1), 1)


def _reduce_active(losses: jax.Array, valid: jax.Array):
    """Mean over active (loss > 0, valid) entries; 0 when there is none. Returns (loss, n_active, n_valid)."""
    losses = jnp.where(valid, losses, 0.0)
    active = valid & (losses > 0)
    n_active = jnp.sum(active).astype(jnp.float32)
    n_valid = jnp.sum(valid).astype(jnp.float32)
    return jnp.sum(losses) / jnp.maximum(n_active, 1.0), n_active, n_valid


def _all_triplet_accuracy(d, positive, negative):
    """Correct and total over every valid in-batch (a, p, n): d(a,p) < d(a,n)."""
    valid = positive[:, :, None] & negative[:, None, :]
    correct = valid & (d[:, :, None] < d[:, None, :])
    return jnp.sum(correct).astype(jnp.float32), jnp.sum(valid).astype(jnp.float32)


def batch_hard(d, positive, negative, margin):
    """Per anchor: farthest positive vs closest negative. Returns (loss, n_active, n_valid)."""
    has_pos = jnp.any(positive, axis=1)
    has_neg = jnp.any(negative, axis=1)
    valid = has_pos & has_neg
    hardest_pos = jnp.max(jnp.where(positive, d, -1.0), axis=1)  # distances are >= 0, so -1 is "none"
    hardest_neg = jnp.min(jnp.where(negative, d, 5.0), axis=1)  # distances are <= 4, so 5 is "none"
    losses = jax.nn.relu(hardest_pos - hardest_neg + margin)
    return _reduce_active(losses, valid)


def semi_hard(d, positive, negative, margin):
    """Per (anchor, positive): FaceNet semi-hard negative, else the farthest negative."""
    d_ap = d[:, :, None]  # (a, p, 1)
    d_an = d[:, None, :]  # (a, 1, n)
    semi = negative[:, None, :] & (d_an > d_ap)  # (a, p, n)
    has_semi = jnp.any(semi, axis=2)
    closest_semi = jnp.min(jnp.where(semi, d_an, 5.0), axis=2)
    farthest_neg = jnp.max(jnp.where(negative, d, -1.0), axis=1)  # (a,)
    chosen = jnp.where(has_semi, closest_semi, farthest_neg[:, None])
    valid = positive & jnp.any(negative, axis=1)[:, None]
    losses = jax.nn.relu(d - chosen + margin)
    return _reduce_active(losses, valid)


def loss_and_metrics(
    outputs: dict,
    batch: dict,
    *,
    margin: float = DEFAULT_MARGIN,
    mining: str = "semi_hard",
    positive_threshold: float = POSITIVE_THRESHOLD,
    negative_threshold: float = NEGATIVE_THRESHOLD,
    **_unused,
) -> tuple:
    """Triplet loss with the chosen mining; see the module docstring for definitions."""
    if mining not in MINING:
        raise ValueError(f"unknown triplet mining {mining!r}; choose one of {MINING}")
    embeddings = outputs["embedding"]
    d = pairwise_sq_distances(embeddings)
    if mining == "offline":
        n = embeddings.shape[0] // 3
        e = l2_normalize(embeddings.astype(jnp.float32))
        a, p, q = e[:n], e[n : 2 * n], e[2 * n : 3 * n]
        d_ap = jnp.sum((a - p) ** 2, axis=-1)
        d_an = jnp.sum((a - q) ** 2, axis=-1)
        loss, n_active, n_valid = _reduce_active(jax.nn.relu(d_ap - d_an + margin), jnp.ones((n,), bool))
        correct = jnp.sum(d_ap < d_an).astype(jnp.float32)
        count = jnp.asarray(n, jnp.float32)
    else:
        positive, negative = relevance_masks(batch["categories"], positive_threshold, negative_threshold, xp=jnp)
        miner = batch_hard if mining == "batch_hard" else semi_hard
        loss, n_active, n_valid = miner(d, positive, negative, margin)
        correct, count = _all_triplet_accuracy(jax.lax.stop_gradient(d), positive, negative)
    metrics = {
        "loss": loss,
        "triplet_accuracy": correct / jnp.maximum(count, 1.0),
        "triplet_correct": correct,
        "triplet_count": count,
        "active_fraction": n_active / jnp.maximum(n_valid, 1.0),
        "mean_pairwise_distance": _mean_pairwise_distance(d),
    }
    return loss, metrics


def _options(config) -> dict:
    return {"margin": config.margin, "mining": config.mining, "positive_threshold": config.positive_threshold,
            "negative_threshold": config.negative_threshold}


def _validate(config) -> str | None:
    if config.mining not in MINING:
        return f"--mining {config.mining!r}: choose one of {', '.join(MINING)}"
    if not config.margin >= 0:
        return f"--margin {config.margin!r} must be >= 0"
    return None


SPEC = ObjectiveSpec(
    name="triplet",
    help="metric learning on the embedding head (Jaccard-relevance triplets, in-batch mining)",
    loss_and_metrics=loss_and_metrics,
    pipeline="triplet",
    embedding_source="embedding",
    trains=frozenset({"pooled", "embedding"}),
    curve_metrics=("loss", "triplet_accuracy", "active_fraction", "mean_pairwise_distance", "map@10"),
    options=_options,
    pipeline_options=lambda config: {"mining": "offline" if config.mining == "offline" else "online"},
    validate=_validate,
    resume_keys=("mining",),
)
