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

import json
import logging
import math
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


def check_batch_size(batch_size: int, mesh: Mesh, data_shards: int | None = None) -> None:
    """ConfigError unless the global batch divides evenly over the devices, processes and data shards."""
    n = mesh.devices.size
    shards = data_shards or jax.process_count()
    unit = math.lcm(n, jax.process_count(), shards)
    if batch_size % unit:
        raise ConfigError(
            f"--batch-size {batch_size} must be a multiple of the number of devices ({n}), "
            f"processes ({jax.process_count()}) and data shards ({shards}); "
            f"choose e.g. {max(unit, (batch_size // unit) * unit)}"
        )


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Place a (process-local) numpy batch on the mesh, split along the leading axis."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree, mesh: Mesh):
    """Place a pytree (model/optimizer state) replicated on every device of the mesh.

    Every process holds the same values (a seeded init, a restored checkpoint). With several
    processes ``jax.device_put`` would verify that with one cross-process all-gather per leaf
    (hundreds of tiny collectives); each process supplies its own devices' copies instead.
    """
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(x):
        if _is_key(x):
            return jax.random.wrap_key_data(place(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def broadcast_json(value):
    """Process 0's ``value`` (anything JSON can carry) on every process; ``value`` itself alone."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    ours = data if jax.process_index() == 0 else np.zeros(size, np.uint8)
    return json.loads(np.asarray(multihost_utils.broadcast_one_to_all(ours), np.uint8).tobytes().decode())


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
