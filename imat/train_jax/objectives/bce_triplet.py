"""BCE + triplet: the classifier learns the categories while the embedding head learns to rank.

``loss = bce(logits) + triplet(embedding)`` on online triplet batches (every anchor has a
positive by the shared relevance rule), with the triplet objective's margin and mining
options. Both terms train the backbone; the embedding head is trained by the triplet term
(so it is a real candidate for retrieval, unlike under BCE alone) and the classifier by BCE
(so the model also exports probabilities). Metrics: both objectives' (the BCE counts give F1;
``loss_bce`` and ``loss_triplet`` are the two terms).
"""

from __future__ import annotations

from imat.train_jax.objectives import bce, triplet
from imat.train_jax.objectives.spec import ObjectiveSpec


def loss_and_metrics(outputs: dict, batch: dict, **triplet_options) -> tuple:
    bce_loss, bce_metrics = bce.loss_and_metrics(outputs, batch)
    triplet_loss, triplet_metrics = triplet.loss_and_metrics(outputs, batch, **triplet_options)
    loss = bce_loss + triplet_loss
    return loss, {**bce_metrics, **triplet_metrics, "loss": loss, "loss_bce": bce_loss, "loss_triplet": triplet_loss}


def _validate(config) -> str | None:
    if config.mining == "offline":
        return "--mining offline: bce_triplet mines in the batch (batch_hard or semi_hard)"
    return triplet.SPEC.validate(config)


SPEC = ObjectiveSpec(
    name="bce_triplet",
    help="bce on the classifier + triplet on the embedding head, jointly",
    loss_and_metrics=loss_and_metrics,
    pipeline="triplet",
    embedding_source="embedding",
    trains=frozenset({"pooled", "embedding", "probabilities"}),
    curve_metrics=("loss", "loss_bce", "loss_triplet", "f1_macro", "mean_pairwise_distance", "map@10"),
    options=triplet.SPEC.options,
    pipeline_options=lambda config: {"mining": "online"},
    validate=_validate,
    resume_keys=("mining",),
)
