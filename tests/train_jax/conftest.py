"""Session fixtures for train_jax tests: one small synthetic dataset, prepared once at 32 px."""

from __future__ import annotations

import pathlib

import pytest

IMAGE_SIZE = 32
NUM_IMAGES = 200


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> pathlib.Path:
    """A prepared (TFDS) synthetic dataset at 32x32: 80/20 train/validation split."""
    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare

    root = tmp_path_factory.mktemp("synthetic")
    raw = write_synthetic(root / "raw", NUM_IMAGES, seed=0, min_side=48, max_side=96, large_fraction=0.0)
    return pathlib.Path(prepare(raw, root / "prepared", image_size=IMAGE_SIZE, workers=1, seed=0))
