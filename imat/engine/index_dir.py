"""The index folder on disk: its three files, the sidecar's contents, writing and reading them.

    index.faiss   faiss.write_index of a CPU index (GPU indexes are copied back before saving)
    index.json    sidecar {format_version, index_type, metric, dim, count, model_fingerprint,
                  model_architecture, created, imat_version, search_params, ...}
    items.jsonl   one line per row id (row id = line number): {"id", "path", "categories"?}

All three are written into a temporary folder beside the target, which is then
swapped in (old renamed away, new renamed in, old deleted): an interrupted
write leaves the previous index intact and loadable.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Sequence

from imat import __version__
from imat.engine.faiss_build import apply_search_params, faiss_module
from imat.engine.index_choice import default_search_params
from imat.errors import IndexFileError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
ITEMS_FILE = "items.jsonl"
METRIC = "inner_product"
SIDECAR_KEYS = (
    "format_version",
    "index_type",
    "metric",
    "dim",
    "count",
    "model_fingerprint",
    "model_architecture",
    "created",
    "imat_version",
)


def now() -> str:
    """The sidecar's timestamp format: UTC, ISO 8601, seconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make_sidecar(index_type: str, dim: int, count: int, *, model_fingerprint: str, model_architecture: str,
                 extra: dict | None = None) -> dict:
    meta = {
        "format_version": FORMAT_VERSION,
        "index_type": index_type,
        "metric": METRIC,
        "dim": dim,
        "count": count,
        "model_fingerprint": model_fingerprint,
        "model_architecture": model_architecture,
        "created": now(),
        "imat_version": __version__,
        "search_params": default_search_params(index_type),
    }
    meta.update(extra or {})
    return meta


def write_index_dir(directory, index, meta: dict, items: Sequence[dict]) -> pathlib.Path:
    """Write the three files into a temp folder beside `directory`, then swap it in."""
    faiss = faiss_module()
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IndexFileError(f"{directory}: exists and is not a directory; choose another --out")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / SIDECAR_FILE).exists():
        # Never replace a folder that is not an index: it may hold the user's images.
        raise IndexFileError(f"{directory}: folder exists, is not empty and is not an imat index; choose another --out")
    if len(items) != index.ntotal:
        raise IndexFileError(f"{directory}: {len(items)} items for {index.ntotal} index rows (bug)")
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an index is meant to be shared
        faiss.write_index(index, str(tmp / INDEX_FILE))
        with open(tmp / ITEMS_FILE, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(tmp / SIDECAR_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        for name in (INDEX_FILE, ITEMS_FILE, SIDECAR_FILE):
            os.chmod(tmp / name, 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if directory.exists():
        old = parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
    try:
        os.rename(tmp, directory)
    except BaseException:
        if old is not None:
            os.rename(old, directory)  # put the previous index back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote index %s (%d rows, %s)", directory, index.ntotal, meta.get("index_type"))
    return directory


def read_index_dir(directory) -> tuple[object, dict, list[dict]]:
    """(FAISS index, sidecar, items) of an index folder; IndexFileError names the folder/file and what is wrong."""
    faiss = faiss_module()
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
        hint = f" (an interrupted write left {leftovers[0]}; rename it to {directory.name})" if leftovers else ""
        raise IndexFileError(f"{directory}: index folder not found{hint}; build one with `imat index`")
    for name in (INDEX_FILE, SIDECAR_FILE, ITEMS_FILE):
        if not (directory / name).is_file():
            raise IndexFileError(f"{directory / name}: missing; the folder is not a complete imat index, rebuild it")
    try:
        meta = json.loads((directory / SIDECAR_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{directory / SIDECAR_FILE}: unreadable sidecar ({e}); rebuild the index") from None
    if not isinstance(meta, dict):
        raise IndexFileError(f"{directory / SIDECAR_FILE}: sidecar must be a JSON object; rebuild the index")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise IndexFileError(f"{directory / SIDECAR_FILE}: sidecar lacks {', '.join(missing)}; rebuild the index")
    if meta["format_version"] != FORMAT_VERSION:
        raise IndexFileError(
            f"{directory / SIDECAR_FILE}: format_version {meta['format_version']} is not supported "
            f"(this imat reads {FORMAT_VERSION}); rebuild the index"
        )
    if meta["metric"] != METRIC:
        raise IndexFileError(f"{directory / SIDECAR_FILE}: metric {meta['metric']!r} is not {METRIC!r}")
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise IndexFileError(f"{directory / INDEX_FILE}: not a readable FAISS index ({first}); rebuild it") from None
    items: list[dict] = []
    with open(directory / ITEMS_FILE, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise IndexFileError(f"{directory / ITEMS_FILE}:{line_no}: not valid JSON; rebuild the index") from None
            if not isinstance(item, dict) or "id" not in item:
                raise IndexFileError(f"{directory / ITEMS_FILE}:{line_no}: expected an object with an 'id'")
            items.append(item)
    if not (index.ntotal == meta["count"] == len(items)):
        raise IndexFileError(
            f"{directory}: counts disagree (index.faiss {index.ntotal}, index.json {meta['count']}, "
            f"items.jsonl {len(items)}); the index is inconsistent, rebuild it"
        )
    if index.d != meta["dim"]:
        raise IndexFileError(f"{directory}: index.faiss has dimension {index.d}, index.json says {meta['dim']}")
    apply_search_params(index, meta.get("search_params") or {})
    return index, meta, items
