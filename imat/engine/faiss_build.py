"""Building a FAISS index from vectors: create from a factory string, train on a seeded sample, add.

The GPU is used for building and searching when FAISS has one and the gallery is large
enough to repay the host<->device copies; the index kept (and saved) is always a CPU index.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from imat.engine.index_choice import default_search_params, ivf_nlist_of
from imat.errors import ConfigError

logger = logging.getLogger(__name__)

HNSW_EF_CONSTRUCTION = 120  # clustered galleries (fashion) need more than the default 40 to stay connected
GPU_MIN_COUNT = 100_000  # below this a CPU scan is faster than the host<->device copies
TRAIN_SAMPLE_MAX = 65_536  # = 256 centroids x 256 points, what FAISS k-means samples for PQ anyway


def faiss_module():
    """FAISS, imported on first use (importing imat.engine stays cheap)."""
    import faiss

    return faiss


def as_matrix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Contiguous float32 [N, dim]; ConfigError for any other shape."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ConfigError(f"expected vectors of shape [N, {dim or 'D'}], got {x.shape}")
    return x


def gpu_worthwhile(index_type: str, count: int) -> bool:
    # FAISS GPU supports flat and IVF families, not HNSW; small galleries lose to transfer overhead.
    faiss = faiss_module()
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() <= 0:
        return False
    base = index_type.split(",")
    kind = base[1] if base[0].startswith("OPQ") and len(base) > 1 else base[0]
    return count >= GPU_MIN_COUNT and (kind.startswith("Flat") or kind.startswith("IVF"))


def to_gpu(index):
    """A GPU clone of a CPU index, sharded across all GPUs when there are several."""
    faiss = faiss_module()
    ngpu = faiss.get_num_gpus()
    co = faiss.GpuMultipleClonerOptions()
    co.shard = ngpu > 1  # shard the gallery across GPUs (each holds 1/ngpu) instead of replicating
    co.useFloat16 = False
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)


def apply_search_params(index, params: dict[str, int]) -> None:
    """Set nprobe / efSearch through ParameterSpace (reaches inside OPQ/IDMap wrappers and GPU clones)."""
    if not params:
        return
    faiss = faiss_module()
    ps = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError as e:
            logger.debug("search parameter %s not applicable to %s: %s", name, type(index).__name__, e)


def create_index(dim: int, index_type: str):
    """An empty index of a factory string (inner product); ConfigError when FAISS rejects the string."""
    faiss = faiss_module()
    try:
        return faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise ConfigError(
            f"--index-type {index_type!r} is not a valid FAISS factory string for dimension {dim} ({first}); "
            "use 'auto', 'Flat', 'HNSW32,Flat' or 'IVF<nlist>,PQ<m>'"
        ) from None


def check_trainable(index_type: str, count: int) -> None:
    """ConfigError when `count` vectors cannot train `index_type` (too few for its lists or PQ codebooks)."""
    nlist = ivf_nlist_of(index_type)
    if nlist and count < nlist:
        raise ConfigError(
            f"--index-type {index_type!r} needs at least {nlist} vectors to train {nlist} lists, got {count}; "
            "use 'auto' or a smaller nlist"
        )
    pq = re.search(r"PQ(\d+)(?:x(\d+))?", index_type)
    if pq:
        nbits = int(pq.group(2) or 8)
        if count < 2**nbits:
            raise ConfigError(
                f"--index-type {index_type!r} needs at least {2**nbits} vectors to train its PQ codebooks, got {count}"
            )


def new_index(dim: int, index_type: str, count: int):
    """An empty index of `index_type` ready to train and fill with `count` vectors (checked trainable)."""
    index = create_index(dim, index_type)
    check_trainable(index_type, count)
    if "HNSW" in index_type:
        hnsw = faiss_module().downcast_index(index)
        if hasattr(hnsw, "hnsw"):
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    return index


def train_sample_rows(count: int, index_type: str, seed: int = 0) -> np.ndarray | None:
    """Sorted row numbers of the seeded training sample of `count` vectors, or None to train on all.

    One rule for building from memory and from embedding parts, so both train on the same rows.
    """
    # k-means wants >= 39 points per centroid; more than ~64 per centroid buys little.
    sample_size = max(TRAIN_SAMPLE_MAX, 64 * (ivf_nlist_of(index_type) or 0))
    if count <= sample_size:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, sample_size, replace=False))


def build_faiss_index(vectors: np.ndarray, index_type: str, *, seed: int = 0, use_gpu: bool | None = None):
    """Build a CPU FAISS index (trained on a seeded sample when needed); GPU used for build when worthwhile."""
    faiss = faiss_module()
    x = as_matrix(vectors)
    n, d = x.shape
    index = new_index(d, index_type, n)
    gpu = gpu_worthwhile(index_type, n) if use_gpu is None else use_gpu
    work = index
    if gpu:
        try:
            work = to_gpu(index)
            logger.info("building %s on %d GPU(s)", index_type, faiss.get_num_gpus())
        except Exception as e:  # noqa: BLE001 - a GPU problem must not stop a CPU-capable build
            logger.warning("GPU FAISS unavailable (%s); building on CPU", e)
            work, gpu = index, False
    if not gpu:
        logger.info("building %s on CPU (%d vectors, dim %d)", index_type, n, d)
    if not work.is_trained:
        rows = train_sample_rows(n, index_type, seed)
        work.train(x if rows is None else x[rows])
    work.add(x)
    if gpu:
        index = faiss.index_gpu_to_cpu(work)
    apply_search_params(index, default_search_params(index_type))
    return index
