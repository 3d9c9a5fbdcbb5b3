"""Shared fixtures: where the real data lives, and small synthetic datasets built once per session."""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# ../shared beside the checkout (as in CI); IMAT_SHARED overrides.
SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
TORCHVISION_REF = SHARED / "reference" / "torchvision"


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (tests on real data need ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data (real-smoke, ccp-dev, imaterialist2020); skips when absent."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def real_smoke(shared_data) -> pathlib.Path:
    return _require(shared_data / "real-smoke")


@pytest.fixture(scope="session")
def ccp_dev(shared_data) -> pathlib.Path:
    return _require(shared_data / "ccp-dev")


@pytest.fixture(scope="session")
def torchvision_ref() -> pathlib.Path:
    return _require(TORCHVISION_REF)


@pytest.fixture(scope="session")
def tiny_onnx():
    """tests/engine/tiny_onnx.py (real small ONNX models and photo folders), loaded by path (tests/ is not
    a package, and a plain import would find another folder's module in a full run)."""
    import importlib.util

    path = REPO / "tests" / "engine" / "tiny_onnx.py"
    spec = importlib.util.spec_from_file_location("imat_tests_tiny_onnx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HEAVY_MODULES = ("jax", "flax", "optax", "tensorflow_datasets", "tensorflow", "grain", "matplotlib",
                 "onnxruntime", "faiss")


@pytest.fixture(scope="session")
def cli_in_fresh_process():
    """run(argv) -> (CompletedProcess, heavy modules it imported): `imat argv` in a new interpreter.

    For checks that a command stays light (help, data tools) whatever this test process imported.
    """
    import subprocess
    import sys

    def run(argv: list[str]):
        code = (
            "import sys\n"
            "from imat.cli.main import main\n"
            f"rc = main({argv!r})\n"
            f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY_MODULES!r}))\n"
            "print('HEAVY=' + ','.join(heavy))\n"
            "sys.exit(rc)\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        heavy = proc.stdout.strip().splitlines()[-1].removeprefix("HEAVY=")
        return proc, [m for m in heavy.split(",") if m]

    return run
