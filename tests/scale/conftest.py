"""Scale fixtures: one local Ray instance for all Ray tests (starting Ray costs seconds), the tiny model, photos."""

from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'imat[scale]'); the Ray tests need it")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'imat[scale]')")


@pytest.fixture(scope="session")
def local_ray():
    """A local Ray shared by the scale tests: 4 logical CPUs (2 actors + read/decode tasks) on any machine."""
    # Ray's workers run at nice 15 by default: on a shared machine they then wait for everyone else.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def scale_env(tmp_path_factory, tiny_onnx):
    """{"model", "photos"}: 22 photos, one truncated JPEG, one empty file and one that is not an image."""
    root = tmp_path_factory.mktemp("scale")
    model = tiny_onnx.build_tiny_model(root / "model.onnx")
    photos = root / "photos"
    good = tiny_onnx.write_photos(photos, 22)
    (photos / "img_003b.jpg").write_bytes(good[3].read_bytes()[: len(good[3].read_bytes()) // 3])
    (photos / "img_007b.jpg").write_bytes(b"")
    (photos / "img_011b.jpg").write_bytes(b"plain text, not an image")
    return {"model": model, "photos": photos}
