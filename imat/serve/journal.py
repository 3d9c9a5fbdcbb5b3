"""The write journal: one JSON line per acknowledged add or delete, fsynced before the reply.

    {"seq": 7, "op": "upsert", "id": "...", "categories": [...], "vector": "<base64 float32 LE>"}
    {"seq": 8, "op": "delete", "id": "..."}

Every operation sets the whole state of one id (last writer wins), so replaying a suffix
of the journal over an index that already holds some of it gives the same final state;
the index folder's sidecar records `journal_seq`, the last entry folded into it, and only
later entries are replayed. A torn last line (the process died while writing it, so it was
never acknowledged) is dropped with a warning; a bad line anywhere else is an
IndexFileError naming the line.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pathlib

import numpy as np

from imat.errors import IndexFileError
from imat.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

OPS = ("upsert", "delete")


def encode_vector(vector: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int, where: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise IndexFileError(f"{where}: field 'vector' is not base64") from None
    if len(raw) != 4 * dim:
        raise IndexFileError(f"{where}: field 'vector' has {len(raw) // 4} floats, the index has dimension {dim}")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _check_entry(entry, where: str) -> dict:
    if not isinstance(entry, dict) or entry.get("op") not in OPS or not isinstance(entry.get("id"), str) \
            or not isinstance(entry.get("seq"), int):
        raise IndexFileError(f"{where}: not a journal entry (needs integer 'seq', 'op' in {OPS}, string 'id'); "
                             "move the journal aside to start from the index folder alone")
    if entry["op"] == "upsert" and (not isinstance(entry.get("categories"), list)
                                    or not isinstance(entry.get("vector"), str)):
        raise IndexFileError(f"{where}: upsert entry lacks 'categories' (list) or 'vector' (base64)")
    return entry


def read_journal(path: pathlib.Path) -> list[dict]:
    """The journal's entries in order ([] when there is no journal)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    entries = []
    for line_no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            entry = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if line_no == len(lines) and not data.endswith(b"\n"):
                logger.warning("%s: dropping a torn last line (written when the server died; never acknowledged)",
                               where)
                break
            raise IndexFileError(f"{where}: not valid JSON; move the journal aside to start from the index folder "
                                 "alone") from None
        entries.append(_check_entry(entry, where))
    return entries


class Journal:
    """Append-only, fsynced; `fold_through(seq)` drops entries folded into a snapshot."""

    def __init__(self, path: pathlib.Path, folded_seq: int = 0):
        """folded_seq: the last seq already in the index folder; new entries continue after it even
        when the journal file is empty (else their seqs would look folded already)."""
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries = read_journal(self.path)
        self.last_seq = max(entries[-1]["seq"] if entries else 0, int(folded_seq))
        self.pending = len(entries)
        if entries:
            # Rewrite without a torn tail, so new lines start on a line of their own.
            self._rewrite(entries)
        self._file = open(self.path, "ab")
        self._sync_dir()

    def entries(self) -> list[dict]:
        return read_journal(self.path)

    def append(self, entry: dict) -> int:
        """Write one entry, fsync it, and return its seq (the write is durable when this returns)."""
        seq = self.last_seq + 1
        line = json.dumps({"seq": seq, **entry}, ensure_ascii=False, separators=(",", ":")) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_seq = seq
        self.pending += 1
        return seq

    def fold_through(self, seq: int) -> None:
        """Drop the entries with seq <= `seq` (they are in the index folder now)."""
        keep = [e for e in read_journal(self.path) if e["seq"] > seq]
        self._file.close()
        self._rewrite(keep)
        self._file = open(self.path, "ab")
        self.pending = len(keep)

    def close(self) -> None:
        self._file.close()

    def _rewrite(self, entries: list[dict]) -> None:
        data = "".join(json.dumps(e, ensure_ascii=False, separators=(",", ":")) + "\n" for e in entries)
        atomic_write_bytes(self.path, data.encode("utf-8"))
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
