"""Atomic file writes: every file imat writes goes to a temp file beside its target and is renamed.

A reader (or a run killed mid-write) therefore sees the old file or the new one,
never half of one. Light on purpose: the engine imports it too.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path, *, mode: int = 0o644) -> Iterator[pathlib.Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error removed.

    For writers that want a file name (onnx.save_model, savefig, faiss.write_index).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the rename makes it visible
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are ordinary shareable files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path, text: str) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
