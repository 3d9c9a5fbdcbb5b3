"""The training loop: ``train_and_evaluate(config, workdir) -> final metrics``.

One jitted, pure ``train_step((model_state, opt_state), batch) -> (state, metrics)``
(nnx.split/merge around an optax update, input buffers donated), the batch
sharded over a "data" mesh axis and the state replicated (sharding.py). Batches
are a pure function of (seed, step), so a rerun in the same workdir restores
the latest checkpoint and continues with exactly the batches it would have seen.

Evaluation (every ``eval_every`` steps and at the end), on the validation split:
* the objective's metrics over up to ``max_eval_batches`` validation batches of
  the same pipeline kind (bce: loss, F1 micro/macro from summed counts; triplet:
  loss, triplet accuracy, active fraction, mean pairwise distance; rotation:
  loss, rotation accuracy), with the model in eval mode;
* retrieval ``map@10``: every validation image queried against all others,
  relevance Jaccard(category sets) >= 0.5. Features: ``embedding`` for bce and
  triplet, ``pooled`` for rotation (its embedding head is never trained; the
  backbone features are what it learns); bce also reports ``map@10_pooled``
  because its embedding head is not trained by BCE either.

Files in ``workdir`` (written by process 0, each to a temp file then renamed):
``config.json`` (the TrainConfig + package versions), ``metrics.jsonl`` (train
rows every ``log_every`` steps, val rows at each evaluation), ``curves.png`` and
``checkpoints/`` (checkpoint.py).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from imat.fileio import atomic_write_text
from imat.errors import ConfigError, ModelError
from imat.train_jax import sharding
from imat.train_jax.checkpoint import CHECKPOINT_DIR, CheckpointStore, build_model
from imat.train_jax.config import TrainConfig
from imat.train_jax.curves import plot_curves
from imat.train_jax.metrics import MetricAccumulator, retrieval_map_at_k
from imat.train_jax.objectives import PIPELINE_KIND, get_objective

logger = logging.getLogger(__name__)

RETRIEVAL_FEATURE = {"bce": "embedding", "triplet": "embedding", "rotation": "pooled"}


# ---- small helpers -------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("imat", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    d = workdir / CHECKPOINT_DIR
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def check_resume(config: TrainConfig, workdir: pathlib.Path) -> TrainConfig | None:
    """The previous config of ``workdir``; ConfigError when it has checkpoints that ``config`` cannot resume."""
    path = workdir / "config.json"
    if not path.is_file():
        return None
    try:
        previous = TrainConfig.from_json(path)
    except ConfigError as e:
        if _checkpoint_steps(workdir):
            raise ConfigError(f"{e}; use a new --workdir") from None
        return None
    if _checkpoint_steps(workdir):
        conflicts = config.resume_conflicts(previous)
        if conflicts:
            raise ConfigError(
                f"--workdir {workdir} holds a run with other settings ({'; '.join(conflicts)}), so it cannot be "
                "resumed; use a new --workdir or the original options"
            )
        if previous.learning_rate != config.learning_rate:
            logger.warning("resuming with learning rate %g (was %g)", config.learning_rate, previous.learning_rate)
    return previous


def _read_rows(path: pathlib.Path, up_to_step: int) -> list[dict]:
    """metrics.jsonl rows with step <= up_to_step (later ones belong to a run that was interrupted)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= up_to_step:
            rows.append(row)
    return rows


def _to_host(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


# ---- jitted steps ----------------------------------------------------------------------------------

def make_train_step(model_graphdef, opt_graphdef, objective, objective_kwargs: dict):
    """jit((model_state, opt_state), batch) -> ((model_state, opt_state), metrics); state donated."""

    def train_step(state, batch):
        model = nnx.merge(model_graphdef, state[0])
        optimizer = nnx.merge(opt_graphdef, state[1])

        def loss_fn(model):
            return objective(model(batch["images"]), batch, **objective_kwargs)

        (_, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return (nnx.state(model), nnx.state(optimizer)), metrics

    return jax.jit(train_step, donate_argnums=0)


def make_eval_steps(eval_graphdef, objective, objective_kwargs: dict):
    """(eval_step(model_state, batch) -> metrics, embed(model_state, images) -> outputs), eval mode, jitted."""

    @jax.jit
    def eval_step(model_state, batch):
        outputs = nnx.merge(eval_graphdef, model_state)(batch["images"])
        return objective(outputs, batch, **objective_kwargs)[1]

    @jax.jit
    def embed(model_state, images):
        outputs = nnx.merge(eval_graphdef, model_state)(images)
        return {k: outputs[k] for k in ("pooled", "embedding")}

    return eval_step, embed


class _Evaluator:
    """Validation metrics of a model state (see module doc)."""

    def __init__(self, config: TrainConfig, mesh, val_source, val_split, eval_step, embed):
        self.config, self.mesh = config, mesh
        self.val_source, self.val_split = val_source, val_split
        self.eval_step, self.embed = eval_step, embed

    def features(self, model_state) -> dict[str, np.ndarray]:
        """pooled and embedding features of every validation image (padded fixed-size chunks: one compile)."""
        n, b = self.val_split.num_examples, self.config.batch_size
        sharding_ = sharding.batch_sharding(self.mesh)
        out: dict[str, list] = {"pooled": [], "embedding": []}
        for start in range(0, n, b):
            chunk = self.val_split.images(np.arange(start, min(start + b, n)))
            real = len(chunk)
            if real < b:
                chunk = np.concatenate([chunk, np.zeros((b - real, *chunk.shape[1:]), chunk.dtype)])
            # Every process holds the whole chunk; each supplies the rows of its own devices.
            images = jax.make_array_from_callback(chunk.shape, sharding_, lambda idx, c=chunk: c[idx])
            feats = _to_host(self.embed(model_state, images))
            for k in out:
                out[k].append(np.asarray(feats[k])[:real])
        return {k: np.concatenate(v) for k, v in out.items()}

    def __call__(self, model_state) -> dict[str, float]:
        acc = MetricAccumulator()
        num_batches = min(self.val_source.steps_per_epoch, self.config.max_eval_batches)
        for batch in self.val_source.iterate(0, num_batches):
            acc.update(jax.device_get(self.eval_step(model_state, sharding.shard_batch(batch, self.mesh))))
        result = acc.compute()
        feats = self.features(model_state)
        k = self.config.map_k
        cats = self.val_split.categories
        key = RETRIEVAL_FEATURE[self.config.objective]
        result[f"map@{k}"] = retrieval_map_at_k(feats[key], cats, k=k, threshold=self.config.positive_threshold)
        if self.config.objective == "bce":
            result[f"map@{k}_pooled"] = retrieval_map_at_k(feats["pooled"], cats, k=k, threshold=self.config.positive_threshold)
        return result


def _round(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


# ---- the loop ----------------------------------------------------------------------------------------

def _validation_source(make_pipeline, kind: str, val_split, seed: int, common: dict):
    """The validation pipeline, with a smaller batch when the split is smaller than a training batch.

    A small dataset (a demo, a first try on 50 photos) must still be evaluated; the batch is
    halved until the split offers at least one batch, keeping it divisible by the local devices.
    """
    devices = jax.local_device_count()
    batch_size = common["batch_size"]
    while True:
        try:
            return make_pipeline(kind, val_split, seed=seed, augment=False, **{**common, "batch_size": batch_size})
        except ConfigError:
            smaller = (batch_size // 2 // devices) * devices
            if smaller < devices:
                raise
            logger.info("validation split too small for batch %d; evaluating with batch %d", batch_size, smaller)
            batch_size = smaller


def train_and_evaluate(config: TrainConfig, workdir) -> dict[str, Any]:
    """Train (or resume) a run in ``workdir``; returns ``{"step", "train": {...}, "val": {...}}``."""
    from imat.data_tools.pipelines import PreparedSplit, make_pipeline  # heavy (tfds); only training needs it

    config.validate()
    workdir = pathlib.Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    sharding.maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.batch_size, mesh)
    check_resume(config, workdir)

    # -- data
    train_split = PreparedSplit.open(config.data_dir, "train")
    if train_split.image_size != config.image_size:
        raise ConfigError(
            f"--image-size {config.image_size} does not match the prepared dataset {train_split.data_dir} "
            f"({train_split.image_size} px); pass --image-size {train_split.image_size} or prepare the data "
            f"again with --image-size {config.image_size}"
        )
    val_split = PreparedSplit.open(config.data_dir, "validation")
    shard_index, num_shards = sharding.data_shard_info()
    kind = PIPELINE_KIND[config.objective]
    common = dict(batch_size=config.batch_size // num_shards, mining=config.pipeline_mining,
                  shard_index=shard_index, num_shards=num_shards)
    train_source = make_pipeline(kind, train_split, seed=config.seed, augment=config.augment, **common)
    val_source = _validation_source(make_pipeline, kind, val_split, config.seed, common)
    steps_per_epoch = train_source.steps_per_epoch
    num_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    eval_every = config.eval_every or steps_per_epoch
    checkpoint_every = config.checkpoint_every or steps_per_epoch
    log_every = min(config.log_every, num_steps)

    # -- model, optimizer, state
    model = build_model(config.to_dict(), pretrained=config.init)
    optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    model_graphdef, model_state = nnx.split(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    del model, optimizer
    state = sharding.replicate((model_state, opt_state), mesh)

    if is_main:
        atomic_write_text(workdir / "config.json",
                          json.dumps({**config.to_dict(), "versions": package_versions()}, indent=2, sort_keys=True))
    store = CheckpointStore(workdir, keep=config.keep_checkpoints)
    start_step = 0
    found = store.restore_latest(state[0], state[1])
    if found is not None:
        start_step, restored_model, restored_opt, _ = found
        state = (restored_model, restored_opt)
        logger.info("resuming %s from step %d", workdir, start_step)
    if start_step > num_steps:
        logger.warning("the latest checkpoint (step %d) is past the requested %d steps; evaluating it", start_step, num_steps)
        num_steps = start_step

    metrics_path = workdir / "metrics.jsonl"
    rows = _read_rows(metrics_path, start_step)

    def write_logs():
        if is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            try:
                plot_curves(rows, workdir / "curves.png", config.objective)
            except Exception as e:  # a plotting problem must not kill a training run
                logger.warning("could not draw curves.png: %s", e)

    objective = get_objective(config.objective)
    okw = config.objective_kwargs()
    train_step = make_train_step(model_graphdef, opt_graphdef, objective, okw)
    evaluate = _Evaluator(config, mesh, val_source, val_split, *make_eval_steps(eval_graphdef, objective, okw))
    meta = {"seed": config.seed, "arch": config.arch, "objective": config.objective}

    def run_eval(step: int) -> dict:
        row = _round({"split": "val", "step": step, "epoch": step / steps_per_epoch, **evaluate(state[0])})
        rows.append(row)
        logger.info("step %d validation: %s", step, {k: v for k, v in row.items() if k not in ("split", "step", "epoch")})
        return row

    logger.info(
        "training %s (%s) for %d steps (%d/epoch) on %d device(s), batch %d; workdir %s",
        config.arch, config.objective, num_steps, steps_per_epoch, mesh.devices.size, config.batch_size, workdir,
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, initial=start_step, desc=f"train {config.objective}", unit="step",
               disable=None if is_main else True, dynamic_ncols=True)
    acc, pending = MetricAccumulator(), []
    window_start, window_images = time.perf_counter(), 0
    step = start_step
    try:
        for batch in train_source.iterate(start_step, num_steps - start_step):
            window_images += int(batch["images"].shape[0]) * num_shards
            state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
            pending.append(metrics)
            step += 1
            bar.update(1)
            changed = False
            if step % log_every == 0 or step == num_steps:
                for m in jax.device_get(pending):
                    acc.update(m)
                elapsed = time.perf_counter() - window_start
                row = _round({"split": "train", "step": step, "epoch": step / steps_per_epoch, **acc.compute(),
                              "images_per_s": window_images / max(elapsed, 1e-9)})
                if not math.isfinite(row["loss"]):
                    raise ModelError(f"training diverged at step {step} (loss {row['loss']}); lower --lr")
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                acc, pending = MetricAccumulator(), []
                window_start, window_images = time.perf_counter(), 0
                changed = True
            if step % eval_every == 0 or step == num_steps:
                run_eval(step)
                changed = True
            if step % checkpoint_every == 0 or step == num_steps:
                store.save(step, state[0], state[1], meta)
            if changed:
                write_logs()
        if not any(r["split"] == "val" and r["step"] == num_steps for r in rows):
            run_eval(num_steps)  # e.g. a rerun of a finished run whose last evaluation was lost
            write_logs()
        store.save(num_steps, state[0], state[1], meta)
    finally:
        bar.close()
        store.close()

    last = lambda split: next((r for r in reversed(rows) if r["split"] == split), {})
    return {"step": num_steps, "train": last("train"), "val": last("val"), "workdir": str(workdir)}
