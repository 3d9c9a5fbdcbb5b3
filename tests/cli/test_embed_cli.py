"""`imat embed`, `imat index --from-embeddings` and `imat search --out x.parquet` through the real entry point,
including a run killed with SIGKILL and finished by a rerun."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from imat.cli.main import main

pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_onnx):
    from imat.data_tools.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("embed-cli")
    model = tiny_onnx.build_tiny_model(root / "model.onnx")
    kaggle = write_synthetic(root / "kaggle", 20, seed=0, min_side=48, max_side=96, large_fraction=0.0)
    many = root / "many"
    tiny_onnx.write_photos(many, 240)
    (many / "img_100b.jpg").write_bytes(b"\xff\xd8\xff\xe0 a truncated jpeg")
    return {"root": root, "model": model, "kaggle": kaggle, "many": many, "tiny_onnx": tiny_onnx}


def _rows(emb_dir: pathlib.Path) -> tuple[list[int], list[str], np.ndarray, dict]:
    """(rows, ids, vectors in row order, {id: error}) of an embeddings folder, read straight from its files."""
    manifest = json.loads((emb_dir / "manifest.json").read_text())
    rows, ids, vectors, errors = [], [], [], {}
    for entry in manifest["parts"]:
        name = f"part-{entry['part']:05d}"
        meta = pq.read_table(emb_dir / "metadata" / f"{name}.parquet").to_pylist()
        rows += [m["row"] for m in meta]
        ids += [m["id"] for m in meta]
        errors.update({m["id"]: m["error"] for m in meta if m["error"]})
        vectors.append(np.load(emb_dir / "embeddings" / f"{name}.npy"))
    return rows, ids, np.concatenate(vectors), errors


def _embed_argv(s, out) -> list[str]:
    return ["embed", "--model", str(s["model"]), "--images", str(s["many"]), "--out", str(out), "--part-size", "8",
            "--batch-size", "1", "--threads", "1"]


def test_embed_killed_with_sigkill_then_rerun_loses_and_duplicates_nothing(setup, tmp_path, capsys):
    s = setup
    clean = tmp_path / "clean"
    assert main(_embed_argv(s, clean)) == 0, capsys.readouterr().err
    killed = tmp_path / "killed"
    code = f"import sys; from imat.cli.main import main; sys.exit(main({_embed_argv(s, killed)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    first = killed / "metadata" / "part-00000.parquet"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)  # at once: mid-part, maybe before the manifest lists part 0
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    written = json.loads((killed / "manifest.json").read_text())["parts"]
    assert len(written) < 31, "the run finished before it was killed: the test needs a slower run"

    assert main(_embed_argv(s, killed)) == 0
    captured = capsys.readouterr()
    assert "embedded" in captured.out and "images/s" in captured.out
    if written:
        assert f"resuming {killed}: {len(written)} of 31 parts complete, skipped" in captured.err
    rows, ids, vectors, errors = _rows(killed)
    clean_rows, clean_ids, clean_vectors, clean_errors = _rows(clean)
    assert rows == list(range(241)) == clean_rows  # none lost, none twice
    assert ids == clean_ids
    assert errors == clean_errors and list(errors) == ["img_100b"]
    np.testing.assert_array_equal(vectors, clean_vectors)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["embedded"] == 240
    assert not list(killed.rglob(".part-*"))  # no temp file of the killed run left


def test_index_from_embeddings_is_the_index_of_imat_index_images(setup, tmp_path, capsys):
    s = setup
    emb, from_parts, direct = tmp_path / "emb", tmp_path / "idx-parts", tmp_path / "idx-direct"
    assert main(["embed", "--model", str(s["model"]), "--images", str(s["kaggle"]), "--out", str(emb),
                 "--part-size", "6", "--batch-size", "4"]) == 0
    assert main(["index", "--from-embeddings", str(emb), "--model", str(s["model"]), "--out", str(from_parts)]) == 0
    assert main(["index", "--model", str(s["model"]), "--images", str(s["kaggle"]), "--out", str(direct)]) == 0
    out = capsys.readouterr().out
    assert "indexed 20 embeddings of" in out and "labelled" in out
    assert (from_parts / "items.jsonl").read_text() == (direct / "items.jsonl").read_text()
    a, b = (json.loads((d / "index.json").read_text()) for d in (from_parts, direct))
    for key in ("index_type", "dim", "count", "model_fingerprint", "labelled", "skipped", "search_params",
                "image_size", "resize_mode", "model_objective"):
        assert a[key] == b[key], key

    res_parts, res_direct = tmp_path / "r1.jsonl", tmp_path / "r2.parquet"
    for index_dir, res in ((from_parts, res_parts), (direct, res_direct)):
        assert main(["search", "--model", str(s["model"]), "--index", str(index_dir), "--batch",
                     str(s["kaggle"] / "train"), "--out", str(res), "--k", "3"]) == 0
    jsonl = [json.loads(line) for line in res_parts.read_text().splitlines()]
    table = pq.read_table(res_direct)
    assert set(table.column_names) == {k for r in jsonl for k in r}
    rows = table.to_pylist()
    assert [r["query"] for r in rows] == [r["query"] for r in jsonl]
    for r, j in zip(rows, jsonl):
        assert [x["id"] for x in r["results"]] == [x["id"] for x in j["results"]]
        np.testing.assert_allclose([x["score"] for x in r["results"]], [x["score"] for x in j["results"]], atol=1e-5)
        assert [c["name"] for c in r["predicted_categories"]] == [c["name"] for c in j["predicted_categories"]]


def test_index_from_embeddings_user_mistakes_are_one_line(setup, tmp_path, capsys):
    s = setup
    other = s["tiny_onnx"].build_tiny_model(tmp_path / "other.onnx", seed=4)
    emb = tmp_path / "emb"
    assert main(["embed", "--model", str(s["model"]), "--images", str(s["kaggle"]), "--out", str(emb)]) == 0
    capsys.readouterr()
    assert main(["index", "--from-embeddings", str(emb), "--model", str(other), "--out", str(tmp_path / "i")]) == 1
    assert "embedded by another model" in capsys.readouterr().err
    assert main(["index", "--from-embeddings", str(tmp_path / "nope"), "--out", str(tmp_path / "i")]) == 1
    assert "not an embeddings folder" in capsys.readouterr().err
    assert main(["index", "--from-embeddings", str(emb), "--images", str(s["kaggle"]), "--out",
                 str(tmp_path / "i")]) == 1
    assert "takes no --images" in capsys.readouterr().err
    assert main(["embed", "--model", str(other), "--images", str(s["kaggle"]), "--out", str(emb)]) == 1
    err = capsys.readouterr().err
    assert "imat: error:" in err and "another model" in err and "Traceback" not in err
