"""Multi-label binary cross-entropy on the 46 category logits (the seed report's objective).

The loss is the mean over examples and classes of the sigmoid cross-entropy
(optax's numerically stable log-sigmoid form). Besides the loss, the metrics hold
per-class true/false positive and false negative counts at threshold 0.5, so that
micro and macro F1 over an epoch are computed from summed counts
(:class:`imat.train_jax.metrics.MetricAccumulator`), not averaged per batch.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from imat.train_jax.objectives.spec import ObjectiveSpec

THRESHOLD = 0.5


def loss_and_metrics(outputs: dict, batch: dict, *, threshold: float = THRESHOLD, **_unused) -> tuple:
    """BCE loss and per-class TP/FP/FN counts (float32[C] each) at ``threshold`` on the probabilities."""
    logits = outputs["logits"].astype(jnp.float32)
    labels = batch["categories"].astype(jnp.float32)
    loss = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels))
    # sigmoid(z) >= t  <=>  z >= logit(t); comparing logits avoids rounding in sigmoid.
    predicted = logits >= jnp.log(threshold) - jnp.log1p(-threshold)
    truth = labels >= 0.5
    tp = jnp.sum(predicted & truth, axis=0).astype(jnp.float32)
    fp = jnp.sum(predicted & ~truth, axis=0).astype(jnp.float32)
    fn = jnp.sum(~predicted & truth, axis=0).astype(jnp.float32)
    return loss, {"loss": loss, "tp": tp, "fp": fp, "fn": fn}


SPEC = ObjectiveSpec(
    name="bce",
    help="multi-label categories (sigmoid BCE, F1); serves the probabilities it trains",
    loss_and_metrics=loss_and_metrics,
    pipeline="classification",
    # BCE trains the backbone and the classifier, never the embedding head; the probabilities
    # retrieve better than the pooled features on held-out photos (benchmarks/RESULTS.md).
    embedding_source="probabilities",
    trains=frozenset({"pooled", "probabilities"}),
    curve_metrics=("loss", "f1_macro", "f1_micro", "map@10"),
)
