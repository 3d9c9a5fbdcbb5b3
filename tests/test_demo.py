"""`imat demo` end to end (the product's main job), at a CI-sized scale."""

from __future__ import annotations

import json

from imat.cli.main import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    work = tmp_path / "demo"
    argv = ["-q", "demo", "--workdir", str(work), "--arch", "resnet_tiny", "--steps", "12",
            "--images", "60", "--image-size", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("model.onnx", "results.jsonl", "report.html", "eval.json", "curves.png", "index"):
        assert name in out
    for path in ("model.onnx", "results.jsonl", "report.html", "eval.json", "run/curves.png",
                 "index/index.faiss", "index/index.json", "index/items.jsonl", "eda/report.html"):
        assert (work / path).is_file(), path

    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    assert len(records) == 16  # the demo's query folder
    for r in records:
        assert "error" not in r
        assert [x["rank"] for x in r["results"]] == list(range(1, 11))
        assert r["predicted_categories"]
    metrics = json.loads((work / "eval.json").read_text())
    # Even a 12-step tiny model ranks better than a random ranking on synthetic data.
    assert metrics["map@10"] > metrics["baseline"]["map@10"]
    html = (work / "report.html").read_text()
    assert html.count("<img") >= 16 * 11

    # A rerun reuses the data and resumes (finished) training instead of starting over.
    assert main(argv) == 0
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r.get("split") == "train"]
    assert len(train_steps) == len(set(train_steps))
