"""Row-level edits of a CPU FAISS index: search restricted to a set of rows, and removing rows.

Row id = position (the GalleryIndex contract), so removing rows must renumber the rows after
them. Per index family:

    Flat            IndexFlat.remove_ids compacts its storage: positions shift by themselves.
    IVF (+OPQ)      IndexIVF.remove_ids drops the entries but keeps their stored ids, so the
                    surviving ids are rewritten in place in each inverted list (codes untouched,
                    so results equal a fresh build with the same coarse quantizer and codebooks).
    HNSW            FAISS cannot remove from the graph: the caller tombstones rows (searches
                    exclude them through the selector) and `rebuild_without` makes a new graph
                    from the kept rows' stored vectors.

Restricted search uses FAISS IDSelectorBitmap through SearchParameters(sel=...), which FAISS
honours for Flat (exact), IVF and HNSW (checked on faiss 1.15.1; tests cover each family).
"""

from __future__ import annotations

import logging

import numpy as np

from imat.engine.faiss_build import build_faiss_index, faiss_module

logger = logging.getLogger(__name__)


def _unwrap(index):
    """(outermost downcast index, the index doing the search inside any IndexPreTransform)."""
    faiss = faiss_module()
    outer = faiss.downcast_index(index)
    inner = outer
    while isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return outer, inner


def family(index) -> str:
    """'flat', 'ivf' or 'hnsw' (anything else: 'other')."""
    faiss = faiss_module()
    _, inner = _unwrap(index)
    if isinstance(inner, faiss.IndexFlat):
        return "flat"
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    return "other"


class RowSelector:
    """SearchParameters selecting the rows where `allowed` is True (keeps the bitmap alive while in use)."""

    def __init__(self, index, allowed: np.ndarray, search_params: dict[str, int]):
        faiss = faiss_module()
        allowed = np.asarray(allowed, dtype=bool)
        self.bits = np.packbits(allowed, bitorder="little")
        self.selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(self.bits))
        outer, inner = _unwrap(index)
        if isinstance(inner, faiss.IndexIVF):
            # SearchParametersIVF's own nprobe (default 1) replaces the index's: pass ours.
            params = faiss.SearchParametersIVF(sel=self.selector,
                                               nprobe=int(search_params.get("nprobe", inner.nprobe)))
        elif isinstance(inner, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW(sel=self.selector,
                                                efSearch=int(search_params.get("efSearch", inner.hnsw.efSearch)))
        else:
            params = faiss.SearchParameters(sel=self.selector)
        self.inner_params = params
        self.params = params
        if outer is not inner:
            self.params = faiss.SearchParametersPreTransform(index_params=params)


def search_rows(index, queries: np.ndarray, k: int, allowed: np.ndarray,
                search_params: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search returning only rows with allowed[row] True (-1 ids pad when fewer exist)."""
    sel = RowSelector(index, allowed, search_params)
    scores, ids = index.search(queries, k, params=sel.params)
    return scores, ids


def remove_rows(index, rows: np.ndarray):
    """Remove `rows` (positions) from a Flat or IVF index, renumbering the rest to stay positional.

    Returns the edited index (the same object). HNSW and unknown families: ValueError (use
    tombstones and `rebuild_without`).
    """
    faiss = faiss_module()
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        return index
    n = int(index.ntotal)
    kind = family(index)
    if kind not in ("flat", "ivf"):
        raise ValueError(f"cannot remove rows from a {type(index).__name__} in place")
    removed = index.remove_ids(faiss.IDSelectorBatch(rows.size, faiss.swig_ptr(rows)))
    if kind == "ivf":
        _, inner = _unwrap(index)
        keep = np.ones(n, dtype=bool)
        keep[rows] = False
        new_id = np.cumsum(keep, dtype=np.int64) - 1  # old position -> new position (for kept rows)
        invlists = inner.invlists
        for list_no in range(inner.nlist):
            size = invlists.list_size(list_no)
            if size == 0:
                continue
            ids = faiss.rev_swig_ptr(invlists.get_ids(list_no), size)  # a writable view of the list's ids
            ids[:] = new_id[ids]
    if removed != rows.size:
        raise RuntimeError(f"FAISS removed {removed} of {rows.size} rows (bug)")
    return index


def rebuild_without(index, index_type: str, keep: np.ndarray):
    """A new index of the same type holding only the rows where keep is True (HNSW: a new graph from
    the stored vectors, in row order)."""
    n = int(index.ntotal)
    vectors = index.reconstruct_n(0, n) if n else np.zeros((0, index.d), np.float32)
    kept = vectors[np.asarray(keep, dtype=bool)]
    if kept.shape[0] == 0:
        faiss = faiss_module()
        return faiss.index_factory(index.d, index_type, faiss.METRIC_INNER_PRODUCT)
    return build_faiss_index(kept, index_type, use_gpu=False)
