"""Orbax checkpoints of a training run: save, restore-latest with fallback, load for export.

Layout: ``workdir/checkpoints/<step>/`` with three Orbax items:
``model`` (every model Variable: params, BatchNorm statistics, ...), ``optimizer``
(optax state and the optimizer's step count) and ``meta`` (JSON: the step, which
is also the data position because batches are a pure function of (seed, step),
and the config). Writes are atomic: Orbax writes each step into a temporary
directory and renames it to ``<step>`` only once complete, so a killed process
leaves either the previous checkpoints or a finished new one (plus an ignored
tmp dir). Saving is synchronous so a step is durable when ``save`` returns.

A latest checkpoint that fails to restore (files truncated or deleted inside the
step dir) is moved to ``workdir/checkpoints_corrupt/`` with a warning and the
previous one is used.

Several processes (``jax.distributed``): the state is replicated, so process 0's
local copy is the whole checkpoint. Only process 0 opens the Orbax manager (over
itself alone) and writes, from host copies of its arrays; the others wait at a
barrier. On restore process 0 reads and broadcasts the step and the state, so the
other hosts need no access to ``workdir`` (no shared file system) and write
nothing; the checkpoint is the same as a single-process one and resumes in one
process (or in another number of processes).
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from imat.errors import ConfigError, ModelError
from imat.train_jax import sharding

logger = logging.getLogger(__name__)

# Barrier timeout of a multi-process save: long enough for a large model on a slow disk.
_SAVE_BARRIER_TIMEOUT_S = 3600
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "checkpoints_corrupt"
ITEMS = ("model", "optimizer", "meta")


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_saveable(state) -> dict:
    """nnx.State -> pure nested dict of arrays; typed PRNG keys become their uint32 key data."""
    pure = nnx.to_pure_dict(state)
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, pure)


def _abstract(tree):
    def spec(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(spec, tree)


def from_saveable(template_state, saved: dict):
    """A copy of ``template_state`` (nnx.State) with the values of ``saved`` (from to_saveable)."""
    state = jax.tree.map(lambda x: x, template_state)  # copy, so the template is left alone
    template_pure = nnx.to_pure_dict(template_state)
    values = jax.tree.map(
        lambda t, v: jax.random.wrap_key_data(v, impl=jax.random.key_impl(t)) if _is_key(t) else v,
        template_pure,
        saved,
    )
    nnx.replace_by_pure_dict(state, values)
    return state


def _host_copy(tree):
    """Host numpy copies of the (replicated) arrays of ``tree``: this process's replica of each."""

    def copy(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0))
        return x

    return jax.tree.map(copy, tree)


def _multiprocess() -> bool:
    return jax.process_count() > 1


def _finite(state) -> bool:
    leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


class CheckpointStore:
    """Orbax CheckpointManager over ``workdir/checkpoints`` keeping the last ``keep`` steps."""

    def __init__(self, workdir, *, keep: int = 3, read_only: bool = False):
        self.workdir = pathlib.Path(workdir).resolve()
        self.directory = self.workdir / CHECKPOINT_DIR
        self._saves = 0
        multiprocessing = {}
        if _multiprocess():
            self.manager = None
            if jax.process_index() != 0:
                return  # process 0 reads and writes; see the module doc
            # A manager over process 0 alone (Orbax then cannot create the root itself).
            multiprocessing = {"multiprocessing_options": ocp.options.MultiprocessingOptions(
                primary_host=0, active_processes={0}, barrier_sync_key_prefix="imat")}
            if not read_only:
                self.directory.mkdir(parents=True, exist_ok=True)
        if read_only:  # (the values Orbax would force for read_only, given so it does not warn)
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0, max_to_keep=None,
                enable_async_checkpointing=False, **multiprocessing,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=not multiprocessing,
                enable_async_checkpointing=False,
                # remove tmp dirs of a save that a killed process left half written
                cleanup_tmp_directories=True,
                **multiprocessing,
            )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps()) if self.manager is not None else []

    def save(self, step: int, model_state, optimizer_state, meta: dict[str, Any]) -> None:
        """Write step ``step`` (synchronously; atomic through Orbax's tmp dir + rename).
        Several processes: every one calls this; process 0 writes, the others wait for it."""
        if _multiprocess():
            if self.manager is not None:
                self._write(step, _host_copy(model_state), _host_copy(optimizer_state), meta)
            self._saves += 1  # a unique barrier name per save, the same on every process
            ocp.multihost.sync_global_processes(f"imat-checkpoint-save-{self._saves}", timeout=_SAVE_BARRIER_TIMEOUT_S)
            return
        self._write(step, model_state, optimizer_state, meta)

    def _write(self, step: int, model_state, optimizer_state, meta: dict[str, Any]) -> None:
        if step in self.manager.all_steps():
            return  # already saved (e.g. a resumed run that finishes at its restore point)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(to_saveable(model_state)),
                optimizer=ocp.args.StandardSave(to_saveable(optimizer_state)),
                meta=ocp.args.JsonSave({**meta, "step": int(step)}),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, model_template, optimizer_template=None):
        """(model_state, optimizer_state or None, meta) of ``step``; raises on a damaged step."""
        # Several processes: process 0 alone reads, into host arrays (a numpy target).
        target = _host_copy if _multiprocess() else _abstract
        items = {
            "model": ocp.args.StandardRestore(target(to_saveable(model_template))),
            "meta": ocp.args.JsonRestore(),
        }
        if optimizer_template is not None:
            items["optimizer"] = ocp.args.StandardRestore(target(to_saveable(optimizer_template)))
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        model_state = from_saveable(model_template, restored["model"])
        opt_state = from_saveable(optimizer_template, restored["optimizer"]) if optimizer_template is not None else None
        meta = dict(restored["meta"])
        if int(meta.get("step", -1)) != int(step):
            raise ValueError(f"checkpoint {step} records step {meta.get('step')}")
        return model_state, opt_state, meta

    def restore_latest(self, model_template, optimizer_template=None, *, quarantine: bool = True):
        """Restore the newest step that restores cleanly: (step, model, optimizer, meta) or None.

        A step that fails is logged as a warning and (when ``quarantine``) moved to
        ``workdir/checkpoints_corrupt/`` so that a later save of the same step can succeed.
        Several processes: every one calls this and gets process 0's result, the states as
        host arrays (to be placed on the mesh by the caller).
        """
        if not _multiprocess():
            return self._restore_latest(model_template, optimizer_template, quarantine)
        from jax.experimental import multihost_utils

        found = self._restore_latest(model_template, optimizer_template, quarantine) if self.manager else None
        step = int(multihost_utils.broadcast_one_to_all(np.int64(found[0] if found else -1)))
        if step < 0:
            return None
        meta = sharding.broadcast_json(found[3] if found else None)
        ours = found[1:3] if found else (_host_copy(model_template), _host_copy(optimizer_template))
        model_state, opt_state = multihost_utils.broadcast_one_to_all(ours)
        return step, model_state, opt_state, meta

    def _restore_latest(self, model_template, optimizer_template, quarantine: bool):
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                model_state, opt_state, meta = self.restore(step, model_template, optimizer_template)
            except Exception as e:  # a damaged checkpoint can fail in many ways (tensorstore, json, shapes)
                logger.warning(
                    "checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                    self.directory / str(step), type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                )
                if quarantine:
                    self._quarantine(step)
                continue
            if not _finite(model_state):
                logger.warning("checkpoint %s holds non-finite parameters (a diverged run); skipping it",
                               self.directory / str(step))
                continue
            return step, model_state, opt_state, meta
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        src = self.directory / str(step)
        dst = self.workdir / CORRUPT_DIR / f"{step}-{int(time.time())}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.exists():
            shutil.move(str(src), str(dst))
            logger.warning("moved the damaged checkpoint to %s", dst)
        self.manager.reload()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()


def read_run_config(run_dir) -> dict:
    """The config dict stored in ``run_dir/config.json`` (ModelError when missing/unreadable)."""
    path = pathlib.Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{path} not found: {run_dir} is not a training run directory (run `imat train` first)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read the run config: {e}") from None


def build_model(config: dict, *, pretrained=None):
    """A freshly initialised model as described by a run config dict (no weights loaded)."""
    from imat.train_jax.models import create_model

    return create_model(
        config["arch"],
        num_classes=int(config.get("num_classes", 46)),
        embedding_dim=int(config.get("embedding_dim", 128)),
        rotation_head=bool(config.get("rotation_head", config.get("objective") == "rotation")),
        pretrained=pretrained,
        depthwise=config.get("depthwise", "auto"),
        conv=config.get("conv", "auto"),
        input_pool=int(config.get("input_pool", 1)),
        rngs=nnx.Rngs(int(config.get("seed", 0))),
        # Architecture options are passed only when set, so other architectures never see them.
        **({"width_mult": float(config["width_mult"])} if config.get("width_mult") is not None else {}),
    )


def load_model_from_run(run_dir, step: int | None = None):
    """(model in eval mode, config dict) with the weights of ``step`` (default: the latest readable one)."""
    run_dir = pathlib.Path(run_dir)
    config = read_run_config(run_dir)
    config.pop("versions", None)
    if not (run_dir / CHECKPOINT_DIR).is_dir():
        raise ModelError(f"{run_dir / CHECKPOINT_DIR} not found: the run has no checkpoint yet")
    try:
        model = build_model(config)
    except ConfigError:
        raise
    except KeyError as e:
        raise ModelError(f"{run_dir / 'config.json'}: missing key {e}") from None
    template = nnx.state(model)
    store = CheckpointStore(run_dir, read_only=True)
    try:
        if step is None:
            found = store.restore_latest(template, quarantine=False)
            if found is None:
                raise ModelError(f"{run_dir / CHECKPOINT_DIR}: no readable checkpoint")
            step, model_state, _, _ = found
        else:
            if step not in store.all_steps():
                raise ModelError(
                    f"{run_dir / CHECKPOINT_DIR}: no checkpoint for step {step}; available: {store.all_steps()}"
                )
            try:
                model_state, _, _ = store.restore(step, template)
            except Exception as e:
                raise ModelError(f"{run_dir / CHECKPOINT_DIR / str(step)}: unreadable checkpoint ({e})") from None
    finally:
        store.close()
    nnx.update(model, model_state)
    model.eval()
    config["checkpoint_step"] = int(step)
    logger.info("loaded %s step %d from %s", config["arch"], step, run_dir)
    return model, config
