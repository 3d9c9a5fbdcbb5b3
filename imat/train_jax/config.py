"""TrainConfig: every option of a training run, with the seed report's defaults.

Defaults (DESIGN.md "Defaults that come from the seed report"): 128x128 images,
Adam with learning rate 5e-4, batch 32, BCE with macro F1 at 0.5 as the headline
metric. imat's own choices: architecture ``resnet18`` (the standard ImageNet
baseline, with torchvision weights to initialise from; ``mobilenet_v2`` is the
lighter option), triplet margin 0.2 on L2-normalised embeddings with
``semi_hard`` in-batch mining (the report's margin-0 model collapsed), 10 epochs.
Semi-hard, not batch-hard, by default: trained from scratch on ccp-dev (500 real photos,
MobileNetV2, 300 steps) batch-hard collapsed (mean pairwise distance 0.05, triplet
accuracy 0.50) while semi-hard kept the embeddings spread (1.23); see benchmarks/RESULTS.md.

A config is stored as ``workdir/config.json`` (plus package versions) and is the
only thing needed to rebuild the model (``checkpoint.load_model_from_run``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from imat.constants import DEFAULT_IMAGE_SIZE, NUM_CATEGORIES
from imat.errors import ConfigError

OBJECTIVES = ("bce", "triplet", "rotation")
MINING = ("batch_hard", "semi_hard", "offline")
OPTIMIZERS = ("adam",)

# Options that change the model, the optimizer state or the batch sequence: a rerun in
# an existing workdir must keep them, or resuming would be meaningless or impossible.
RESUME_KEYS = (
    "arch", "objective", "embedding_dim", "num_classes", "image_size", "batch_size",
    "seed", "optimizer", "mining", "augment", "depthwise", "width_mult",
)


@dataclasses.dataclass
class TrainConfig:
    data_dir: str = ""
    arch: str = "resnet18"
    objective: str = "bce"
    optimizer: str = "adam"
    learning_rate: float = 5e-4
    batch_size: int = 32
    image_size: int = DEFAULT_IMAGE_SIZE
    epochs: int | None = 10
    steps: int | None = None  # when set, overrides epochs
    eval_every: int | None = None  # steps; None -> once per epoch (and always at the end)
    checkpoint_every: int | None = None  # steps; None -> once per epoch (and always at the end)
    log_every: int = 50
    keep_checkpoints: int = 3
    max_eval_batches: int = 50  # cap on validation batches for the objective's metrics
    seed: int = 0
    embedding_dim: int = 128
    num_classes: int = NUM_CATEGORIES
    margin: float = 0.2
    mining: str = "semi_hard"
    positive_threshold: float = 0.5  # Jaccard: triplet positive and retrieval relevance
    negative_threshold: float = 0.25  # Jaccard below this (or no shared category): triplet negative
    init: str | None = None  # ImageNet safetensors to initialise the backbone
    depthwise: str = "auto"
    width_mult: float | None = None  # mobilenet_v2 width multiplier (None: the architecture's 1.0)
    augment: bool = False
    map_k: int = 10

    @property
    def rotation_head(self) -> bool:
        return self.objective == "rotation"

    @property
    def pipeline_mining(self) -> str:
        """The data pipeline's mining mode: in-batch miners need "online" batches."""
        return "offline" if self.mining == "offline" else "online"

    def objective_kwargs(self) -> dict[str, Any]:
        if self.objective == "triplet":
            return {"margin": self.margin, "mining": self.mining, "positive_threshold": self.positive_threshold,
                    "negative_threshold": self.negative_threshold}
        return {}

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad option; returns self."""

        def bad(option: str, message: str):
            raise ConfigError(f"invalid option {option}: {message}")

        if self.objective not in OBJECTIVES:
            bad("--objective", f"{self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.mining not in MINING:
            bad("--mining", f"{self.mining!r}; choose one of {', '.join(MINING)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"{self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.arch:
            bad("--arch", "empty architecture name")
        if not self.data_dir:
            bad("--data", "no prepared dataset given (run `imat data prepare` first)")
        for name in ("batch_size", "image_size", "embedding_dim", "num_classes", "log_every",
                     "keep_checkpoints", "max_eval_batches", "map_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"--{name.replace('_', '-')}", f"{value!r} must be a positive integer")
        for name in ("epochs", "steps", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                bad(f"--{name.replace('_', '-')}", f"{value!r} must be a positive integer")
        if self.epochs is None and self.steps is None:
            bad("--epochs/--steps", "give one of them")
        if not (self.learning_rate > 0):
            bad("--lr", f"{self.learning_rate!r} must be > 0")
        if not (self.margin >= 0):
            bad("--margin", f"{self.margin!r} must be >= 0")
        if not (0 < self.positive_threshold <= 1):
            bad("positive_threshold", f"{self.positive_threshold!r} must be in (0, 1]")
        if not (0 <= self.negative_threshold <= self.positive_threshold):
            bad("negative_threshold", f"{self.negative_threshold!r} must be in [0, positive_threshold]")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("--seed", f"{self.seed!r} must be an integer")
        if self.width_mult is not None and not (self.width_mult > 0):
            bad("--width-mult", f"{self.width_mult!r} must be > 0")
        if self.init is not None and not pathlib.Path(self.init).is_file():
            bad("--init", f"{self.init} is not a file (give a .safetensors of ImageNet weights)")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rotation_head"] = self.rotation_head  # recorded for load_model_from_run / export
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        derived = {"rotation_head", "versions"}
        unknown = set(d) - known - derived
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text_or_path) -> "TrainConfig":
        path = pathlib.Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        source = str(path) if path else "config JSON"
        try:
            d = json.loads(path.read_text() if path else text_or_path)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{source}: cannot read the training config: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        return cls.from_dict(d, source=source)

    def resume_conflicts(self, previous: "TrainConfig") -> list[str]:
        """Options (RESUME_KEYS) whose values differ from ``previous``: "name: old -> new"."""
        keys = [k for k in RESUME_KEYS if k != "mining" or self.objective == "triplet"]
        return [
            f"{k}: {getattr(previous, k)!r} -> {getattr(self, k)!r}"
            for k in keys
            if getattr(previous, k) != getattr(self, k)
        ]
