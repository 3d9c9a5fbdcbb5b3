"""Engine fixtures: the tiny contract-conforming model (tiny_onnx.py) and small image folders."""

from __future__ import annotations

import pathlib

import pytest

from tiny_onnx import build_tiny_model, write_photos

@pytest.fixture(scope="session")
def make_model():
    return build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> pathlib.Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "model.onnx")


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> pathlib.Path:
    """Same shape, different weights: a different fingerprint."""
    return build_tiny_model(tmp_path_factory.mktemp("model2") / "model.onnx", seed=1)


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> pathlib.Path:
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder, 12)
    return folder


@pytest.fixture(scope="session")
def photos_factory():
    return write_photos


@pytest.fixture(scope="session")
def kaggle_dir(tmp_path_factory) -> pathlib.Path:
    from imat.data_tools.synthetic import write_synthetic

    return write_synthetic(tmp_path_factory.mktemp("kaggle") / "ds", 24, seed=0, min_side=48, max_side=96,
                           large_fraction=0.0)


@pytest.fixture()
def engine(tiny_model):
    from imat.engine import Engine

    return Engine(tiny_model, decode_threads=2, batch_size=4, progress=False)
