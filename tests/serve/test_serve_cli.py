"""`imat serve` through the real entry point: listed in help, and start-up mistakes are one line."""

from __future__ import annotations

from imat.cli.main import main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imat: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_serve_is_listed_and_has_help(capsys):
    assert main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--model", "--index", "--host", "--port", "--max-batch", "--max-wait-ms", "--api-key-file",
                   "--protect-reads", "--max-upload-mb"):
        assert option in out


def test_serve_start_up_mistakes_are_one_line(serve_env, index_copy, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing.onnx"), "--index", str(index_copy)]) == 1
    assert "missing.onnx" in _one_error_line(capsys)
    assert main(["serve", "--model", str(serve_env["model"]), "--index", str(tmp_path / "nope")]) == 1
    assert "nope" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no state folder or lock left behind
    assert main(["serve", "--model", str(serve_env["model"]), "--index", str(index_copy), "--max-batch", "0"]) == 1
    assert "--max-batch" in _one_error_line(capsys)
    assert main(["serve", "--model", str(serve_env["model"]), "--index", str(index_copy), "--protect-reads"]) == 1
    assert "--api-key-file" in _one_error_line(capsys)
