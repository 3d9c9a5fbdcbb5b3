"""`imat train` smoke test: a 2-step run through the CLI, and a clear error for a wrong image size."""

from __future__ import annotations

import json
import pathlib

import pytest

from imat.cli.main import main


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> pathlib.Path:
    """A small synthetic dataset prepared at 32 px (tests/train_jax has its own; fixtures do not cross folders)."""
    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare

    root = tmp_path_factory.mktemp("cli_train_data")
    raw = write_synthetic(root / "raw", 60, seed=1, min_side=48, max_side=96, large_fraction=0.0)
    return pathlib.Path(prepare(raw, root / "prepared", image_size=32, workers=1, seed=0))


def test_train_cli_smoke(prepared_data, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main(["-q", "train", "--objective", "bce", "--arch", "resnet_tiny", "--data", str(prepared_data),
                 "--workdir", str(workdir), "--steps", "2", "--batch-size", "8", "--image-size", "32",
                 "--lr", "1e-3", "--eval-every", "2", "--log-every", "1", "--augment", "--ema", "0.9",
                 "--mixup", "0.2"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out[out.index("{"):])
    assert result["step"] == 2 and "f1_macro" in result["val"]
    assert (workdir / "config.json").is_file() and (workdir / "checkpoints" / "2").is_dir()
    recorded = json.loads((workdir / "config.json").read_text())
    assert (recorded["learning_rate"], recorded["ema"], recorded["mixup"], recorded["augment"]) == (1e-3, 0.9, 0.2, True)


def test_train_cli_image_size_mismatch(prepared_data, tmp_path, capsys):
    code = main(["train", "--arch", "resnet_tiny", "--data", str(prepared_data), "--workdir", str(tmp_path / "r"),
                 "--steps", "1", "--image-size", "128"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("imat: error:") and "--image-size 128" in err and "32 px" in err


def test_train_cli_bad_option_is_usage_error(tmp_path, capsys):
    assert main(["train", "--objective", "arcface", "--data", str(tmp_path), "--workdir", str(tmp_path)]) == 2
