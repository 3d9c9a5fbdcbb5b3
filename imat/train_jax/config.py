"""TrainConfig: every option of a training run, with the seed report's defaults.

Defaults (DESIGN.md "Defaults that come from the seed report"): 128x128 images,
Adam with learning rate 5e-4, batch 32, BCE with macro F1 at 0.5 as the headline
metric. imat's own choices: architecture ``resnet18`` (the standard ImageNet
baseline, with torchvision weights to initialise from; ``mobilenet_v2`` is the
lighter option), triplet margin 0.2 on L2-normalised embeddings with
``semi_hard`` in-batch mining (the report's margin-0 model collapsed; batch-hard
collapsed on real photos, see benchmarks/RESULTS.md), 10 epochs.
Objective-specific facts (loss options, pipeline, heads, what is exported) live in the
objective's spec (``imat.train_jax.objectives``); this module only validates through it.

A config is stored as ``workdir/config.json`` (plus package versions) and is the
only thing needed to rebuild the model (``checkpoint.load_model_from_run``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from imat.constants import DEFAULT_IMAGE_SIZE, NUM_CATEGORIES, RESIZE_MODES
from imat.errors import ConfigError
from imat.relevance import NEGATIVE_THRESHOLD, POSITIVE_THRESHOLD

OPTIMIZERS = ("adam",)
LR_SCHEDULES = ("constant", "cosine")

# Options that change the model, the optimizer state or the batch sequence: a rerun in
# an existing workdir must keep them (plus the objective's own resume_keys), or resuming
# would be meaningless or impossible.
RESUME_KEYS = (
    "arch", "objective", "embedding_dim", "num_classes", "image_size", "batch_size",
    "seed", "optimizer", "augment", "depthwise", "width_mult", "input_pool", "mixup", "ema",
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
    positive_threshold: float = POSITIVE_THRESHOLD  # imat.relevance: triplet positive and retrieval relevance
    negative_threshold: float = NEGATIVE_THRESHOLD  # imat.relevance: triplet negative below this
    init: str | None = None  # ImageNet safetensors to initialise the backbone
    init_from: str | None = None  # another run's folder: start from its latest checkpoint (backbone + matching heads)
    freeze_backbone: bool = False  # train only the heads (a linear probe)
    lr_schedule: str = "constant"  # the seed's constant Adam rate, or cosine decay with a short warm-up
    weight_decay: float = 0.0  # > 0: AdamW (decoupled weight decay)
    depthwise: str = "auto"
    # Regular convs' formulation (imat.train_jax.models.layers.CONV_MODES): "auto" picks imat's
    # fast CPU formulations (same results); "lax" forces XLA's standard convolution.
    conv: str = "auto"
    width_mult: float | None = None  # mobilenet_v2 width multiplier (None: the architecture's 1.0)
    input_pool: int = 1  # > 1: the network sees the input averaged over pool x pool blocks (cheaper, same data)
    augment: bool = False
    # > 0: also keep an exponential moving average of the parameters with this decay per step;
    # evaluation, export and --init-from then use the averaged weights (train.py).
    ema: float = 0.0
    mixup: float = 0.0  # > 0: Beta(mixup, mixup) in-batch mixup of photos and labels (classification pipeline)
    # How many shards the global batch is drawn from, one or more per process (None: one per
    # process). Recorded at the first launch and kept on resume, so a run resumed on another
    # number of processes (hosts) goes on with the batches it would have seen.
    data_shards: int | None = None
    map_k: int = 10
    # Served as model.onnx's `embedding`; None: the objective's default (its spec).
    embedding_source: str | None = None
    # The prepared dataset's resize mode, recorded from it at train time (None: not yet known);
    # export writes it into model.onnx so the engine decodes queries as training did.
    resize_mode: str | None = None

    @property
    def spec(self):
        """The objective's ObjectiveSpec (ConfigError for an unknown objective)."""
        from imat.train_jax.objectives import get_objective

        return get_objective(self.objective)

    @property
    def relevance(self):
        """The relevance rule (imat.relevance) with this run's thresholds."""
        from imat.relevance import Relevance

        return Relevance(self.positive_threshold, self.negative_threshold)

    @property
    def rotation_head(self) -> bool:
        return self.spec.rotation_head

    @property
    def retrieval_output(self) -> str:
        """The model output served as the retrieval embedding."""
        return self.embedding_source or self.spec.embedding_source

    def objective_kwargs(self) -> dict[str, Any]:
        return self.spec.options(self)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad option; returns self."""

        def bad(option: str, message: str):
            raise ConfigError(f"invalid option {option}: {message}")

        spec = self.spec  # ConfigError naming --objective when unknown
        problem = spec.validate(self)
        if problem:
            raise ConfigError(f"invalid option {problem}")
        if self.embedding_source is not None and self.embedding_source not in spec.trains:
            bad("--embedding-source", f"{self.embedding_source!r}: objective {self.objective!r} trains only "
                f"{', '.join(sorted(spec.trains))}")
        if self.resize_mode is not None and self.resize_mode not in RESIZE_MODES:
            bad("resize_mode", f"{self.resize_mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        from imat.train_jax.models.layers import CONV_MODES  # jax/flax: imported only here

        if self.conv not in CONV_MODES:
            bad("conv", f"{self.conv!r}; choose one of {', '.join(CONV_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"{self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.arch:
            bad("--arch", "empty architecture name")
        if not self.data_dir:
            bad("--data", "no prepared dataset given (run `imat data prepare` first)")
        for name in ("batch_size", "image_size", "embedding_dim", "num_classes", "log_every", "input_pool",
                     "keep_checkpoints", "max_eval_batches", "map_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(f"--{name.replace('_', '-')}", f"{value!r} must be a positive integer")
        for name in ("epochs", "steps", "eval_every", "checkpoint_every", "data_shards"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                bad(f"--{name.replace('_', '-')}", f"{value!r} must be a positive integer")
        if self.image_size % self.input_pool:
            bad("--input-pool", f"{self.input_pool} does not divide --image-size {self.image_size}")
        if self.epochs is None and self.steps is None:
            bad("--epochs/--steps", "give one of them")
        if self.lr_schedule not in LR_SCHEDULES:
            bad("--lr-schedule", f"{self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if not (self.weight_decay >= 0):
            bad("--weight-decay", f"{self.weight_decay!r} must be >= 0")
        if not (0 <= self.ema < 1):
            bad("--ema", f"{self.ema!r} must be in [0, 1) (0: off; e.g. 0.99 averages over ~100 steps)")
        if not (self.mixup >= 0):
            bad("--mixup", f"{self.mixup!r} must be >= 0 (0: off)")
        if self.mixup > 0 and spec.pipeline != "classification":
            bad("--mixup", f"objective {self.objective!r} does not train on labelled photos one by one "
                f"(its pipeline is {spec.pipeline!r}); mixup is for the classification objectives")
        if self.init_from is not None and not (pathlib.Path(self.init_from) / "config.json").is_file():
            bad("--init-from", f"{self.init_from} is not a training run folder (no config.json)")
        if not (self.learning_rate > 0):
            bad("--lr", f"{self.learning_rate!r} must be > 0")
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
        d["retrieval_output"] = self.retrieval_output
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        derived = {"rotation_head", "retrieval_output", "versions"}
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
        keys = [*RESUME_KEYS, *self.spec.resume_keys]
        return [
            f"{k}: {getattr(previous, k)!r} -> {getattr(self, k)!r}"
            for k in keys
            if getattr(previous, k) != getattr(self, k)
        ]
