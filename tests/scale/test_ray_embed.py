"""`imat embed --ray` (Ray Data: read_binary_files -> imat decoder tasks -> ONNX Runtime actors) writes the
embeddings folder of the single-process path: same rows, ids, errors and vectors (max abs diff <= 1e-6)."""

from __future__ import annotations

import numpy as np

from imat.engine import Engine
from imat.engine.embed_run import embed_to_dir, folder_inputs
from imat.engine.embedding_parts import part_files, read_embedding_dir
from imat.engine.parts_index import gather_rows
from imat.scale.ray_embed import ray_backend


def _engine(model):
    return Engine(model, batch_size=4, decode_threads=1, progress=False)


def _contents(directory):
    parts = read_embedding_dir(directory)
    rows = [m for entry in parts.parts for m in parts.metadata(entry).to_pylist()]
    return rows, gather_rows(parts, None)


def test_ray_embeddings_equal_single_process(local_ray, scale_env, tmp_path):
    engine = _engine(scale_env["model"])
    inputs = folder_inputs(engine, scale_env["photos"])
    local = embed_to_dir(engine, inputs, tmp_path / "local", part_size=6, progress=False)
    on_ray = embed_to_dir(engine, inputs, tmp_path / "ray", part_size=6, progress=False,
                          backend=ray_backend(engine, actors=2), backend_name="ray")
    assert on_ray.written_parts == local.written_parts == 5
    assert sorted(on_ray.errors) == sorted(local.errors)
    rows_local, x_local = _contents(tmp_path / "local")
    rows_ray, x_ray = _contents(tmp_path / "ray")
    assert rows_ray == rows_local  # row, id, path, error, embedding_row of every input
    assert [r["row"] for r in rows_ray] == list(range(25))
    assert {r["id"]: r["error"].split(" (")[0] for r in rows_ray if r["error"]} == {
        "img_003b": "corrupt or unsupported image", "img_007b": "empty file", "img_011b": "not an image"}
    assert x_ray.shape == x_local.shape == (22, 16)
    assert np.abs(x_ray - x_local).max() <= 1e-6


def test_ray_finishes_a_folder_begun_in_one_process(local_ray, scale_env, tmp_path):
    engine = _engine(scale_env["model"])
    inputs = folder_inputs(engine, scale_env["photos"])
    out = tmp_path / "emb"
    embed_to_dir(engine, inputs, out, part_size=6, progress=False)
    _, before = _contents(out)
    for part in (1, 3):  # as a killed run leaves them: files of two parts gone or half written
        (out / part_files(part)[0]).unlink()
    (out / part_files(3)[1]).write_bytes(b"PAR1 half")
    summary = embed_to_dir(engine, inputs, out, progress=False, backend=ray_backend(engine, actors=1),
                           backend_name="ray")
    assert (summary.skipped_parts, summary.redone_parts, summary.written_parts) == (3, 2, 2)
    assert summary.items == 12
    _, after = _contents(out)
    assert np.abs(after - before).max() <= 1e-6


def test_cli_embed_ray_then_rerun_without_ray_finds_it_complete(local_ray, scale_env, tmp_path, capsys):
    from imat.cli.main import main

    out = tmp_path / "emb"
    argv = ["embed", "--model", str(scale_env["model"]), "--images", str(scale_env["photos"]), "--out", str(out),
            "--part-size", "10", "--batch-size", "8"]
    assert main([*argv, "--ray", "--actors", "1"]) == 0  # one actor: each starts a Python with ORT (seconds)
    captured = capsys.readouterr()
    assert "embedded 22 of 25 images" in captured.out and "[ray, 1 actor]" in captured.out
    assert "skipped 3 unreadable images" in captured.err
    assert main(argv) == 0  # the same folder, whichever backend wrote it
    assert "all 3 parts already complete" in capsys.readouterr().out
    assert main([*argv, "--ray-address", "auto"]) == 1
    assert "apply to --ray" in capsys.readouterr().err
