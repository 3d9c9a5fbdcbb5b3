"""Session fixtures for train_jax tests: one small synthetic dataset prepared once at 32 px.

JAX's persistent compilation cache is switched on for these tests (and the subprocesses they
start, through the environment): on 2 shared cores XLA compiles dominate, and every training
run of the suite compiles nearly the same programs.
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

IMAGE_SIZE = 32
NUM_IMAGES = 200

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"imat-test-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
try:
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
except Exception:  # pragma: no cover - jax missing: the tests that need it fail on import anyway
    pass


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> pathlib.Path:
    """A prepared (TFDS) synthetic dataset at 32x32: 160 train / 40 validation images."""
    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare

    root = tmp_path_factory.mktemp("synthetic")
    raw = write_synthetic(root / "raw", NUM_IMAGES, seed=0, min_side=48, max_side=96, large_fraction=0.0)
    return pathlib.Path(prepare(raw, root / "prepared", image_size=IMAGE_SIZE, workers=1, seed=0))


@pytest.fixture()
def small_config(prepared_data):
    """A TrainConfig factory for resnet_tiny on the prepared synthetic data."""
    from imat.train_jax.config import TrainConfig

    def make(**overrides):
        base = dict(data_dir=str(prepared_data), arch="resnet_tiny", image_size=IMAGE_SIZE, batch_size=16,
                    learning_rate=3e-3, steps=20, eval_every=None, checkpoint_every=None, log_every=5)
        base.update(overrides)
        return TrainConfig(**base)

    return make
