"""The index folder on disk: its three files, the sidecar's contents, writing, reading and checking them.

    index.faiss   faiss.write_index of a CPU index (GPU indexes are copied back before saving)
    index.json    sidecar {format_version, index_type, metric, dim, count, model_fingerprint,
                  model_architecture, created, imat_version, search_params, files?, ...}
    items.jsonl   one line per row id (row id = line number): {"id", "path"?, "categories"?}

`files` (optional, added after format 1 shipped, so older folders lack it) records
{"index.faiss": {"sha256", "bytes"}, "items.jsonl": {...}}; a load verifies both, so a
file changed after writing (a flipped byte inside the vectors) is an error, not silently
different rankings. Folders without it load with a debug log line.

Writing goes through imat.fileio.atomic_dir: the files are written into a temp folder
beside the target, which is swapped in under a lock on the target; an interrupted write
leaves the previous index loadable, and is repaired by the next load or write. A second
writer of the same folder gets an IndexFileError at once (it does not wait).

Loading validates everything a hand edit can break (types of the sidecar's fields, the
index type, each items.jsonl line) and raises IndexFileError naming the file, the field
and, for items.jsonl, the line.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
from typing import Any, Sequence

from imat import __version__
from imat.engine.faiss_build import apply_search_params, create_index, faiss_module
from imat.engine.index_choice import default_search_params, ivf_nlist_of
from imat.errors import ConfigError, IndexFileError
from imat.fileio import atomic_dir, repair_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
ITEMS_FILE = "items.jsonl"
CHECKED_FILES = (INDEX_FILE, ITEMS_FILE)  # the sidecar's "files" covers these (it cannot hash itself)
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
_STR_KEYS = ("index_type", "model_fingerprint", "model_architecture", "created", "imat_version")
# Optional keys the engine reads back, with the JSON types they must have.
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {
    "search_params": (dict,), "files": (dict,), "skipped": (int,), "labelled": (bool,),
    "updated": (str,), "image_size": (int,), "resize_mode": (str,), "model_objective": (str,),
    # the last `imat serve` journal entry folded into this folder (imat.serve.journal)
    "journal_seq": (int,),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_CHUNK = 1 << 20


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


def model_fields(metadata) -> dict:
    """The sidecar fields that name the model an index was built with (from its ModelMetadata).

    An embeddings folder's manifest records the same fields, so an index built from it says the same.
    """
    return {
        "model_fingerprint": metadata.fingerprint,
        "model_architecture": metadata.architecture,
        "model_objective": metadata.objective,
        "image_size": metadata.image_size,
        "resize_mode": metadata.resize_mode,
    }


# ---------------------------------------------------------------- writing


def _file_record(path: pathlib.Path) -> dict:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def _write_synced(path: pathlib.Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_index_dir(directory, index, meta: dict, items: Sequence[dict], *,
                    expect_sidecar_sha256: str | None = None) -> str:
    """Write the three files into a temp folder beside `directory`, then swap it in (under its lock).

    Records the checksums of index.faiss and items.jsonl in `meta["files"]` (the dict is updated).
    `expect_sidecar_sha256`: the sha256 of the index.json this index was loaded from; when the
    folder now holds another one (a concurrent Engine.add_to_index saved in between), nothing is
    written and IndexFileError says so, instead of silently dropping the other writer's rows.
    Returns the sha256 of the index.json written (what the next save of the same index expects).
    """
    faiss = faiss_module()
    directory = pathlib.Path(directory)
    if len(items) != index.ntotal:
        raise IndexFileError(f"{directory}: {len(items)} items for {index.ntotal} index rows (bug)")
    if directory.exists() and not directory.is_dir():
        raise IndexFileError(f"{directory}: exists and is not a directory; choose another --out")
    with atomic_dir(directory, error=IndexFileError, option="--out") as tmp:
        # Checked under the lock, after any interrupted swap was repaired.
        if directory.is_dir() and any(directory.iterdir()) and not (directory / SIDECAR_FILE).exists():
            # Never replace a folder that is not an index: it may hold the user's images.
            raise IndexFileError(
                f"{directory}: folder exists, is not empty and is not an imat index; choose another --out")
        if expect_sidecar_sha256 is not None:
            current = _sha256_or_none(directory / SIDECAR_FILE)
            if current != expect_sidecar_sha256:
                raise IndexFileError(
                    f"{directory}: changed on disk since this index was loaded (another imat process wrote it); "
                    "nothing was written: load it again and repeat the change")
        faiss.write_index(index, str(tmp / INDEX_FILE))
        _fsync_file(tmp / INDEX_FILE)
        items_bytes = b"".join((json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8") for item in items)
        _write_synced(tmp / ITEMS_FILE, items_bytes)
        meta["files"] = {INDEX_FILE: _file_record(tmp / INDEX_FILE),
                         ITEMS_FILE: {"sha256": hashlib.sha256(items_bytes).hexdigest(), "bytes": len(items_bytes)}}
        sidecar_bytes = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        _write_synced(tmp / SIDECAR_FILE, sidecar_bytes)
        for name in (INDEX_FILE, ITEMS_FILE, SIDECAR_FILE):
            os.chmod(tmp / name, 0o644)
    logger.info("wrote index %s (%d rows, %s)", directory, index.ntotal, meta.get("index_type"))
    return hashlib.sha256(sidecar_bytes).hexdigest()


def _sha256_or_none(path: pathlib.Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _fsync_file(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- reading and checking


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def validate_sidecar(meta: Any, path: pathlib.Path) -> dict:
    """The sidecar if every field has the right type and a supported value; IndexFileError naming the field."""
    def bad(field: str, what: str) -> IndexFileError:
        return IndexFileError(f"{path}: field {field!r} {what}; fix the file or rebuild the index")

    if not isinstance(meta, dict):
        raise IndexFileError(f"{path}: sidecar must be a JSON object; rebuild the index")
    missing = [k for k in SIDECAR_KEYS if k not in meta]
    if missing:
        raise IndexFileError(f"{path}: sidecar lacks {', '.join(missing)}; rebuild the index")
    if not _is_int(meta["format_version"]) or meta["format_version"] != FORMAT_VERSION:
        raise IndexFileError(
            f"{path}: format_version {meta['format_version']!r} is not supported "
            f"(this imat reads {FORMAT_VERSION}); rebuild the index"
        )
    if meta["metric"] != METRIC:
        raise IndexFileError(f"{path}: metric {meta['metric']!r} is not {METRIC!r}")
    for key in _STR_KEYS:
        if not isinstance(meta[key], str) or not meta[key]:
            raise bad(key, f"is {_type_name(meta[key])} ({meta[key]!r}), expected a non-empty string")
    if not _is_int(meta["dim"]) or meta["dim"] < 1:
        raise bad("dim", f"is {meta['dim']!r}, expected a positive integer")
    if not _is_int(meta["count"]) or meta["count"] < 0:
        raise bad("count", f"is {meta['count']!r}, expected a non-negative integer")
    for key, types in _OPTIONAL_TYPES.items():
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise bad(key, f"is {_type_name(value)} ({value!r}), expected {_type_name(types[0]())}")
    for name, value in (meta.get("search_params") or {}).items():
        if not _is_int(value) or value < 1:
            raise bad(f"search_params.{name}", f"is {value!r}, expected a positive integer")
    for name, record in (meta.get("files") or {}).items():
        if name not in CHECKED_FILES:
            raise bad(f"files.{name}", f"names no file of an index folder (expected {', '.join(CHECKED_FILES)})")
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) \
                or not _SHA256.fullmatch(record["sha256"]) or not _is_int(record.get("bytes")):
            raise bad(f"files.{name}", f"is {record!r}, expected {{\"sha256\": 64 hex digits, \"bytes\": integer}}")
    oversized = _oversized_part(meta["index_type"], meta["count"])
    if oversized:
        raise bad("index_type", f"is {meta['index_type']!r}: {oversized}")
    try:
        create_index(meta["dim"], meta["index_type"])  # an empty index: cheap, and FAISS is the judge
    except ConfigError:
        raise bad("index_type", f"is {meta['index_type']!r}, not a FAISS index type for dimension {meta['dim']}") \
            from None
    return meta


def _oversized_part(index_type: str, count: int) -> str | None:
    """Why an index type could not have been built by imat for `count` rows (sizes FAISS would allocate
    up front when creating it empty: inverted lists, PQ codebooks), or None."""
    if len(index_type) > 200:
        return "longer than any index type imat builds"
    nlist = ivf_nlist_of(index_type)
    if nlist is not None and nlist > max(1, count):
        return f"{nlist} inverted lists for {count} rows (building needs at least one row per list)"
    for bits in re.findall(r"PQ\d+x(\d+)", index_type):
        if int(bits) > 16:
            return f"{bits}-bit PQ codes (imat builds 4 or 8)"
    for m in re.findall(r"HNSW(\d+)", index_type):
        if int(m) > 1024:
            return f"HNSW with {m} links per node"
    return None


def _verify_file(path: pathlib.Path, record: dict | None, sidecar: pathlib.Path, data: bytes | None = None) -> None:
    """Check a file's size and sha256 against the sidecar's record of them."""
    if record is None:
        raise IndexFileError(f"{sidecar}: field 'files' has no checksum of {path.name}; rebuild the index")
    actual = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} if data is not None \
        else _file_record(path)
    if actual["bytes"] != record["bytes"]:
        raise IndexFileError(f"{path}: {actual['bytes']} bytes, but {sidecar.name} recorded {record['bytes']}: "
                             "the file was changed or truncated after it was written; rebuild the index")
    if actual["sha256"] != record["sha256"]:
        raise IndexFileError(f"{path}: sha256 {actual['sha256'][:16]}... differs from {record['sha256'][:16]}... "
                             f"recorded in {sidecar.name}: the file was changed or corrupted after it was "
                             "written; rebuild the index")


def _parse_items(data: bytes, path: pathlib.Path) -> list[dict]:
    items: list[dict] = []
    for line_no, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise IndexFileError(f"{where}: not UTF-8 text; rebuild the index") from None
        except json.JSONDecodeError:
            raise IndexFileError(f"{where}: not valid JSON; rebuild the index") from None
        if not isinstance(item, dict):
            raise IndexFileError(f"{where}: is {_type_name(item)}, expected an object with an 'id'; rebuild the index")
        if not isinstance(item.get("id"), str):
            what = "is missing" if "id" not in item else f"is {_type_name(item['id'])} ({item['id']!r})"
            raise IndexFileError(f"{where}: field 'id' {what}, expected a string; rebuild the index")
        if item.get("path") is not None and not isinstance(item["path"], str):
            raise IndexFileError(f"{where}: field 'path' is {_type_name(item['path'])} ({item['path']!r}), "
                                 "expected a string or null; rebuild the index")
        if "categories" in item:
            cats = item["categories"]
            if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
                raise IndexFileError(f"{where}: field 'categories' is {cats!r}, expected a list of category "
                                     "names; rebuild the index")
        items.append(item)
    return items


def read_index_dir(directory) -> tuple[object, dict, list[dict], str]:
    """(FAISS index, sidecar, items, sha256 of index.json) of an index folder.

    IndexFileError names the folder/file (and field, line) and what is wrong.
    """
    faiss = faiss_module()
    directory = pathlib.Path(directory)
    repair_dir(directory, error=IndexFileError)
    if not directory.is_dir():
        leftovers = sorted(directory.parent.glob(f".{directory.name}.old-*")) if directory.parent.is_dir() else []
        hint = f" (an interrupted write left {leftovers[0]}; rename it to {directory.name})" if leftovers else ""
        raise IndexFileError(f"{directory}: index folder not found{hint}; build one with `imat index`")
    for name in (INDEX_FILE, SIDECAR_FILE, ITEMS_FILE):
        if not (directory / name).is_file():
            raise IndexFileError(f"{directory / name}: missing; the folder is not a complete imat index, rebuild it")
    sidecar = directory / SIDECAR_FILE
    try:
        sidecar_bytes = sidecar.read_bytes()
        meta = json.loads(sidecar_bytes.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{sidecar}: unreadable sidecar ({e}); rebuild the index") from None
    meta = validate_sidecar(meta, sidecar)
    files = meta.get("files")
    if files is None:
        logger.debug("%s: written before index folders recorded checksums; files not verified", sidecar)
    else:
        # Before FAISS parses it: a tampered index.faiss is refused without being read.
        _verify_file(directory / INDEX_FILE, files.get(INDEX_FILE), sidecar)
    try:
        index = faiss.read_index(str(directory / INDEX_FILE))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise IndexFileError(f"{directory / INDEX_FILE}: not a readable FAISS index ({first}); rebuild it") from None
    try:
        items_bytes = (directory / ITEMS_FILE).read_bytes()
    except OSError as e:
        raise IndexFileError(f"{directory / ITEMS_FILE}: unreadable ({e}); rebuild the index") from None
    items = _parse_items(items_bytes, directory / ITEMS_FILE)
    if not (index.ntotal == meta["count"] == len(items)):
        raise IndexFileError(
            f"{directory}: counts disagree (index.faiss {index.ntotal} rows, index.json 'count' {meta['count']}, "
            f"items.jsonl {len(items)} items); the index is inconsistent, rebuild it"
        )
    if index.d != meta["dim"]:
        raise IndexFileError(f"{directory}: index.faiss has dimension {index.d}, index.json 'dim' says {meta['dim']}")
    if files is not None:
        # After the checks above, which name the field or line a hand edit broke; this catches the rest.
        _verify_file(directory / ITEMS_FILE, files.get(ITEMS_FILE), sidecar, items_bytes)
    apply_search_params(index, meta.get("search_params") or {})
    return index, meta, items, hashlib.sha256(sidecar_bytes).hexdigest()
