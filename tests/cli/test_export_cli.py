"""`imat export RUN_DIR --out model.onnx`: prints the path, parity errors, time and size; errors are one line."""

from __future__ import annotations

import pathlib
import sys

import pytest

from imat.cli.main import main

# The run-directory builder shared with tests/export (train_jax's own config + CheckpointStore).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "export"))
from export_helpers import make_run  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "run"
    make_run(path, objective="triplet", steps=(1, 4))
    return path


def test_export_command(run_dir, tmp_path, capsys):
    from imat.export.onnx_export import read_metadata

    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--step", "1"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert lines[0] == str(out)
    assert "parity embedding: max relative error" in printed
    assert "probabilities" not in printed  # triplet: embedding only
    assert "export time:" in printed and "file size:" in printed
    meta = read_metadata(out)
    assert meta.objective == "triplet" and meta.extra["checkpoint_step"] == "1"
    assert meta.fingerprint in printed


def test_export_command_default_out_is_in_the_run(run_dir, capsys):
    assert main(["export", str(run_dir)]) == 0
    assert (run_dir / "model.onnx").is_file()
    assert capsys.readouterr().out.splitlines()[0] == str(run_dir / "model.onnx")


def test_export_command_errors(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imat: error:") and "missing" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx"), "--step", "7"]) == 1
    assert "step 7" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--tolerance", "0"]) == 2  # usage error
    assert not (tmp_path / "m.onnx").exists()


def test_export_command_parity_failure_writes_nothing(run_dir, tmp_path, capsys):
    # float32 ONNX vs XLA differ by ~1e-7; an impossible tolerance must trip the gate.
    out = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--tolerance", "1e-15"]) == 1
    err = capsys.readouterr().err
    assert f"parity check failed for {out}:" in err and "embedding: rel" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bce_run_with_data(tmp_path_factory):
    """A bce run whose config names a real prepared dataset (synthetic, 32 px): what --quantize calibrates on."""
    import json

    from imat.data_tools.synthetic import write_synthetic
    from imat.data_tools.tfds_builder import prepare

    root = tmp_path_factory.mktemp("qrun")
    raw = write_synthetic(root / "raw", 70, seed=0, min_side=48, max_side=96, large_fraction=0.0)
    data = prepare(raw, root / "prepared", image_size=32, workers=1, seed=0)
    run = root / "run"
    make_run(run, objective="bce", steps=(1,))
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data_dir": str(data)}))
    return run


def test_export_quantize_int8_writes_a_gated_int8_model(bce_run_with_data, tmp_path, capsys):
    from imat.export.onnx_export import read_metadata

    out = tmp_path / "model.onnx"
    assert main(["export", str(bce_run_with_data), "--out", str(out), "--quantize", "int8"]) == 0
    printed = capsys.readouterr().out
    int8 = tmp_path / "model.int8.onnx"
    assert f"\n{int8}\n" in printed and "int8 agreement: embedding top-10 overlap" in printed
    assert "probabilities top-10 overlap" in printed and "calibration images" in printed
    assert read_metadata(int8).extra["quantization"] == "int8" and "quantization" not in read_metadata(out).extra


def test_export_quantize_without_the_dataset_is_one_clear_error(run_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--out", str(out), "--quantize", "int8"]) == 1
    err = capsys.readouterr().err
    assert "--quantize int8 calibrates on the run's prepared dataset" in err and "Traceback" not in err
    assert not (tmp_path / "model.int8.onnx").exists()
