"""GalleryIndex: a FAISS index with its sidecar and item list, searched and extended in memory.

Row id = position in `items`. Building goes through imat.engine.faiss_build, the files
through imat.engine.index_dir; this module only ties them together.
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
from imat.errors import ConfigError

logger = logging.getLogger(__name__)


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

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

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

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32[Q,k'], row ids int64[Q,k']) with k' = min(k, count); rows sorted by score."""
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        q = as_matrix(queries, self.dim)
        k_eff = min(k, self.count)
        if q.shape[0] == 0 or k_eff == 0:
            return np.zeros((q.shape[0], k_eff), np.float32), np.zeros((q.shape[0], k_eff), np.int64)
        params = self.search_params
        if "efSearch" in params:
            # efSearch below k would return fewer than k good neighbours.
            apply_search_params(self._search_index(), {"efSearch": max(params["efSearch"], k_eff)})
        scores, ids = self._search_index().search(q, k_eff)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def add(self, vectors: np.ndarray, items: Sequence[dict]) -> None:
        """Append vectors (new row ids continue after the last) and their items."""
        x = as_matrix(vectors, self.dim)
        if len(items) != x.shape[0]:
            raise ConfigError(f"{len(items)} items for {x.shape[0]} vectors")
        self.index.add(x)
        self.items.extend(dict(it) for it in items)
        self._searcher = None
        self.meta["count"] = self.count
        self.meta["updated"] = now()

    def save(self, directory) -> pathlib.Path:
        """Write the index folder (atomically); refuses to overwrite the folder it came from if another
        process saved it since (it would drop that process's rows)."""
        directory = pathlib.Path(directory)
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
