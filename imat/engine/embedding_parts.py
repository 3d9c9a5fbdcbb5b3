"""The embeddings folder: what `imat embed` writes (one process or Ray) and `imat index --from-embeddings` reads.

    EMB_DIR/
      manifest.json                 what the folder holds (below); rewritten (temp + rename) after each part
      embeddings/part-NNNNN.npy     float32 [embedded, D]: the part's embedded items, in row order
      metadata/part-NNNNN.parquet   one row per input item of the part, embedded or not:
                                      row             int64   position in the input list (0-based, global)
                                      id              string  item id (Kaggle image id, else the file stem)
                                      path            string  readable path (imat.engine.records)
                                      path_bytes_b64  string  exact bytes of a name that is not UTF-8, else null
                                      categories      list<string>  category names; null when the input is unlabelled
                                      error           string  null when embedded, else why the item was skipped
                                      embedding_row   int64   its row in the part's .npy; null when skipped

Part k holds input rows [k * part_size, (k + 1) * part_size). The manifest:

    {"format_version": 1, "kind": "imat-embeddings", "imat_version", "created", "updated",
     "model": {model_fingerprint, model_architecture, model_objective, image_size, resize_mode},
     "dim": D, "part_size": P, "inputs": {"count": N, "labelled": bool, "sha256": of the input records},
     "parts": [{"part": k, "first_row", "rows", "embedded", "errors",
                "files": {"embeddings/part-NNNNN.npy": {"bytes"}, "metadata/part-NNNNN.parquet": {"bytes"}}}],
     "counts": {"parts", "parts_complete", "items", "embedded", "errors"}, "complete": bool}

`parts` lists complete parts only. Writing a part: its .npy, then its .parquet (each temp + rename),
then the manifest (temp + rename), so a process killed at any moment (kill -9) leaves every listed
part whole and loses at most the parts it was writing. Reopening the folder (`open_for_writing`)
checks each listed part (files present, sizes and row counts as recorded): those are skipped; a part
with files but no valid entry is partial and redone; the rest are new. The input list, the model and
the part size must be the ones the folder was started with (same parts, same rows), else ConfigError.
One writer at a time (a lock beside the folder, as for index folders).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from imat import __version__
from imat.engine.index_dir import now
from imat.engine.parquet_io import pyarrow_modules, write_table
from imat.errors import ConfigError, DataError
from imat.fileio import atomic_path, atomic_write_text, dir_lock

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "imat-embeddings"
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_DIR = "embeddings"
METADATA_DIR = "metadata"
DEFAULT_PART_SIZE = 10_000  # as clip-retrieval: a kill loses at most this many images per part in flight
MODEL_KEYS = ("model_fingerprint", "model_architecture", "model_objective", "image_size", "resize_mode")
COLUMNS = ("row", "id", "path", "path_bytes_b64", "categories", "error", "embedding_row")


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def part_files(part: int) -> tuple[str, str]:
    """(embeddings file, metadata file) of a part, relative to the folder."""
    name = part_name(part)
    return f"{EMBEDDINGS_DIR}/{name}.npy", f"{METADATA_DIR}/{name}.parquet"


def records_sha256(records: Sequence[Mapping]) -> str:
    """Identity of an input list (ids, paths, labels, in order): a rerun must see the same one."""
    h = hashlib.sha256()
    for record in records:
        h.update(json.dumps(record, sort_keys=True, ensure_ascii=True).encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()


def _schema():
    pa, _ = pyarrow_modules()
    return pa.schema([
        ("row", pa.int64()), ("id", pa.string()), ("path", pa.string()), ("path_bytes_b64", pa.string()),
        ("categories", pa.list_(pa.string())), ("error", pa.string()), ("embedding_row", pa.int64()),
    ])


@dataclasses.dataclass(frozen=True)
class PartPlan:
    """One part still to embed: input rows [start, stop); status "new" or "partial" (files of a killed run)."""

    index: int
    start: int
    stop: int
    status: str = "new"

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class PartOutput:
    """A part's embeddings (float32[M, D], rows in input order) and its skipped items {position in part: why}."""

    index: int
    embeddings: np.ndarray
    errors: Mapping[int, str]


# ---------------------------------------------------------------- checking parts on disk


def _npy_shape(path: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
    array = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header only
    return array.shape, array.dtype


def _parquet_rows(path: pathlib.Path) -> int:
    _, pq = pyarrow_modules()
    return pq.ParquetFile(str(path)).metadata.num_rows


def part_problem(directory: pathlib.Path, entry: Mapping, dim: int) -> str | None:
    """Why a manifest entry's part is not whole on disk (missing file, other size or row count), or None."""
    npy, parquet = part_files(int(entry["part"]))
    for rel in (npy, parquet):
        path = directory / rel
        recorded = (entry.get("files") or {}).get(rel, {}).get("bytes")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path} is missing"
        if size != recorded:
            return f"{path} has {size} bytes, the manifest recorded {recorded}"
    try:
        shape, dtype = _npy_shape(directory / npy)
        rows = _parquet_rows(directory / parquet)
    except Exception as e:  # noqa: BLE001 - numpy and pyarrow raise many types for a damaged file
        return f"part {entry['part']} is unreadable ({type(e).__name__}: {e})"
    if dtype != np.float32 or shape != (entry["embedded"], dim):
        return f"{directory / npy} is {dtype} {shape}, the manifest says float32 ({entry['embedded']}, {dim})"
    if rows != entry["rows"]:
        return f"{directory / parquet} has {rows} rows, the manifest says {entry['rows']}"
    return None


# ---------------------------------------------------------------- the manifest


def _read_manifest(directory: pathlib.Path) -> dict:
    path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); remove the folder and embed again") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise DataError(f"{path}: not an imat embeddings manifest (no \"kind\": \"{KIND}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {manifest.get('format_version')!r} is not supported "
                        f"(this imat reads {FORMAT_VERSION}); embed again with this imat")
    for key, kind in (("dim", int), ("part_size", int), ("model", dict), ("inputs", dict), ("parts", list)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise DataError(f"{path}: field {key!r} is {manifest.get(key)!r}, expected {kind.__name__}")
    for key in MODEL_KEYS:
        if key not in manifest["model"]:
            raise DataError(f"{path}: field 'model' lacks {key!r}")
    for entry in manifest["parts"]:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), int)
                                                  for k in ("part", "first_row", "rows", "embedded", "errors")):
            raise DataError(f"{path}: part entry {entry!r} lacks part, first_row, rows, embedded or errors")
    return manifest


def _counts(manifest: dict) -> dict:
    parts = manifest["parts"]
    total_parts = -(-manifest["inputs"]["count"] // manifest["part_size"])
    return {"parts": total_parts, "parts_complete": len(parts), "items": manifest["inputs"]["count"],
            "embedded": sum(p["embedded"] for p in parts), "errors": sum(p["errors"] for p in parts)}


def _write_manifest(directory: pathlib.Path, manifest: dict) -> None:
    manifest["parts"].sort(key=lambda p: p["part"])
    manifest["counts"] = _counts(manifest)
    manifest["complete"] = manifest["counts"]["parts_complete"] == manifest["counts"]["parts"]
    manifest["updated"] = now()
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


# ---------------------------------------------------------------- writing


class EmbeddingDirWriter:
    """An embeddings folder open for writing (its lock held): which parts are pending, and `write_part`."""

    def __init__(self, directory: pathlib.Path, manifest: dict, records: Sequence[Mapping],
                 skipped: list[int], pending: list[PartPlan]):
        self.directory = directory
        self.manifest = manifest
        self.records = records
        self.skipped = skipped  # complete parts found on disk
        self.pending = pending

    @property
    def part_size(self) -> int:
        return self.manifest["part_size"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def resume_note(self) -> str | None:
        """What a rerun found ("resuming ...: 3 of 8 parts complete, skipped; redoing partial part 3"), or None."""
        partial = [p.index for p in self.pending if p.status == "partial"]
        if not self.skipped and not partial:
            return None
        total = self.manifest["counts"]["parts"]
        note = f"resuming {self.directory}: {len(self.skipped)} of {total} parts complete, skipped"
        if partial:
            note += f"; redoing partial part{'s' if len(partial) > 1 else ''} {', '.join(map(str, partial))}"
        left = len(self.pending) - len(partial)
        return note + (f"; {left} new part{'s' if left != 1 else ''}" if left else "")

    def write_part(self, output: PartOutput) -> dict:
        """Write one part (npy, then parquet, then the manifest entry); returns its manifest entry."""
        part = output.index
        start = part * self.part_size
        stop = min(start + self.part_size, self.manifest["inputs"]["count"])
        if not 0 <= start < stop:
            raise ValueError(f"part {part} is outside the input ({self.manifest['inputs']['count']} items)")
        errors = {int(k): str(v) for k, v in output.errors.items()}
        if any(not 0 <= k < stop - start for k in errors):
            raise ValueError(f"part {part}: error positions {sorted(errors)} outside its {stop - start} rows")
        vectors = np.ascontiguousarray(output.embeddings, dtype=np.float32)
        expected = (stop - start - len(errors), self.dim)
        if vectors.shape != expected:
            raise ValueError(f"part {part}: embeddings {vectors.shape}, expected {expected}")
        npy, parquet = part_files(part)
        with atomic_path(self.directory / npy) as tmp, open(tmp, "wb") as f:
            np.save(f, vectors, allow_pickle=False)
        write_table(self._metadata_table(start, stop, errors), self.directory / parquet)
        entry = {"part": part, "first_row": start, "rows": stop - start, "embedded": expected[0],
                 "errors": len(errors),
                 "files": {rel: {"bytes": (self.directory / rel).stat().st_size} for rel in (npy, parquet)}}
        self.manifest["parts"] = [p for p in self.manifest["parts"] if p["part"] != part] + [entry]
        _write_manifest(self.directory, self.manifest)
        return entry

    def _metadata_table(self, start: int, stop: int, errors: Mapping[int, str]):
        pa, _ = pyarrow_modules()
        labelled = self.manifest["inputs"]["labelled"]
        columns: dict[str, list] = {name: [] for name in COLUMNS}
        next_vector = 0
        for pos, record in enumerate(self.records[start:stop]):
            columns["row"].append(start + pos)
            columns["id"].append(record["id"])
            columns["path"].append(record.get("path"))
            columns["path_bytes_b64"].append(record.get("path_bytes_b64"))
            columns["categories"].append(list(record.get("categories", ())) if labelled else None)
            columns["error"].append(errors.get(pos))
            columns["embedding_row"].append(None if pos in errors else next_vector)
            next_vector += pos not in errors
        return pa.Table.from_pydict(columns, schema=_schema())


def _new_manifest(model: Mapping, dim: int, part_size: int, inputs: dict) -> dict:
    return {"format_version": FORMAT_VERSION, "kind": KIND, "imat_version": __version__, "created": now(),
            "model": {k: model[k] for k in MODEL_KEYS}, "dim": dim, "part_size": part_size, "inputs": inputs,
            "parts": []}


def _check_same_run(directory: pathlib.Path, manifest: dict, model: Mapping, dim: int, part_size: int | None,
                    inputs: dict) -> None:
    path = directory / MANIFEST_FILE
    if manifest["model"]["model_fingerprint"] != model["model_fingerprint"] or manifest["dim"] != dim:
        raise ConfigError(
            f"{path}: these embeddings were made by another model (architecture "
            f"{manifest['model']['model_architecture']}, fingerprint {manifest['model']['model_fingerprint'][:12]}, "
            f"dim {manifest['dim']}); use that model to resume, or choose another --out")
    if part_size is not None and part_size != manifest["part_size"]:
        raise ConfigError(f"{path}: started with --part-size {manifest['part_size']}, not {part_size}; "
                          f"rerun with --part-size {manifest['part_size']} (or leave it out) to resume")
    if manifest["inputs"].get("sha256") != inputs["sha256"]:
        raise ConfigError(
            f"{path}: started for another input list ({manifest['inputs'].get('count')} items then, "
            f"{inputs['count']} now, or other files, ids or labels); resuming would mix two inputs: "
            "choose another --out, or remove this folder to start again")


def _remove_temp_files(directory: pathlib.Path) -> None:
    # atomic_path's temp files (".part-00003.npy.XXXX.tmp") of a killed run: never complete, never read.
    for sub in (EMBEDDINGS_DIR, METADATA_DIR):
        for tmp in (directory / sub).glob(".part-*.tmp"):
            logger.info("removing %s, left by an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def _plan(directory: pathlib.Path, manifest: dict) -> tuple[list[int], list[PartPlan], bool]:
    """(complete parts, pending parts, whether the manifest dropped an entry that failed its check)."""
    count, size = manifest["inputs"]["count"], manifest["part_size"]
    listed = {p["part"]: p for p in manifest["parts"]}
    complete, pending, kept = [], [], []
    for part in range(-(-count // size)):
        entry = listed.get(part)
        problem = part_problem(directory, entry, manifest["dim"]) if entry is not None else "not written"
        if problem is None:
            complete.append(part)
            kept.append(entry)
            continue
        has_files = any((directory / rel).exists() for rel in part_files(part))
        if entry is not None:
            logger.warning("part %d must be redone: %s", part, problem)
        start = part * size
        pending.append(PartPlan(part, start, min(start + size, count),
                                "partial" if has_files or entry is not None else "new"))
    changed = len(kept) != len(manifest["parts"])
    manifest["parts"] = kept
    return complete, pending, changed


@contextlib.contextmanager
def open_for_writing(directory, records: Sequence[Mapping], *, model: Mapping, dim: int,
                     part_size: int | None = None, labelled: bool = False) -> Iterator[EmbeddingDirWriter]:
    """Open (or start) an embeddings folder for `records` (item records: id, path, categories?), locked.

    `model`: the index_dir.model_fields of the model; `part_size`: None = the folder's own (or the default).
    """
    directory = pathlib.Path(directory)
    if part_size is not None and part_size < 1:
        raise ConfigError(f"--part-size must be >= 1, got {part_size}")
    if not records:
        raise DataError(f"no images to embed into {directory}")
    inputs = {"count": len(records), "labelled": bool(labelled), "sha256": records_sha256(records)}
    with dir_lock(directory, error=ConfigError, option="--out"):
        manifest_path = directory / MANIFEST_FILE
        if manifest_path.exists():
            manifest = _read_manifest(directory)
            _check_same_run(directory, manifest, model, dim, part_size, inputs)
        else:
            if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
                raise ConfigError(f"--out {directory}: exists and is not an imat embeddings folder (no "
                                  f"{MANIFEST_FILE}); choose a new or empty folder")
            manifest = _new_manifest(model, dim, part_size or DEFAULT_PART_SIZE, inputs)
            _write_manifest(directory, manifest)  # first: a folder with anything in it has its manifest
        for sub in (EMBEDDINGS_DIR, METADATA_DIR):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        _remove_temp_files(directory)
        complete, pending, changed = _plan(directory, manifest)
        if changed:
            _write_manifest(directory, manifest)
        else:
            manifest["counts"] = _counts(manifest)
        writer = EmbeddingDirWriter(directory, manifest, records, complete, pending)
        note = writer.resume_note()
        if note:
            logger.info("%s", note)
        yield writer


# ---------------------------------------------------------------- reading


@dataclasses.dataclass
class EmbeddingParts:
    """A complete embeddings folder, read: its manifest, and each part's vectors (memory-mapped) and metadata."""

    directory: pathlib.Path
    manifest: dict

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def count(self) -> int:
        """Embedded items (rows of all the .npy files together)."""
        return sum(p["embedded"] for p in self.manifest["parts"])

    @property
    def parts(self) -> list[dict]:
        return list(self.manifest["parts"])

    @property
    def labelled(self) -> bool:
        return bool(self.manifest["inputs"]["labelled"])

    @property
    def model(self) -> dict:
        return dict(self.manifest["model"])

    @property
    def skipped(self) -> int:
        return sum(p["errors"] for p in self.manifest["parts"])

    def vectors(self, entry: Mapping) -> np.ndarray:
        """float32[embedded, D] of a part, memory-mapped (read from disk as it is used)."""
        return np.load(self.directory / part_files(int(entry["part"]))[0], mmap_mode="r", allow_pickle=False)

    def metadata(self, entry: Mapping):
        """The part's metadata as a pyarrow Table (columns COLUMNS)."""
        _, pq = pyarrow_modules()
        return pq.read_table(str(self.directory / part_files(int(entry["part"]))[1]))

    def items(self) -> list[dict]:
        """items.jsonl records of the embedded rows, in order (row id in an index = position here)."""
        out: list[dict] = []
        for entry in self.parts:
            for row in self.metadata(entry).to_pylist():
                if row["error"] is not None:
                    continue
                item = {"id": row["id"], "path": row["path"]}
                if row["path_bytes_b64"] is not None:
                    item["path_bytes_b64"] = row["path_bytes_b64"]
                if self.labelled:
                    item["categories"] = list(row["categories"] or [])
                out.append(item)
        return out

    def errors(self) -> list[dict]:
        """{row, id, path, error} of each item that was skipped."""
        return [{k: row[k] for k in ("row", "id", "path", "error")}
                for entry in self.parts for row in self.metadata(entry).to_pylist() if row["error"] is not None]


def read_embedding_dir(directory, *, require_complete: bool = True) -> EmbeddingParts:
    """Open an embeddings folder for reading; DataError naming the file when it is incomplete or damaged."""
    directory = pathlib.Path(directory)
    if not (directory / MANIFEST_FILE).is_file():
        raise DataError(f"{directory}: not an embeddings folder (no {MANIFEST_FILE}); write one with `imat embed`")
    manifest = _read_manifest(directory)
    counts = _counts(manifest)
    if require_complete and counts["parts_complete"] != counts["parts"]:
        raise DataError(f"{directory}: incomplete, {counts['parts_complete']} of {counts['parts']} parts written; "
                        "rerun the same `imat embed` command to finish it")
    for entry in manifest["parts"]:
        problem = part_problem(directory, entry, manifest["dim"])
        if problem is not None:
            raise DataError(f"{problem}; rerun the same `imat embed` command to redo that part")
    manifest["counts"] = counts
    return EmbeddingParts(directory, manifest)
