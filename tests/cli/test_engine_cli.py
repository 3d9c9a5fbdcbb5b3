"""`imat index`, `imat search`, `imat eval` through the real entry point; user mistakes are one line."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from imat.cli.main import main


def _load_test_models():
    # The engine tests' model builder, loaded by path (tests/ is not a package).
    path = pathlib.Path(__file__).resolve().parents[1] / "engine" / "tiny_onnx.py"
    spec = importlib.util.spec_from_file_location("imat_engine_tiny_onnx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tiny = _load_test_models()
build_tiny_model, write_photos = _tiny.build_tiny_model, _tiny.write_photos


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_tiny_model(root / "model.onnx")
    other = build_tiny_model(root / "other.onnx", seed=5)
    photos = root / "photos"
    write_photos(photos, 8)
    (photos / "notes.txt").write_text("not an image")
    queries = root / "queries"
    write_photos(queries, 3, seed=3)
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (queries / "readme.md").write_text("hi")
    return {"root": root, "model": model, "other": other, "photos": photos, "queries": queries}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imat: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_index_search_eval_happy_path(setup, capsys, tmp_path):
    s = setup
    rc = main(["index", "--model", str(s["model"]), "--images", str(s["photos"]), "--out", str(tmp_path / "idx"),
               "--batch-size", "3", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "indexed 8 images" in captured.out and "images/s" in captured.out
    assert "skipped 1 non-image files (e.g. notes.txt)" in captured.err

    out = tmp_path / "res.jsonl"
    rc = main(["search", "--model", str(s["model"]), "--index", str(tmp_path / "idx"), "--batch", str(s["queries"]),
               "--k", "3", "--out", str(out), "--html", str(tmp_path / "r.html")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4  # 3 good + the corrupt one; readme.md skipped
    errors = [r for r in records if "error" in r]
    assert len(errors) == 1 and errors[0]["query"].endswith("broken.jpg")
    assert all(len(r["results"]) == 3 for r in records if "error" not in r)
    assert "1 errors" in captured.out and "readme.md" in captured.err
    html = (tmp_path / "r.html").read_text()
    assert all(r["query"] in html for r in records)

    # single query images given as arguments; a non-image argument is skipped with a note
    rc = main(["search", "--model", str(s["model"]), "--index", str(tmp_path / "idx"),
               str(s["photos"] / "img_000.jpg"), str(s["photos"] / "notes.txt"), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and "notes.txt" in captured.err
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert rec["results"][0]["id"] == "img_000"


def test_kaggle_folder_index_and_eval(setup, capsys, tmp_path):
    from imat.data_tools.synthetic import write_synthetic

    ds = write_synthetic(tmp_path / "ds", 16, seed=1, min_side=48, max_side=80, large_fraction=0.0)
    rc = main(["index", "--model", str(setup["model"]), "--images", str(ds), "--out", str(tmp_path / "idx")])
    assert rc == 0, capsys.readouterr().err
    items = [json.loads(x) for x in (tmp_path / "idx" / "items.jsonl").read_text().splitlines()]
    assert len(items) == 16 and all("categories" in it and len(it["id"]) == 32 for it in items)
    capsys.readouterr()
    rc = main(["eval", "--model", str(setup["model"]), "--images", str(ds), "--k", "4", "--json",
               str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert rc == 0
    for key in ("map@4", "precision@4", "recall@4", "ndcg@4", "f1_macro_neighbours", "f1_micro_model", "random"):
        assert key in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["k"] == 4 and "baseline" in metrics


def test_empty_folder_is_one_line(setup, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["index", "--model", str(setup["model"]), "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "idx")]) == 1
    assert "empty: no image files found" in one_error_line(capsys)


def test_missing_model_is_one_line(setup, capsys, tmp_path):
    assert main(["index", "--model", str(tmp_path / "missing.onnx"), "--images", str(setup["photos"]),
                 "--out", str(tmp_path / "idx")]) == 1
    assert "missing.onnx: model file not found" in one_error_line(capsys)


def test_model_index_mismatch_is_one_line(setup, capsys, tmp_path):
    assert main(["index", "--model", str(setup["model"]), "--images", str(setup["photos"]),
                 "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["search", "--model", str(setup["other"]), "--index", str(tmp_path / "idx"),
                 str(setup["photos"] / "img_000.jpg"), "--out", str(tmp_path / "r.jsonl")]) == 1
    line = one_error_line(capsys)
    assert "built by a different model" in line and "other.onnx" in line
    assert not (tmp_path / "r.jsonl").exists()


def test_missing_index_and_bad_query_arguments_are_one_line(setup, capsys, tmp_path):
    assert main(["search", "--model", str(setup["model"]), "--index", str(tmp_path / "noidx"),
                 str(setup["photos"] / "img_000.jpg"), "--out", str(tmp_path / "r.jsonl")]) == 1
    assert "noidx: index folder not found" in one_error_line(capsys)
    assert main(["search", "--model", str(setup["model"]), "--index", str(tmp_path / "noidx"),
                 "--out", str(tmp_path / "r.jsonl")]) == 1
    assert "either --batch" in one_error_line(capsys)
    assert main(["eval", "--model", str(setup["model"]), "--images", str(setup["photos"])]) == 1
    assert "neither train.csv nor labels.csv" in one_error_line(capsys)


def test_bad_index_type_is_one_line(setup, capsys, tmp_path):
    assert main(["index", "--model", str(setup["model"]), "--images", str(setup["photos"]),
                 "--out", str(tmp_path / "idx"), "--index-type", "IVF4096,Flat"]) == 1
    assert "needs at least 4096 vectors" in one_error_line(capsys)


def test_index_resize_mode_must_match_the_model(setup, capsys, tmp_path):
    assert main(["index", "--model", str(setup["model"]), "--images", str(setup["photos"]),
                 "--out", str(tmp_path / "idx"), "--resize-mode", "letterbox"]) == 1
    line = one_error_line(capsys)
    assert "resize mode 'letterbox' differs from the model's resize_mode 'stretch'" in line
    assert "model.onnx" in line and not (tmp_path / "idx").exists()
    assert main(["index", "--model", str(setup["model"]), "--images", str(setup["photos"]),
                 "--out", str(tmp_path / "idx"), "--resize-mode", "stretch"]) == 0


@pytest.mark.parametrize("option", ["--out", "--html"])
def test_search_output_that_is_a_directory_is_one_line(setup, capsys, tmp_path, option):
    (tmp_path / "adir").mkdir()
    outputs = {"--out": str(tmp_path / "r.jsonl"), "--html": str(tmp_path / "r.html")}
    outputs[option] = str(tmp_path / "adir")
    # The index does not exist: the output check comes first, before any work.
    assert main(["search", "--model", str(setup["model"]), "--index", str(tmp_path / "noidx"),
                 str(setup["photos"] / "img_000.jpg"), "--out", outputs["--out"], "--html", outputs["--html"]]) == 1
    line = one_error_line(capsys)
    assert f"{option} {tmp_path / 'adir'} is a directory" in line


def test_eval_json_that_is_a_directory_is_one_line(setup, capsys, tmp_path):
    (tmp_path / "adir").mkdir()
    assert main(["eval", "--model", str(setup["model"]), "--images", str(setup["photos"]),
                 "--json", str(tmp_path / "adir")]) == 1
    assert "--json" in one_error_line(capsys)


def test_non_utf8_file_names_index_and_search(setup, capsys, tmp_path):
    import os

    folder = tmp_path / "latin"
    write_photos(folder, 3)
    latin = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")
    os.rename(os.path.join(os.fsencode(folder), b"img_001.jpg"), latin)
    assert main(["index", "--model", str(setup["model"]), "--images", str(folder), "--out", str(tmp_path / "idx")]) == 0
    out = tmp_path / "r.jsonl"
    rc = main(["search", "--model", str(setup["model"]), "--index", str(tmp_path / "idx"), "--batch", str(folder),
               "--k", "1", "--out", str(out), "--html", str(tmp_path / "r.html")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    records = [json.loads(x) for x in out.read_bytes().decode("utf-8").splitlines()]
    (rec,) = [r for r in records if "query_bytes_b64" in r]
    assert rec["query"].endswith("caf\\xe9.jpg") and rec["results"][0]["id"] == "caf\\xe9"
    assert "error" not in rec and "path_bytes_b64" in rec["results"][0]


def test_batch_folder_counts_entries_that_are_not_image_files(setup, capsys, tmp_path):
    import os

    from PIL import Image, features

    q = tmp_path / "q"
    write_photos(q, 2)
    os.symlink(q / "gone.jpg", q / "dangling.jpg")
    os.symlink(q / "loop.jpg", q / "loop.jpg")
    (q / "folder.jpg").mkdir()
    os.mkfifo(q / "pipe.jpg")
    avif = features.check("avif")
    if avif:  # a format outside the old fixed extension list that this Pillow opens
        Image.new("RGB", (40, 30), (200, 10, 10)).save(q / "photo.avif")
    assert main(["index", "--model", str(setup["model"]), "--images", str(q), "--out", str(tmp_path / "idx")]) == 0
    captured = capsys.readouterr()
    assert f"indexed {2 + avif} images" in captured.out
    assert "skipped 4 entries that are not image files" in captured.err
    out = tmp_path / "r.jsonl"
    rc = main(["search", "--model", str(setup["model"]), "--index", str(tmp_path / "idx"), "--batch", str(q),
               "--k", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 2 + avif and not any("error" in r for r in records)
    assert "skipped 4 entries that are not image files" in captured.err
    for name, why in (("dangling.jpg", "dangling symlink"), ("loop.jpg", "symlink loop"),
                      ("folder.jpg", "a folder"), ("pipe.jpg", "FIFO")):
        assert f"{name} ({why}" in captured.err, captured.err
    assert "4 entries skipped" in captured.out


def test_index_add_remove_and_category_search(setup, capsys, tmp_path):
    from imat.data_tools.synthetic import write_synthetic

    s = setup
    ds = write_synthetic(tmp_path / "ds", 12, seed=2, min_side=48, max_side=80, large_fraction=0.0)
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(s["model"]), "--images", str(ds), "--out", str(idx)]) == 0
    items = [json.loads(x) for x in (idx / "items.jsonl").read_text().splitlines()]
    more = write_synthetic(tmp_path / "more", 4, seed=9, min_side=48, max_side=80, large_fraction=0.0)
    capsys.readouterr()
    assert main(["index", "--model", str(s["model"]), "--images", str(more), "--out", str(idx), "--add"]) == 0
    assert "added 4 images" in capsys.readouterr().out
    gone = items[0]["id"]
    assert main(["index", "--model", str(s["model"]), "--out", str(idx), "--remove", gone]) == 0
    after = [json.loads(x) for x in (idx / "items.jsonl").read_text().splitlines()]
    assert len(after) == 15 and gone not in {it["id"] for it in after}

    name = after[0]["categories"][0]
    out = tmp_path / "res.jsonl"
    rc = main(["search", "--model", str(s["model"]), "--index", str(idx), "--batch", str(s["queries"]),
               "--k", "20", "--out", str(out), "--category", name])
    assert rc == 0, capsys.readouterr().err
    by_id = {it["id"]: it for it in after}
    having = sum(name in it["categories"] for it in after)
    for rec in (json.loads(x) for x in out.read_text().splitlines()):
        if "error" not in rec:
            assert len(rec["results"]) == having
            assert all(name in by_id[r["id"]]["categories"] for r in rec["results"])

    capsys.readouterr()
    assert main(["index", "--model", str(s["model"]), "--out", str(idx), "--remove", "no-such-id"]) == 1
    assert "no-such-id" in one_error_line(capsys)
    assert main(["index", "--model", str(s["model"]), "--out", str(idx)]) == 1
    assert "--images" in one_error_line(capsys)
