"""Garments end to end through the CLI: prepare --garments -> train (existing objective) -> export (the model
says it is a garment model) -> index --garments -> search --garments -> eval --garments."""

from __future__ import annotations

import json

import pytest

from imat.cli.main import main


@pytest.mark.slow
def test_garments_end_to_end(tmp_path, capsys):
    from imat.data_tools.synthetic import write_synthetic
    from imat.export.onnx_export import read_metadata

    raw = write_synthetic(tmp_path / "raw", 24, seed=4, min_side=48, max_side=96, large_fraction=0.0)
    assert main(["-q", "data", "prepare", str(raw), "--garments", "--out", str(tmp_path / "prep"),
                 "--image-size", "32", "--workers", "1", "--crop-padding", "0.15"]) == 0
    data_dir = capsys.readouterr().out.strip().splitlines()[-1]
    assert data_dir.endswith("s32_stretch_garments/1.0.0")
    # bce over the one-hot garment category (triplet and rotation read the same fields: same-category
    # positives by the relevance rule; checked by hand, kept out of CI for time)
    assert main(["-q", "train", "--objective", "bce", "--arch", "resnet_tiny", "--data", data_dir,
                 "--workdir", str(tmp_path / "bce"), "--steps", "2", "--batch-size", "8", "--image-size", "32",
                 "--eval-every", "2", "--log-every", "1"]) == 0, capsys.readouterr()
    capsys.readouterr()
    model = tmp_path / "model.onnx"
    assert main(["-q", "export", str(tmp_path / "bce"), "--out", str(model)]) == 0
    meta = read_metadata(model)
    assert meta.extra["garment_model"] == "true" and float(meta.extra["garment_padding"]) == 0.15

    from imat.engine import Engine

    engine = Engine(model, progress=False)
    assert engine.is_garment_model and engine.garment_padding == 0.15
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(model), "--images", str(raw), "--out", str(idx), "--garments"]) == 0
    assert json.loads((idx / "index.json").read_text())["garment_padding"] == 0.15
    out = tmp_path / "r.jsonl"
    assert main(["search", "--model", str(model), "--index", str(idx), "--batch", str(raw), "--garments",
                 "--out", str(out), "--k", "3"]) == 0
    first = json.loads(out.read_text().splitlines()[0])
    assert ":" in first["query"] and "category_filter_source" in first
    capsys.readouterr()
    metrics = tmp_path / "m.json"
    assert main(["eval", "--model", str(model), "--images", str(raw), "--garments", "--k", "5",
                 "--json", str(metrics)]) == 0
    assert "garments of" in capsys.readouterr().out
    result = json.loads(metrics.read_text())
    assert result["garment_model"] is True and result["photos"] >= 2 and "map@5" in result
