"""ObjectiveSpec: everything the rest of imat needs to know about a training objective, in one place.

Training reads the loss, the pipeline kind and its options, and the heads the model needs;
export reads which model output is served as the retrieval ``embedding`` and whether the
classifier's ``probabilities`` are part of model.onnx; curves read the metric names; the CLI
reads the names and help. An objective is one module under ``imat/train_jax/objectives/``
that defines ``SPEC = ObjectiveSpec(...)``; the package registers every such module by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# Model outputs that can serve as the retrieval vector of model.onnx (always L2-normalised there):
# the embedding head, the backbone's pooled features, or the classifier's sigmoid probabilities.
EMBEDDING_SOURCES = ("embedding", "pooled", "probabilities")
PIPELINE_KINDS = ("classification", "triplet", "rotation")


def no_options(config: Any) -> dict[str, Any]:
    return {}


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
    """A training objective, registered by ``name``.

    ``loss_and_metrics(outputs, batch, **options(config)) -> (scalar loss, metrics dict)`` is pure
    and jit-able. ``validate(config)`` returns an error message for an option the objective cannot
    use (or None). ``trains`` names the model outputs the loss trains: the exported embedding and
    the probabilities must be among them (an untrained head is never served).
    """

    name: str
    help: str
    loss_and_metrics: Callable[..., tuple]
    pipeline: str
    embedding_source: str
    trains: frozenset[str]
    rotation_head: bool = False
    supervised: bool = True
    curve_metrics: tuple[str, ...] = ("loss",)
    options: Callable[[Any], dict[str, Any]] = no_options
    pipeline_options: Callable[[Any], dict[str, Any]] = no_options
    validate: Callable[[Any], str | None] = lambda config: None
    resume_keys: tuple[str, ...] = ()  # config options of this objective a resumed run must keep

    def __post_init__(self):
        if self.pipeline not in PIPELINE_KINDS:
            raise ValueError(f"objective {self.name!r}: pipeline {self.pipeline!r} is not one of {PIPELINE_KINDS}")
        if self.embedding_source not in EMBEDDING_SOURCES:
            raise ValueError(f"objective {self.name!r}: embedding_source {self.embedding_source!r} "
                             f"is not one of {EMBEDDING_SOURCES}")
        if self.embedding_source not in self.trains:
            raise ValueError(f"objective {self.name!r} serves {self.embedding_source!r}, which it does not train")

    @property
    def exports_probabilities(self) -> bool:
        """model.onnx carries ``probabilities`` only when the objective trains the classifier."""
        return "probabilities" in self.trains

    def embedding_candidates(self) -> tuple[str, ...]:
        """Outputs this objective trains that could serve as the retrieval vector (default first)."""
        rest = [s for s in EMBEDDING_SOURCES if s in self.trains and s != self.embedding_source]
        return (self.embedding_source, *rest)
