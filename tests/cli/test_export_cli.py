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
