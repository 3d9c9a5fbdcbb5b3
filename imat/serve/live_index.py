"""LiveIndex: the served GalleryIndex, changed while it is searched, and nothing acknowledged lost.

Durability (journal + snapshot): an add or delete is appended to the journal and fsynced
*before* it is applied and acknowledged; on start the journal entries newer than the index
folder's `journal_seq` are replayed. Every `snapshot_every` entries (and at shutdown) the
index is folded into the index folder: a copy taken under the lock is saved through the
atomic folder swap (imat.engine.index_dir) while searches go on, with `journal_seq` in its
sidecar, and the folded entries are then dropped from the journal. A kill -9 at any point
leaves the old folder or the new one plus a journal that covers the difference.

Consistency: one lock guards the GalleryIndex; a search holds it for the FAISS search and
the record building (milliseconds), a write for applying the change, so every search sees
the index before or after a write, never half of one. Writers are serialised by a second
lock (journal order = apply order) and do their fsync outside the search lock.

Thumbnails: items of the index folder are thumbnailed from their own `path` (from the
index, never from a request); items added over HTTP keep a JPEG thumbnail in
`state_dir/thumbs/`, named by the sha256 of the id (a client's id never becomes a path).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import pathlib
import threading
from typing import Sequence

import numpy as np

from imat.engine.search import search_records
from imat.errors import DataError, IndexFileError
from imat.fileio import atomic_write_bytes, dir_lock
from imat.serve.journal import Journal, decode_vector, encode_vector
from imat.serve.metrics import ServeMetrics

logger = logging.getLogger(__name__)

JOURNAL_FILE = "journal.jsonl"
THUMBS_DIR = "thumbs"
THUMB_CACHE = 512


def thumbnail_jpeg(source, size: int) -> bytes:
    """A square JPEG thumbnail of an image (path or bytes), through the one decoder (bomb guard included)."""
    from PIL import Image

    from imat.data_tools.images import decode_image

    pixels = decode_image(source, size, "center_crop")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


class LiveIndex:
    def __init__(self, engine, index_dir: pathlib.Path, state_dir: pathlib.Path, *, snapshot_every: int = 100,
                 thumbnail_px: int = 160, metrics: ServeMetrics | None = None):
        self.engine = engine
        self.index_dir = pathlib.Path(index_dir)
        self.state_dir = pathlib.Path(state_dir)
        self.snapshot_every = snapshot_every
        self.thumbnail_px = thumbnail_px
        self.metrics = metrics or ServeMetrics()
        self._stack = contextlib.ExitStack()
        # Held for the server's lifetime: a second server on the same index gets an error at once.
        self._stack.enter_context(dir_lock(self.state_dir, error=IndexFileError, option="--state-dir"))
        try:
            self.gallery = engine.load_index(self.index_dir)  # before creating anything: a bad --index leaves no trace
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.state_dir / THUMBS_DIR).mkdir(exist_ok=True)
            self.journal = Journal(self.state_dir / JOURNAL_FILE, int(self.gallery.meta.get("journal_seq", 0)))
            self._stack.callback(self.journal.close)
        except BaseException:
            self._stack.close()
            raise
        self._lock = threading.Lock()  # the GalleryIndex
        self._write_lock = threading.Lock()  # journal order = apply order
        self._snapshot_lock = threading.Lock()
        self._thumb_cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._thumb_lock = threading.Lock()
        replayed = self._replay()
        if replayed:
            self.snapshot()

    # ------------------------------------------------------------ start: replay

    def _replay(self) -> int:
        folded = int(self.gallery.meta.get("journal_seq", 0))
        todo = [e for e in self.journal.entries() if e["seq"] > folded]
        for entry in todo:
            self._apply(entry, where=f"{self.journal.path} seq {entry['seq']}")
        if todo:
            logger.info("replayed %d journal entries (seq %d..%d) onto %s", len(todo), todo[0]["seq"],
                        todo[-1]["seq"], self.index_dir)
        return len(todo)

    def _apply(self, entry: dict, where: str = "") -> None:
        if entry["op"] == "upsert":
            vector = decode_vector(entry["vector"], self.gallery.dim, where)
            item = {"id": entry["id"], "path": None, "categories": list(entry["categories"])}
            self.gallery.upsert(vector[None, :], [item])
        else:
            self.gallery.remove([entry["id"]], missing_ok=True)

    # ------------------------------------------------------------ reads

    @property
    def count(self) -> int:
        return self.gallery.live_count

    def search(self, queries: Sequence[str], embeddings: np.ndarray, ok_indices: np.ndarray, errors, k: int, *,
               probabilities: np.ndarray | None, categories: Sequence[str] | None, match: str) -> list[dict]:
        with self._lock:
            return search_records(self.gallery, queries, embeddings, ok_indices, errors, k,
                                  category_names=self.engine.metadata.category_names, probabilities=probabilities,
                                  categories=categories, match=match)

    def get(self, item_id: str) -> dict | None:
        with self._lock:
            return self.gallery.get(item_id)

    def category_names(self) -> list[str]:
        """Category names that some item in the index has."""
        with self._lock:
            return self.gallery.category_names()

    def thumbnail(self, item_id: str) -> bytes | None:
        """JPEG bytes of the item's thumbnail, or None when the item is not in the index or has no image."""
        item = self.get(item_id)
        if item is None:
            return None
        stored = self._thumb_path(item_id)
        if item.get("path") is None:
            try:
                return stored.read_bytes()
            except FileNotFoundError:
                return None
        key = item["path"]
        with self._thumb_lock:
            if key in self._thumb_cache:
                self._thumb_cache.move_to_end(key)
                return self._thumb_cache[key]
        try:
            data = thumbnail_jpeg(pathlib.Path(item["path"]), self.thumbnail_px)
        except DataError as e:
            logger.warning("no thumbnail for %s: %s", item_id, e)
            return None
        with self._thumb_lock:
            self._thumb_cache[key] = data
            while len(self._thumb_cache) > THUMB_CACHE:
                self._thumb_cache.popitem(last=False)
        return data

    def _thumb_path(self, item_id: str) -> pathlib.Path:
        return self.state_dir / THUMBS_DIR / (hashlib.sha256(item_id.encode("utf-8")).hexdigest() + ".jpg")

    # ------------------------------------------------------------ writes

    def upsert(self, item_id: str, categories: list[str], vector: np.ndarray, thumbnail: bytes | None) -> bool:
        """Add or replace one item; durable when this returns. True when it replaced an item."""
        with self._write_lock:
            if thumbnail is not None:
                atomic_write_bytes(self._thumb_path(item_id), thumbnail)  # before the journal: never dangling
            entry = {"op": "upsert", "id": item_id, "categories": list(categories), "vector": encode_vector(vector)}
            entry["seq"] = self.journal.append(entry)
            with self._lock:
                replaced = bool(self.gallery.rows_of(item_id))
                self._apply(entry)
        self.metrics.writes.inc(op="upsert")
        self._maybe_snapshot()
        return replaced

    def delete(self, item_id: str) -> bool:
        """Remove one item; durable when this returns. False (nothing written) when it is not in the index."""
        with self._write_lock:
            with self._lock:
                if not self.gallery.rows_of(item_id):
                    return False
            entry = {"op": "delete", "id": item_id}
            entry["seq"] = self.journal.append(entry)
            with self._lock:
                self._apply(entry)
            self._thumb_path(item_id).unlink(missing_ok=True)
        self.metrics.writes.inc(op="delete")
        self._maybe_snapshot()
        return True

    # ------------------------------------------------------------ snapshots

    def _maybe_snapshot(self) -> None:
        if self.journal.pending >= self.snapshot_every and not self._snapshot_lock.locked():
            threading.Thread(target=self._snapshot_quietly, name="imat-snapshot", daemon=True).start()

    def _snapshot_quietly(self) -> None:
        try:
            self.snapshot()
        except Exception:  # noqa: BLE001 - the journal still holds every write; the next snapshot retries
            logger.exception("snapshot of %s failed; the journal keeps the writes", self.index_dir)

    def snapshot(self) -> bool:
        """Fold the journal into the index folder (atomic swap); False when there was nothing to fold."""
        with self._snapshot_lock:
            with self._write_lock, self._lock:
                if self.journal.pending == 0:
                    return False
                seq = self.journal.last_seq
                copy = self.gallery.copy()
            copy.meta["journal_seq"] = seq
            copy.save(self.index_dir)  # slow part, outside the locks: searches and writes go on
            with self._write_lock:
                with self._lock:
                    self.gallery._sidecar_sha256 = copy._sidecar_sha256
                    self.gallery.meta["journal_seq"] = seq
                self.journal.fold_through(seq)
            self.metrics.snapshots.inc()
            logger.info("snapshot: folded journal through seq %d into %s (%d items)", seq, self.index_dir,
                        copy.count)
            return True

    def close(self) -> None:
        try:
            self.snapshot()
        finally:
            self._stack.close()
