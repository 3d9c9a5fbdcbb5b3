"""Mesh and batch sharding: one "data" axis, batch split over devices, state replicated."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from imat.errors import ConfigError
from imat.train_jax import sharding


def test_single_device_mesh_and_batch():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    batch = {"images": np.zeros((4, 8, 8, 3), np.uint8), "categories": np.ones((4, 46), np.float32)}
    out = sharding.shard_batch(batch, mesh)
    assert out["images"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out["categories"]), batch["categories"])
    rep = sharding.replicate({"w": np.ones(3, np.float32)}, mesh)
    assert rep["w"].sharding.spec == jax.sharding.PartitionSpec()


def test_no_distributed_init_without_coordinator(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert sharding.maybe_initialize_distributed() is False
    assert sharding.data_shard_info() == (0, 1)


def test_bad_process_settings_are_config_errors(monkeypatch):
    monkeypatch.setattr(sharding, "_initialized", False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES"):
        sharding.maybe_initialize_distributed()


def test_batch_must_divide_over_data_shards():
    mesh = sharding.make_mesh()
    sharding.check_batch_size(12, mesh, data_shards=4)
    with pytest.raises(ConfigError, match=r"--batch-size 10 .*data shards \(4\)"):
        sharding.check_batch_size(10, mesh, data_shards=4)


def test_single_process_reads_every_data_shard_and_broadcast_is_identity():
    from imat.train_jax.train import process_shards

    assert process_shards(3) == range(3)
    value = {"rows": [{"step": 1, "loss": 0.5}]}
    assert sharding.broadcast_json(value) is value


def test_two_host_devices_split_the_batch():
    code = textwrap.dedent(
        """
        import numpy as np, jax
        from imat.errors import ConfigError
        from imat.train_jax import sharding
        mesh = sharding.make_mesh()
        assert mesh.devices.size == 2, mesh
        x = sharding.shard_batch({"images": np.arange(8 * 3).reshape(8, 3)}, mesh)["images"]
        shards = sorted((s.index[0].start, s.data.shape) for s in x.addressable_shards)
        assert shards == [(0, (4, 3)), (4, (4, 3))], shards
        try:
            sharding.check_batch_size(7, mesh)
        except ConfigError as e:
            assert "--batch-size 7" in str(e)
        else:
            raise AssertionError("odd batch accepted on 2 devices")
        sharding.check_batch_size(8, mesh)
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
