"""Self-supervised rotation prediction: 4-way softmax cross-entropy on ``rotation_logits``.

The pipeline rotates each (already resized) image by 0/90/180/270 degrees and
labels it 0..3 in ``batch["rotation"]``; rotating after resizing avoids the
resize-artefact shortcut big_vision warns about.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from imat.train_jax.objectives.spec import ObjectiveSpec


def loss_and_metrics(outputs: dict, batch: dict, **_unused) -> tuple:
    """Mean softmax cross-entropy and rotation accuracy (plus exact correct/count sums)."""
    logits = outputs["rotation_logits"].astype(jnp.float32)
    labels = batch["rotation"].astype(jnp.int32)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    count = jnp.asarray(labels.shape[0], jnp.float32)
    return loss, {
        "loss": loss,
        "rotation_accuracy": correct / count,
        "rotation_correct": correct,
        "rotation_count": count,
    }


SPEC = ObjectiveSpec(
    name="rotation",
    help="self-supervised 4-way rotation prediction (labels unused); serves the pooled features",
    loss_and_metrics=loss_and_metrics,
    pipeline="rotation",
    # Only the backbone (and the rotation head) learn; their pooled features are the retrieval vector.
    embedding_source="pooled",
    trains=frozenset({"pooled"}),
    rotation_head=True,
    supervised=False,
    curve_metrics=("loss", "rotation_accuracy", "map@10"),
)
