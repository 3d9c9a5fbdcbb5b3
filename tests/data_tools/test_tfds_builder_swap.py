"""prepare() through the shared folder swap (imat.fileio): crash states repaired, a second writer refused."""

from __future__ import annotations

import logging
import os
import pathlib

import pytest

from imat.data_tools import tfds_builder
from imat.data_tools.pipelines import PreparedSplit
from imat.data_tools.synthetic import write_synthetic
from imat.errors import DataError
from imat.fileio import dir_lock

SIZE = 16


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> pathlib.Path:
    return write_synthetic(tmp_path_factory.mktemp("syn") / "kaggle", 12, seed=0, min_side=48,
                           max_side=96, large_fraction=0.0)


def hidden(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_prepare_repairs_a_swap_killed_between_its_renames(synthetic_root, tmp_path, caplog):
    out = tmp_path / "out"
    d = tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1)
    n = PreparedSplit.open(d, "train").num_examples
    # A prepare killed after moving the dataset aside and before moving the new one in (dead pid).
    os.rename(d, d.parent / f".{d.name}.old-99999999-aa")
    assert not d.exists()
    with caplog.at_level(logging.INFO):
        assert tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1) == d
    messages = [r.getMessage() for r in caplog.records]
    assert any("restored" in m for m in messages) and any("nothing to do" in m for m in messages)  # not rebuilt
    assert PreparedSplit.open(d, "train").num_examples == n and hidden(d.parent) == []


def test_a_second_prepare_of_the_same_dataset_is_refused(synthetic_root, tmp_path):
    out = tmp_path / "out"
    target = tfds_builder.dataset_dir(out, SIZE)
    with dir_lock(target, error=DataError):  # another prepare of the same options, swapping
        with pytest.raises(DataError, match=rf"another imat process is writing {target} \(pid {os.getpid()}\); "
                                            r"wait for it or choose another --out"):
            tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1)
    assert not target.exists() and hidden(target.parent) == [] and hidden(out) == []
    assert tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1) == target
