"""The training loop: ``train_and_evaluate(config, workdir) -> final metrics``.

One jitted, pure ``train_step((model_state, opt_state), batch) -> (state, metrics)``
(nnx.split/merge around an optax update, input buffers donated; with ``--ema`` the state
also carries the moving average of the parameters, which evaluation and export use), the batch
sharded over a "data" mesh axis and the state replicated (sharding.py). Batches
are a pure function of (seed, step), so a rerun in the same workdir restores
the latest checkpoint and continues with exactly the batches it would have seen.
What differs between objectives (loss, pipeline, heads, retrieval output, curves)
comes from the objective's spec (``imat.train_jax.objectives``), never from here.

Evaluation (every ``eval_every`` steps and at the end), on the validation split:
* the objective's metrics over up to ``max_eval_batches`` validation batches of
  its pipeline kind, with the model in eval mode;
* retrieval ``map@10``: every validation image queried against all others
  (relevance: ``imat.relevance``) with the output model.onnx will serve, plus
  ``map@10_<output>`` for each other output the objective trains, so the
  choice of the served output is measured in every run.

Training stops with ModelError when the loss diverges (``divergence.py``); a
checkpoint is never written from non-finite parameters.

Files in ``workdir`` (written by process 0, each to a temp file then renamed):
``config.json`` (the TrainConfig + package versions), ``metrics.jsonl`` (train
rows every ``log_every`` steps, val rows at each evaluation), ``curves.png`` and
``checkpoints/`` (checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imat.errors import ConfigError, ModelError
from imat.fileio import atomic_write_text
from imat.hugepages import hugepages_status
from imat.train_jax import sharding
from imat.train_jax.checkpoint import CHECKPOINT_DIR, CheckpointStore, build_model
from imat.train_jax.config import TrainConfig
from imat.train_jax.divergence import divergence
from imat.train_jax.evaluation import Evaluator, make_eval_steps
from imat.train_jax.init_from import init_from_run, is_head_path
from imat.train_jax.metrics import MetricAccumulator
from imat.train_jax.run_log import RunLog

logger = logging.getLogger(__name__)


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


# ---- jitted steps ----------------------------------------------------------------------------------

def update_ema(ema, params, count, decay: float):
    """One step of the parameter average after ``count`` updates: ``d * ema + (1 - d) * params`` with
    ``d = min(decay, (1 + count) / (10 + count))``, so the average follows the fast-moving early
    weights instead of remembering the initialisation (TF's ExponentialMovingAverage warm-up)."""
    count = jnp.asarray(count, jnp.float32)
    d = jnp.minimum(decay, (1.0 + count) / (10.0 + count))
    return jax.tree.map(lambda a, p: (d * a + (1.0 - d) * p).astype(a.dtype), ema, params)


def serving_state(state: tuple):
    """The model state that evaluation and export use: the averaged parameters (``state[2]``, with
    --ema) over the model's own state (its BatchNorm statistics), else the model state itself."""
    return nnx.merge_state(state[0], state[2]) if len(state) > 2 else state[0]


def checkpoint_items(state: tuple) -> tuple:
    """(model item, optimizer item) of a checkpoint. The model item holds the serving weights, the
    ones export, --init-from and evaluation read; with --ema the training weights, which only a
    resumed run needs, travel in the optimizer item beside the optimizer state."""
    if len(state) == 2:
        return state
    return serving_state(state), nnx.State({"optimizer": state[1], "training_params": nnx.filter_state(state[0], nnx.Param)})


def state_from_checkpoint_items(model_item, optimizer_item, with_ema: bool) -> tuple:
    """The inverse of ``checkpoint_items``."""
    if not with_ema:
        return model_item, optimizer_item
    training_params = optimizer_item["training_params"]
    return (nnx.merge_state(model_item, training_params), optimizer_item["optimizer"],
            nnx.filter_state(model_item, nnx.Param))


def make_train_step(model_graphdef, opt_graphdef, loss_and_metrics, options: dict, wrt=nnx.Param,
                    ema_decay: float = 0.0):
    """jit((model_state, opt_state), batch) -> ((model_state, opt_state), metrics); state donated.
    ``wrt``: the parameters that learn (a filter; the rest get no gradient). ``ema_decay`` > 0: the
    state carries a third element, the moving average of the parameters (``update_ema``)."""

    def train_step(state, batch):
        model = nnx.merge(model_graphdef, state[0])
        optimizer = nnx.merge(opt_graphdef, state[1])

        def loss_fn(model):
            return loss_and_metrics(model(batch["images"]), batch, **options)

        (_, metrics), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
        optimizer.update(model, grads)
        new_state = (nnx.state(model), nnx.state(optimizer))
        if ema_decay > 0:
            new_state += (update_ema(state[2], nnx.state(model, nnx.Param), optimizer.step[...], ema_decay),)
        return new_state, metrics

    return jax.jit(train_step, donate_argnums=0)


@jax.jit
def all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


# ---- the loop, as named steps ---------------------------------------------------------------------


def _shard_group(make_pipeline, kind: str, split, shards: range, **kw):
    """A ShardGroup over this process's shards (each a BatchSource of the per-shard batch size)."""
    from imat.data_tools.pipelines import ShardGroup

    return ShardGroup([make_pipeline(kind, split, shard_index=i, **kw) for i in shards])


def _validation_source(make_pipeline, kind: str, val_split, seed: int, shards: range, common: dict):
    """The validation pipeline, with a smaller batch when the split is smaller than a training batch.

    A small dataset (a demo, a first try on 50 photos) must still be evaluated; the batch is
    halved until the split offers at least one batch, keeping it divisible by the local devices.
    """
    devices = jax.local_device_count()
    batch_size = common["batch_size"]
    while True:
        try:
            return _shard_group(make_pipeline, kind, val_split, shards, seed=seed, augment=False,
                                **{**common, "batch_size": batch_size})
        except ConfigError:
            smaller = (batch_size // 2 // devices) * devices
            if smaller < devices:
                raise
            logger.info("validation split too small for batch %d; evaluating with batch %d", batch_size, smaller)
            batch_size = smaller


@dataclasses.dataclass
class _Data:
    train_split: Any
    val_split: Any
    train_source: Any
    val_source: Any
    num_processes: int

    @property
    def steps_per_epoch(self) -> int:
        return self.train_source.steps_per_epoch


def process_shards(data_shards: int) -> range:
    """The data shards this process reads: a contiguous block, so that the processes' local
    batches, end to end, are the global batch of a single process reading all shards."""
    index, count = sharding.data_shard_info()
    if data_shards % count:
        raise ConfigError(f"--data-shards {data_shards} must be a multiple of the number of processes ({count}); "
                          "a resumed run keeps the number it started with: pass --data-shards to change it "
                          "(the batches from there on then differ)")
    per = data_shards // count
    return range(index * per, (index + 1) * per)


def open_data(config: TrainConfig) -> _Data:
    """The prepared splits and the objective's pipelines over this host's shards; records the
    dataset's resize mode in ``config`` (it travels into model.onnx)."""
    from imat.data_tools.pipelines import PreparedSplit, make_pipeline  # heavy (tfds); only training needs it

    train_split = PreparedSplit.open(config.data_dir, "train")
    if train_split.image_size != config.image_size:
        raise ConfigError(
            f"--image-size {config.image_size} does not match the prepared dataset {train_split.data_dir} "
            f"({train_split.image_size} px); pass --image-size {train_split.image_size} or prepare the data "
            f"again with --image-size {config.image_size}"
        )
    dataset_mode = train_split.resize_mode or "stretch"
    if config.resize_mode is not None and config.resize_mode != dataset_mode:
        raise ConfigError(f"resize mode {config.resize_mode!r} does not match the prepared dataset "
                          f"{train_split.data_dir} ({dataset_mode!r})")
    config.resize_mode = dataset_mode
    spec = config.spec
    if not spec.supervised:
        train_split = train_split.with_unlabelled()  # self-supervision also learns from unlabelled photos
    val_split = PreparedSplit.open(config.data_dir, "validation")
    data_shards = config.data_shards or jax.process_count()
    shards = process_shards(data_shards)
    common = dict(batch_size=config.batch_size // data_shards, num_shards=data_shards,
                  relevance=config.relevance, **spec.pipeline_options(config))
    train_source = _shard_group(make_pipeline, spec.pipeline, train_split, shards, seed=config.seed,
                                augment=config.augment, mixup=config.mixup, **common)
    val_source = _validation_source(make_pipeline, spec.pipeline, val_split, config.seed, shards, common)
    return _Data(train_split, val_split, train_source, val_source, jax.process_count())


@dataclasses.dataclass(frozen=True)
class _Schedule:
    num_steps: int
    steps_per_epoch: int
    eval_every: int
    checkpoint_every: int
    log_every: int

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.num_steps


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> _Schedule:
    num_steps = config.steps if config.steps is not None else config.epochs * steps_per_epoch
    return _Schedule(num_steps, steps_per_epoch, config.eval_every or steps_per_epoch,
                     config.checkpoint_every or steps_per_epoch, min(config.log_every, num_steps))


def trainable_filter(config: TrainConfig):
    """The parameters that learn: all of them, or only the heads with ``freeze_backbone``."""
    if not config.freeze_backbone:
        return nnx.Param
    return nnx.All(nnx.Param, lambda path, value: is_head_path(tuple(map(str, path))))


def make_optimizer(config: TrainConfig, num_steps: int) -> optax.GradientTransformation:
    """Adam (the seed's), or AdamW with weight decay; constant or cosine-decayed learning rate."""
    lr = config.learning_rate
    if config.lr_schedule == "cosine":
        warmup = min(max(1, num_steps // 20), 500)
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1), end_value=lr * 0.01)
    if config.weight_decay > 0:
        return optax.adamw(lr, weight_decay=config.weight_decay)
    return optax.adam(lr)


@dataclasses.dataclass
class _Model:
    model_graphdef: Any
    opt_graphdef: Any
    eval_graphdef: Any
    state: tuple  # (model_state, optimizer_state[, parameter average]), replicated over the mesh


def init_model(config: TrainConfig, mesh, num_steps: int) -> _Model:
    """A fresh model (ImageNet weights with --init, another run's with --init-from) and its optimizer."""
    model = build_model(config.to_dict(), pretrained=config.init)
    if config.init_from:
        init_from_run(model, config.init_from)
    wrt = trainable_filter(config)
    optimizer = nnx.Optimizer(model, make_optimizer(config, num_steps), wrt=wrt)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    if config.freeze_backbone:  # a linear probe: the backbone's BatchNorm statistics stay fixed too
        for name, child in vars(model).items():
            if isinstance(child, nnx.Module) and not is_head_path((name,)):
                child.eval()
    model_graphdef, model_state = nnx.split(model)
    opt_graphdef, opt_state = nnx.split(optimizer)
    state = (model_state, opt_state)
    if config.ema > 0:  # the average starts at the initial weights (a copy: the state is donated)
        state += (jax.tree.map(jnp.copy, nnx.state(model, nnx.Param)),)
    return _Model(model_graphdef, opt_graphdef, eval_graphdef, sharding.replicate(state, mesh))


def restore(store: CheckpointStore, state: tuple, workdir: pathlib.Path, mesh) -> tuple[int, tuple]:
    """(start step, state): the latest readable, finite checkpoint, or (0, state) for a new run."""
    found = store.restore_latest(*checkpoint_items(state))
    if found is None:
        return 0, state
    step, model_item, optimizer_item, _ = found
    restored = state_from_checkpoint_items(model_item, optimizer_item, len(state) > 2)
    logger.info("resuming %s from step %d", workdir, step)
    if jax.process_count() > 1:  # several processes restore host copies (checkpoint.py): place them
        return step, sharding.replicate(restored, mesh)
    return step, restored


def _check_health(log: RunLog, step: int) -> None:
    why = divergence(log.train_losses())
    if why:
        log.write()  # the evidence stays in metrics.jsonl (export refuses the run by it)
        raise ModelError(f"training diverged at step {step}: {why}; lower --lr (no checkpoint of the diverged "
                         "state is written)")


def run_loop(config: TrainConfig, data: _Data, schedule: _Schedule, model: _Model, mesh, store: CheckpointStore,
             log: RunLog, start_step: int, is_main: bool) -> tuple:
    """Train from ``start_step`` to ``schedule.num_steps``: log, evaluate, checkpoint; returns the final state."""
    from tqdm.auto import tqdm

    spec = config.spec
    options = spec.options(config)
    train_step = make_train_step(model.model_graphdef, model.opt_graphdef, spec.loss_and_metrics, options,
                                 wrt=trainable_filter(config), ema_decay=config.ema)
    evaluate = Evaluator(config, mesh, data.val_source, data.val_split,
                          *make_eval_steps(model.eval_graphdef, spec.loss_and_metrics, options))
    meta = {"seed": config.seed, "arch": config.arch, "objective": config.objective}
    state = model.state

    def run_eval(step: int) -> None:
        row = log.add({"split": "val", "step": step, "epoch": step / schedule.steps_per_epoch, **evaluate(serving_state(state))})
        logger.info("step %d validation: %s", step, {k: v for k, v in row.items() if k not in ("split", "step", "epoch")})

    def save(step: int) -> None:
        if not bool(all_finite(state)):
            raise ModelError(f"training diverged at step {step}: the parameters are no longer finite; lower --lr "
                             "(no checkpoint of the diverged state is written)")
        store.save(step, *checkpoint_items(state), meta)

    bar = tqdm(total=schedule.num_steps, initial=start_step, desc=f"train {config.objective}", unit="step",
               disable=None if is_main else True, dynamic_ncols=True)
    acc, pending = MetricAccumulator(), []
    window_start, window_images = time.perf_counter(), 0
    step = start_step
    try:
        for batch in data.train_source.iterate(start_step, schedule.num_steps - start_step):
            window_images += int(batch["images"].shape[0]) * data.num_processes
            state, metrics = train_step(state, sharding.shard_batch(batch, mesh))
            pending.append(metrics)
            step += 1
            bar.update(1)
            changed = False
            if schedule.due(step, schedule.log_every):
                for m in jax.device_get(pending):
                    acc.update(m)
                elapsed = time.perf_counter() - window_start
                row = log.add({"split": "train", "step": step, "epoch": step / schedule.steps_per_epoch,
                               **acc.compute(), "images_per_s": window_images / max(elapsed, 1e-9)})
                _check_health(log, step)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                acc, pending = MetricAccumulator(), []
                window_start, window_images = time.perf_counter(), 0
                changed = True
            if schedule.due(step, schedule.eval_every):
                run_eval(step)
                changed = True
            if changed:  # before the checkpoint: a run killed after a save must find the rows it covers
                log.write()
            if schedule.due(step, schedule.checkpoint_every):
                save(step)
        if not any(r["split"] == "val" and r["step"] == schedule.num_steps for r in log.rows):
            run_eval(schedule.num_steps)  # e.g. a rerun of a finished run whose last evaluation was lost
            log.write()
        save(schedule.num_steps)
    finally:
        bar.close()
    return state


def resolve_data_shards(config: TrainConfig, previous: TrainConfig | None, workdir: pathlib.Path) -> int:
    """The run's number of data shards: given, else kept from the run being resumed, else one
    per process; process 0's answer on every process (only it may see ``workdir``)."""
    shards = config.data_shards
    if previous is not None and previous.data_shards and _checkpoint_steps(workdir):
        if shards is None:
            shards = previous.data_shards
        elif shards != previous.data_shards:
            logger.warning("resuming with %d data shards (was %d): the batches from here on differ from the "
                           "original run's", shards, previous.data_shards)
    return int(sharding.broadcast_json(shards or jax.process_count()))


def write_run_config(config: TrainConfig, workdir: pathlib.Path) -> None:
    atomic_write_text(workdir / "config.json",
                      json.dumps({**config.to_dict(), "versions": package_versions()}, indent=2, sort_keys=True))


def train_and_evaluate(config: TrainConfig, workdir) -> dict[str, Any]:
    """Train (or resume) a run in ``workdir``; returns ``{"step", "train": {...}, "val": {...}}``."""
    config = dataclasses.replace(config).validate()  # a copy: the dataset's facts are recorded into it
    workdir = pathlib.Path(workdir).expanduser().resolve()
    sharding.maybe_initialize_distributed()
    is_main = jax.process_index() == 0
    if is_main:  # the other processes write nothing (and need not see workdir: checkpoint.py)
        workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh()
    previous = check_resume(config, workdir)
    config.data_shards = resolve_data_shards(config, previous, workdir)
    sharding.check_batch_size(config.batch_size, mesh, config.data_shards)

    data = open_data(config)
    schedule = make_schedule(config, data.steps_per_epoch)
    model = init_model(config, mesh, schedule.num_steps)
    if is_main:
        write_run_config(config, workdir)
    store = CheckpointStore(workdir, keep=config.keep_checkpoints)
    try:
        start_step, model.state = restore(store, model.state, workdir, mesh)
        if start_step > schedule.num_steps:
            logger.warning("the latest checkpoint (step %d) is past the requested %d steps; evaluating it",
                           start_step, schedule.num_steps)
            schedule = dataclasses.replace(schedule, num_steps=start_step)
        log = RunLog(workdir, config, start_step, is_main)
        # Process 0's history on every process, so the divergence check decides the same everywhere.
        log.rows = sharding.broadcast_json(log.rows)
        logger.info("training %s (%s) for %d steps (%d/epoch) on %d device(s), batch %d; workdir %s", config.arch,
                    config.objective, schedule.num_steps, schedule.steps_per_epoch, mesh.devices.size,
                    config.batch_size, workdir)
        if jax.default_backend() == "cpu":
            logger.info("CPU step: %s", hugepages_status())
        run_loop(config, data, schedule, model, mesh, store, log, start_step, is_main)
    finally:
        store.close()
    return {"step": schedule.num_steps, "train": log.last("train"), "val": log.last("val"), "workdir": str(workdir)}
