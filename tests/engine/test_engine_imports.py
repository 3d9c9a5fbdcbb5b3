"""The engine must never import the training stack (serving installs only the engine extra)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("jax", "jaxlib", "flax", "optax", "tensorflow_datasets", "tensorflow")


def test_engine_and_its_cli_do_not_import_the_training_stack():
    code = (
        "import sys\n"
        "import imat.engine, imat.engine.engine, imat.engine.session, imat.engine.embedder, imat.engine.index\n"
        "import imat.engine.search, imat.engine.evaluate, imat.engine.report, imat.cli.engine\n"
        "import imat.data_tools.images, imat.data_tools.kaggle, imat.data_tools.labels\n"
        "import faiss, onnxruntime\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print('FORBIDDEN:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FORBIDDEN:\n" in out.stdout, out.stdout


def test_cli_index_command_runs_without_the_training_stack(tmp_path):
    # Running `imat search --help` through the lazy group imports imat.cli.engine for real.
    code = (
        "import sys\n"
        "from imat.cli.main import main\n"
        "rc = main(['search', '--help'])\n"
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
        "print('RC', rc, 'FORBIDDEN:' + ','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RC 0 FORBIDDEN:\n" in out.stdout, out.stdout + out.stderr


def test_search_and_index_of_plain_photos_import_only_what_they_need(tiny_model, photo_dir, tmp_path):
    # Fast start: plain photos never need the garment tools or the Kaggle reader, and no progress bar
    # is drawn when stderr is not a terminal, so tqdm is not imported either.
    unneeded = ("imat.data_tools.garments", "imat.data_tools.kaggle", "tqdm", "onnx", "imat.export")
    photo = sorted(photo_dir.glob("*.jpg"))[0]
    for argv in (["index", "--model", str(tiny_model), "--images", str(photo_dir), "--out", str(tmp_path / "ix")],
                 ["search", "--model", str(tiny_model), "--index", str(tmp_path / "ix"), str(photo),
                  "--out", str(tmp_path / "r.jsonl")]):
        code = (
            "import sys\n"
            "from imat.cli.main import main\n"
            f"rc = main({argv!r})\n"
            f"loaded = [m for m in {unneeded!r} if m in sys.modules]\n"
            "print('RC', rc, 'LOADED:' + ','.join(loaded))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        assert "RC 0 LOADED:\n" in out.stdout, argv[0] + ": " + out.stdout + out.stderr
