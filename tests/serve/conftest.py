"""Serve fixtures: the tiny real ONNX model, a labelled index built from a synthetic Kaggle folder,
and real uvicorn servers on 127.0.0.1 (in a thread here, or in a subprocess for the kill -9 test)."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")


def _load_tiny_onnx():
    # The engine tests' model builder, loaded by path (tests/ is not a package).
    path = pathlib.Path(__file__).resolve().parents[1] / "engine" / "tiny_onnx.py"
    spec = importlib.util.spec_from_file_location("imat_serve_tiny_onnx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tiny = _load_tiny_onnx()


@pytest.fixture(scope="session")
def tiny_onnx():
    """tests/engine/tiny_onnx.py (real small ONNX models), for tests that build a model of their own."""
    return _tiny


@pytest.fixture(scope="session")
def serve_env(tmp_path_factory):
    """{"model", "gallery" (Kaggle folder), "index" (template index folder), "queries" (photo paths)}."""
    from imat.data_tools.synthetic import write_synthetic
    from imat.engine import Engine
    from imat.engine.gallery import folder_items

    root = tmp_path_factory.mktemp("serve")
    model = _tiny.build_tiny_model(root / "model.onnx")
    gallery = write_synthetic(root / "gallery", 24, seed=0, min_side=48, max_side=96, large_fraction=0.0)
    found = folder_items(gallery)
    engine = Engine(model, decode_threads=2, batch_size=8, progress=False)
    engine.build_index(found.items, root / "index", index_type="Flat", labels=found.labels, ids=found.ids)
    queries = _tiny.write_photos(root / "queries", 6, seed=3)
    return {"model": model, "gallery": gallery, "index": root / "index", "queries": queries, "root": root}


@pytest.fixture()
def index_copy(serve_env, tmp_path) -> pathlib.Path:
    """A private copy of the template index (each test may change its own)."""
    dst = tmp_path / "index"
    shutil.copytree(serve_env["index"], dst)
    return dst


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """create_app(config) under a real uvicorn server on 127.0.0.1, in a thread."""

    def __init__(self, config):
        import uvicorn

        from imat.serve import create_app

        self.app = create_app(config)
        self.state = self.app.state.imat
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
        assert not self.thread.is_alive(), "server thread did not stop"


@pytest.fixture()
def start_server(serve_env):
    """start_server(index_dir, **ServeConfig options) -> a running ThreadServer (stopped after the test)."""
    from imat.serve import ServeConfig

    servers = []

    def start(index_dir, **options):
        options.setdefault("decode_threads", 2)
        config = ServeConfig(model=serve_env["model"], index=index_dir, **options)
        server = ThreadServer(config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.close()


def photo_bytes(path) -> bytes:
    return pathlib.Path(path).read_bytes()
