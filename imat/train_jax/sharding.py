"""Data-parallel device mesh: batch sharded over a "data" axis, state replicated.

One code path for 1 device, N local devices and N hosts (no pmap): a 1-D mesh
over ``jax.devices()`` with axis ``"data"``; batches are placed with
``NamedSharding(mesh, P("data"))`` and the model/optimizer state with
``NamedSharding(mesh, P())``. ``jax.jit`` then runs the global-batch program
(BatchNorm statistics and gradients are reduced over the whole batch by XLA).

Multi-host: :func:`maybe_initialize_distributed` calls ``jax.distributed.initialize()``
when the coordinator is configured through the environment; each process then
reads its own shard of the data (``shard_index=jax.process_index()``,
``num_shards=jax.process_count()``) and :func:`shard_batch` assembles the global
batch with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imat.errors import ConfigError

logger = logging.getLogger(__name__)

DATA_AXIS = "data"

_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS",)
_NUM_PROCESSES_VARS = ("JAX_NUM_PROCESSES", "IMAT_NUM_PROCESSES")
_PROCESS_ID_VARS = ("JAX_PROCESS_ID", "IMAT_PROCESS_ID")
_initialized = False


def _first_env(names) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def maybe_initialize_distributed() -> bool:
    """Initialise jax.distributed when JAX_COORDINATOR_ADDRESS (and the process count/id) are set.

    Returns True when running multi-process. Safe to call more than once.
    Variables: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    (cluster environments that jax auto-detects, e.g. SLURM, need only the address).
    """
    global _initialized
    address = _first_env(_COORDINATOR_VARS)
    if not address:
        return False
    if not _initialized:
        num = _first_env(_NUM_PROCESSES_VARS)
        pid = _first_env(_PROCESS_ID_VARS)
        try:
            kwargs = {"coordinator_address": address}
            if num is not None:
                kwargs["num_processes"] = int(num)
            if pid is not None:
                kwargs["process_id"] = int(pid)
        except ValueError as e:
            raise ConfigError(f"JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {e}") from None
        logger.info("initialising jax.distributed: %s", kwargs)
        jax.distributed.initialize(**kwargs)
        _initialized = True
    return jax.process_count() > 1


def data_shard_info() -> tuple[int, int]:
    """(shard_index, num_shards) for the data pipeline: this process's slice of the data."""
    return jax.process_index(), jax.process_count()


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all (global) devices with axis "data"."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devices.reshape(-1), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """ConfigError unless the global batch divides evenly over the devices and processes."""
    n = mesh.devices.size
    if batch_size % n or batch_size % jax.process_count():
        raise ConfigError(
            f"--batch-size {batch_size} must be a multiple of the number of devices ({n}) "
            f"and processes ({jax.process_count()}); choose e.g. {max(n, (batch_size // n) * n)}"
        )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a (process-local) numpy batch on the mesh, split along the leading axis."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """Place a pytree (model/optimizer state) replicated on every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))
