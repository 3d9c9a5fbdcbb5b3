"""An index folder from an embeddings folder: the parts memory-mapped, trained on a sample, added part by part.

The result is the index folder `imat index --images` writes (same files, sidecar and items), for
the same index type: the type is chosen by the same pure function of (count, dim, budget), the
training sample is the same seeded rows (faiss_build.train_sample_rows), so a Flat index holds
exactly the vectors a build from memory holds, and an IVF index the same lists in the same order.

Memory: only the training sample and the part(s) being added are read into RAM; the vectors of
the gallery never are all at once, so an IVF index with compressed codes (SQ8, PQ) can be built
for a gallery whose float32 vectors are larger than RAM. IVF parts are added in parallel, each into
an empty clone of the trained index, and merged into it in part order (FAISS merge_into), which is
what a single add of all vectors would have produced. Flat and HNSW are added part by part.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import numpy as np

from imat.engine.embedding_parts import EmbeddingParts
from imat.engine.faiss_build import apply_search_params, faiss_module, new_index, train_sample_rows
from imat.engine.gallery_index import GalleryIndex
from imat.engine.index_choice import default_search_params, resolve_index_type
from imat.engine.index_dir import make_sidecar
from imat.engine.index_edit import family
from imat.errors import DataError

logger = logging.getLogger(__name__)


def _offsets(parts: EmbeddingParts) -> np.ndarray:
    """offsets[k] = index row of the first vector of part k (parts in order); offsets[-1] = count."""
    return np.concatenate([[0], np.cumsum([p["embedded"] for p in parts.parts])]).astype(np.int64)


def gather_rows(parts: EmbeddingParts, rows: np.ndarray | None) -> np.ndarray:
    """float32 vectors of the given sorted global rows (None: all rows), read part by part from the mmaps."""
    offsets = _offsets(parts)
    chunks = []
    for k, entry in enumerate(parts.parts):
        vectors = parts.vectors(entry)
        if rows is None:
            chunks.append(np.asarray(vectors))
            continue
        lo, hi = np.searchsorted(rows, [offsets[k], offsets[k + 1]])
        if hi > lo:
            chunks.append(vectors[rows[lo:hi] - offsets[k]])
    return np.ascontiguousarray(np.concatenate(chunks) if chunks else np.zeros((0, parts.dim), np.float32),
                                dtype=np.float32)


def _part_vectors(parts: EmbeddingParts, entry) -> np.ndarray:
    return np.ascontiguousarray(parts.vectors(entry), dtype=np.float32)


def _add_ivf_in_parallel(index, parts: EmbeddingParts, workers: int, bar) -> None:
    """Each part added to an empty clone of the trained `index` in a worker thread, merged in part order."""
    faiss = faiss_module()
    empty = faiss.clone_index(index)  # trained, empty: `index` itself fills up as parts are merged

    def add_part(entry):
        clone = faiss.clone_index(empty)
        clone.add(_part_vectors(parts, entry))
        return clone, entry["embedded"]

    entries = [e for e in parts.parts if e["embedded"]]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imat-add") as pool:
        futures: list = []
        next_entry = 0
        while next_entry < len(entries) or futures:
            # At most `workers` clones in flight: memory stays ~ workers parts' codes.
            while next_entry < len(entries) and len(futures) < workers:
                futures.append(pool.submit(add_part, entries[next_entry]))
                next_entry += 1
            clone, added = futures.pop(0).result()
            faiss.merge_into(index, clone, True)  # ids shifted by index.ntotal: part order = row order
            bar.update(added)


def build_index_from_parts(parts: EmbeddingParts, index_type: str = "auto", *, memory_budget_bytes: int | None = None,
                           seed: int = 0, workers: int | None = None, progress: bool | None = None) -> GalleryIndex:
    """A GalleryIndex (not yet saved) of every embedded row of `parts`, rows in part order."""
    from tqdm import tqdm

    n, d = parts.count, parts.dim
    if n == 0:
        raise DataError(f"{parts.directory}: no item was embedded ({parts.skipped} skipped); nothing to index")
    index_type = resolve_index_type(index_type, n, d, memory_budget_bytes)
    index = new_index(d, index_type, n)
    if not index.is_trained:
        rows = train_sample_rows(n, index_type, seed)
        logger.info("training %s on %d of %d vectors", index_type, n if rows is None else len(rows), n)
        index.train(gather_rows(parts, rows))
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    disable = not progress if progress is not None else None
    with tqdm(total=n, desc="adding parts", unit="vec", disable=disable, leave=False) as bar:
        if family(index) == "ivf" and workers > 1 and len(parts.parts) > 1:
            _add_ivf_in_parallel(index, parts, workers, bar)
        else:
            for entry in parts.parts:
                if entry["embedded"]:
                    index.add(_part_vectors(parts, entry))
                    bar.update(entry["embedded"])
    if index.ntotal != n:
        raise RuntimeError(f"index holds {index.ntotal} vectors after adding {n}")
    apply_search_params(index, default_search_params(index_type))
    model = parts.model
    meta = make_sidecar(index_type, d, n, model_fingerprint=model.pop("model_fingerprint"),
                        model_architecture=model.pop("model_architecture"),
                        extra={**model, "labelled": parts.labelled, "skipped": parts.skipped})
    logger.info("built %s from %d parts of %s (%d vectors)", index_type, len(parts.parts), parts.directory, n)
    return GalleryIndex(index=index, meta=meta, items=parts.items())
