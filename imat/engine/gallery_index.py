"""GalleryIndex: a FAISS index with its sidecar and item list, searched and edited in memory.

Row id = position in `items`. Building goes through imat.engine.faiss_build, the files
through imat.engine.index_dir, row edits through imat.engine.index_edit; this module ties
them together.

Live operations: `search(..., categories=[...], match="any"|"all")` returns only items having
any / all of the names (a FAISS ID selector, so Flat stays exact); `remove(ids)` and
`upsert(vectors, items)`. Flat and IVF rows are removed at once (later rows renumbered);
HNSW cannot remove, so its rows are tombstoned (excluded from every search) and the graph is
rebuilt from the kept vectors on `save` or when tombstones exceed TOMBSTONE_MAX_FRACTION.
A saved folder never holds tombstones, so the on-disk format is unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from imat.engine.faiss_build import (apply_search_params, as_matrix, build_faiss_index, faiss_module, gpu_worthwhile,
                                     to_gpu)
from imat.engine.index_choice import resolve_index_type
from imat.engine.index_dir import make_sidecar, now, read_index_dir, write_index_dir
from imat.engine.index_edit import family, rebuild_without, remove_rows, search_rows
from imat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MATCH_MODES = ("any", "all")
TOMBSTONE_MAX_FRACTION = 0.2  # beyond this share of dead rows an HNSW graph is rebuilt (search cost, memory)
FILTERED_EF_SEARCH_MAX = 4096  # HNSW efSearch cap when a selective filter asks for more candidates


@dataclasses.dataclass
class GalleryIndex:
    """A FAISS index plus its sidecar and item list; row id = position in `items`."""

    index: Any
    meta: dict
    items: list[dict]
    directory: pathlib.Path | None = None
    _searcher: Any = dataclasses.field(default=None, repr=False)
    # sha256 of directory/index.json as loaded or last saved: a save there checks nobody replaced it meanwhile
    _sidecar_sha256: str | None = dataclasses.field(default=None, repr=False)
    # bool[count] rows removed but still inside an index that cannot remove (HNSW); None when none
    _deleted: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _rows_by_id: dict | None = dataclasses.field(default=None, repr=False)
    _rows_by_category: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def count(self) -> int:
        """Rows in the FAISS index (= len(items)), tombstoned rows included."""
        return int(self.index.ntotal)

    @property
    def live_count(self) -> int:
        """Rows a search can return (count minus tombstones)."""
        return self.count - (int(self._deleted.sum()) if self._deleted is not None else 0)

    @property
    def tombstones(self) -> int:
        return self.count - self.live_count

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def index_type(self) -> str:
        return self.meta["index_type"]

    @property
    def search_params(self) -> dict[str, int]:
        return dict(self.meta.get("search_params") or {})

    @property
    def labelled(self) -> bool:
        return bool(self.items) and all("categories" in it for it in self.items)

    def _search_index(self):
        if self._searcher is None:
            self._searcher = self.index
            if gpu_worthwhile(self.index_type, self.count):
                try:
                    self._searcher = to_gpu(self.index)
                    apply_search_params(self._searcher, self.search_params)
                    logger.info("searching %s on %d GPU(s)", self.index_type, faiss_module().get_num_gpus())
                except Exception as e:  # noqa: BLE001
                    logger.warning("GPU FAISS unavailable (%s); searching on CPU", e)
                    self._searcher = self.index
        return self._searcher

    def search(self, queries: np.ndarray, k: int, categories: Sequence[str] | None = None,
               match: str = "any") -> tuple[np.ndarray, np.ndarray]:
        """(scores float32[Q,k'], row ids int64[Q,k']) with k' = min(k, rows searchable); sorted by score.

        categories: only items having any (match="any") or all (match="all") of these names.
        Filtered ANN searches may return fewer than k' rows; missing slots have id -1.
        """
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        q = as_matrix(queries, self.dim)
        allowed = self._allowed_rows(categories, match)
        k_eff = min(k, self.count if allowed is None else int(allowed.sum()))
        if q.shape[0] == 0 or k_eff == 0:
            return np.zeros((q.shape[0], k_eff), np.float32), np.zeros((q.shape[0], k_eff), np.int64)
        params = self.search_params
        if allowed is not None:
            return self._search_allowed(q, k_eff, allowed, params)
        if "efSearch" in params:
            # efSearch below k would return fewer than k good neighbours.
            apply_search_params(self._search_index(), {"efSearch": max(params["efSearch"], k_eff)})
        scores, ids = self._search_index().search(q, k_eff)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def _search_allowed(self, q: np.ndarray, k_eff: int, allowed: np.ndarray, params: dict) -> tuple:
        # On the CPU index: GPU FAISS does not take ID selectors for every type.
        params = dict(params)
        if "efSearch" in params:
            # A graph walk keeps only allowed nodes: widen it in proportion to what the filter drops.
            fraction = max(allowed.mean(), 1e-6)
            params["efSearch"] = int(min(max(params["efSearch"], k_eff, np.ceil(2 * k_eff / fraction)),
                                         max(FILTERED_EF_SEARCH_MAX, params["efSearch"], k_eff)))
        scores, ids = search_rows(self.index, q, k_eff, allowed, params)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    # ------------------------------------------------------------ categories and ids

    def _allowed_rows(self, categories: Sequence[str] | None, match: str) -> np.ndarray | None:
        """bool[count] of rows a search may return, or None when every row may be returned."""
        if match not in MATCH_MODES:
            raise ConfigError(f"--match must be one of {', '.join(MATCH_MODES)}, got {match!r}")
        allowed = None if self._deleted is None else ~self._deleted
        if categories:
            if not self.labelled and self.count:
                raise ConfigError("the index has no categories (it was built from a plain folder); "
                                  "search it without --category")
            by_cat = self._category_rows()
            empty = np.zeros(self.count, dtype=bool)
            masks = [by_cat.get(str(name), empty) for name in dict.fromkeys(categories)]
            cat_mask = np.logical_or.reduce(masks) if match == "any" else np.logical_and.reduce(masks)
            allowed = cat_mask if allowed is None else allowed & cat_mask
        return allowed

    def _category_rows(self) -> dict[str, np.ndarray]:
        if self._rows_by_category is None:
            table: dict[str, np.ndarray] = {}
            for row, item in enumerate(self.items):
                for name in item.get("categories", ()):
                    if name not in table:
                        table[name] = np.zeros(self.count, dtype=bool)
                    table[name][row] = True
            self._rows_by_category = table
        return self._rows_by_category

    def category_names(self) -> list[str]:
        """Category names that at least one live item has, sorted."""
        dead = self._deleted
        return sorted(name for name, rows in self._category_rows().items()
                      if (rows if dead is None else rows & ~dead).any())

    def rows_of(self, item_id: str) -> list[int]:
        """Live rows whose item has this id (normally one; [] when absent)."""
        if self._rows_by_id is None:
            table: dict[str, list[int]] = {}
            for row, item in enumerate(self.items):
                if self._deleted is None or not self._deleted[row]:
                    table.setdefault(item["id"], []).append(row)
            self._rows_by_id = table
        return list(self._rows_by_id.get(str(item_id), ()))

    def get(self, item_id: str) -> dict | None:
        """The item with this id (the last added when several share it), or None."""
        rows = self.rows_of(item_id)
        return dict(self.items[rows[-1]]) if rows else None

    def _changed(self) -> None:
        self._searcher = None
        self._rows_by_id = None
        self._rows_by_category = None
        self.meta["count"] = self.count
        self.meta["updated"] = now()

    # ------------------------------------------------------------ edits

    def add(self, vectors: np.ndarray, items: Sequence[dict]) -> None:
        """Append vectors (new row ids continue after the last) and their items."""
        x = as_matrix(vectors, self.dim)
        if len(items) != x.shape[0]:
            raise ConfigError(f"{len(items)} items for {x.shape[0]} vectors")
        self.index.add(x)
        self.items.extend(dict(it) for it in items)
        if self._deleted is not None:
            self._deleted = np.concatenate([self._deleted, np.zeros(x.shape[0], dtype=bool)])
        self._changed()

    def remove(self, ids: Sequence[str], *, missing_ok: bool = False) -> int:
        """Remove every item with one of these ids; returns the number of rows removed.

        Unknown ids: DataError naming them (nothing removed), unless missing_ok.
        """
        ids = [str(i) for i in ids]
        rows = [r for i in dict.fromkeys(ids) for r in self.rows_of(i)]
        if not missing_ok:
            unknown = [i for i in dict.fromkeys(ids) if not self.rows_of(i)]
            if unknown:
                raise DataError(f"no item with id {', '.join(map(repr, unknown[:5]))}"
                                f"{f' (and {len(unknown) - 5} more)' if len(unknown) > 5 else ''} in the index; "
                                "nothing was removed")
        if not rows:
            return 0
        rows_arr = np.asarray(sorted(rows), dtype=np.int64)
        if family(self.index) in ("flat", "ivf"):
            remove_rows(self.index, rows_arr)
            keep = np.ones(len(self.items), dtype=bool)
            keep[rows_arr] = False
            self.items = [it for it, k in zip(self.items, keep) if k]
            if self._deleted is not None:
                self._deleted = self._deleted[keep]
        else:
            if self._deleted is None:
                self._deleted = np.zeros(self.count, dtype=bool)
            self._deleted[rows_arr] = True
        self._changed()
        if self.tombstones > TOMBSTONE_MAX_FRACTION * max(1, self.count):
            self.compact()
        return len(rows)

    def upsert(self, vectors: np.ndarray, items: Sequence[dict]) -> None:
        """Replace the items with these ids (when present) by the given ones, add the others."""
        x = as_matrix(vectors, self.dim)
        if len(items) != x.shape[0]:
            raise ConfigError(f"{len(items)} items for {x.shape[0]} vectors")
        new_ids = [str(it["id"]) for it in items]
        if len(set(new_ids)) != len(new_ids):
            dup = next(i for i in new_ids if new_ids.count(i) > 1)
            raise ConfigError(f"item id {dup!r} is given more than once in one upsert")
        self.remove(new_ids, missing_ok=True)
        self.add(x, items)

    def compact(self) -> None:
        """Drop tombstoned rows for good (HNSW: a new graph from the kept rows' vectors)."""
        if self._deleted is None or not self._deleted.any():
            self._deleted = None
            return
        keep = ~self._deleted
        logger.info("compacting %s: dropping %d tombstoned rows of %d", self.index_type, int(self._deleted.sum()),
                    self.count)
        self.index = rebuild_without(self.index, self.index_type, keep)
        apply_search_params(self.index, self.search_params)
        self.items = [it for it, k in zip(self.items, keep) if k]
        self._deleted = None
        self._changed()

    def save(self, directory) -> pathlib.Path:
        """Write the index folder (atomically); refuses to overwrite the folder it came from if another
        process saved it since (it would drop that process's rows)."""
        directory = pathlib.Path(directory)
        self.compact()  # the folder format has no tombstones
        same = self.directory is not None and os.path.abspath(self.directory) == os.path.abspath(directory)
        self.meta["count"] = self.count
        self.meta["dim"] = self.dim
        self._sidecar_sha256 = write_index_dir(directory, self.index, self.meta, self.items,
                                               expect_sidecar_sha256=self._sidecar_sha256 if same else None)
        self.directory = directory
        return self.directory


def build_gallery_index(vectors: np.ndarray, items: Sequence[dict], index_type: str, *,
                        model_fingerprint: str, model_architecture: str, extra_meta: dict | None = None,
                        seed: int = 0, memory_budget_bytes: int | None = None) -> GalleryIndex:
    """Build an in-memory GalleryIndex; `index_type` "auto" is chosen from (count, dim, memory_budget_bytes)."""
    x = as_matrix(vectors)
    if len(items) != x.shape[0]:
        raise ConfigError(f"{len(items)} items for {x.shape[0]} vectors")
    index_type = resolve_index_type(index_type, x.shape[0], x.shape[1], memory_budget_bytes)
    index = build_faiss_index(x, index_type, seed=seed)
    meta = make_sidecar(index_type, x.shape[1], x.shape[0], model_fingerprint=model_fingerprint,
                        model_architecture=model_architecture, extra=extra_meta)
    return GalleryIndex(index=index, meta=meta, items=[dict(it) for it in items])


def load_index(directory) -> GalleryIndex:
    """Read an index folder (imat.engine.index_dir validates it) into a GalleryIndex."""
    index, meta, items, sidecar_sha256 = read_index_dir(directory)
    return GalleryIndex(index=index, meta=meta, items=items, directory=pathlib.Path(directory),
                        _sidecar_sha256=sidecar_sha256)
