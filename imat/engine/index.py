"""FAISS gallery index: choose the type, build, save/load/add atomically.

Index directory (the contract):

    index.faiss   faiss.write_index of a CPU index (GPU indexes are copied back before saving)
    index.json    sidecar {format_version, index_type, metric, dim, count, model_fingerprint,
                  model_architecture, created, imat_version, search_params, ...}
    items.jsonl   one line per row id (row id = line number): {"id", "path", "categories"?}

All three are written into a temporary folder beside the target, which is then
swapped in (old renamed away, new renamed in, old deleted): an interrupted
write leaves the previous index intact and loadable.

Index type thresholds (`choose_index_type`, a pure function), inner product metric:

    count <= 50,000 and fits budget   -> "Flat"         exact; N*D*4 bytes
    count <= 1,000,000 and fits       -> "HNSW32,Flat"  graph, 10-recall@10 ~0.99 at efSearch 256; ~N*(4D+276) bytes
    larger, SQ8 fits (or no budget)   -> "IVF{nlist},SQ8"  nlist ~ 4*sqrt(N); 8-bit scalar codes, 4x smaller
                                         than Flat, 10-recall@10 0.96 on the 100k x 128 benchmark
    memory-bound                      -> "IVF{nlist},PQ{m}"  m = largest divisor of D <= D/4 (16x smaller;
                                         10-recall@10 only ~0.5 on the benchmark: PQ codes blur close neighbours)
    tighter still                     -> "OPQ{m},IVF{nlist},PQ{m}" with the largest m that fits
                                         (the OPQ rotation recovers part of the recall lost by short codes)

IVF search uses nprobe = max(16, nlist/16) and HNSW efSearch = 256 (stored in the sidecar).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import uuid
from typing import Any, Sequence

import numpy as np

from imat import __version__
from imat.errors import ConfigError, IndexFileError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
ITEMS_FILE = "items.jsonl"
METRIC = "inner_product"

FLAT_MAX_COUNT = 50_000
HNSW_MAX_COUNT = 1_000_000
HNSW_M = 32
HNSW_EF_SEARCH = 256
HNSW_EF_CONSTRUCTION = 120  # clustered galleries (fashion) need more than the default 40 to stay connected
IVF_MIN_NPROBE = 16
GPU_MIN_COUNT = 100_000  # below this a CPU scan is faster than the host<->device copies
TRAIN_SAMPLE_MAX = 65_536  # = 256 centroids x 256 points, what FAISS k-means samples for PQ anyway
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


def _faiss():
    import faiss

    return faiss


# ---------------------------------------------------------------- choosing the type (pure)


def flat_bytes(count: int, dim: int) -> int:
    return count * dim * 4


def hnsw_bytes(count: int, dim: int, m: int = HNSW_M) -> int:
    # vectors + level-0 links (2M int32) + upper levels (~1/M of the nodes, M links each) + bookkeeping
    return count * (dim * 4 + 2 * m * 4 + 4 + 16)


def sq8_bytes(count: int, dim: int) -> int:
    # one byte per dimension + int64 id per vector
    return count * (dim + 8)


def ivfpq_bytes(count: int, m: int, nbits: int = 8) -> int:
    # code + int64 id per vector
    return count * (math.ceil(m * nbits / 8) + 8)


def ivf_nlist(count: int) -> int:
    """~4*sqrt(N) lists, capped so each list gets >= 39 training points (FAISS's k-means minimum)."""
    return max(1, min(int(round(4 * math.sqrt(count))), count // 39))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pq_m(dim: int, max_m: int) -> int:
    """Largest divisor of `dim` that is <= max_m (PQ needs m | dim)."""
    return max(d for d in _divisors(dim) if d <= max(1, max_m))


def choose_index_type(count: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """Pick a FAISS factory string for `count` vectors of `dim` (see the module docstring for thresholds)."""
    if count < 1 or dim < 1:
        raise ConfigError(f"cannot index {count} vectors of dimension {dim}: need at least one vector")

    def fits(nbytes: int) -> bool:
        return memory_budget_bytes is None or nbytes <= memory_budget_bytes

    if count <= FLAT_MAX_COUNT and fits(flat_bytes(count, dim)):
        return "Flat"
    if count <= HNSW_MAX_COUNT and fits(hnsw_bytes(count, dim)):
        return "HNSW32,Flat"
    nlist = ivf_nlist(count)
    if fits(sq8_bytes(count, dim)):
        # measured: IVF-SQ8 keeps 10-recall@10 ~0.96 where IVF-PQ(D/4) drops to ~0.5 (benchmarks/search.py)
        return f"IVF{nlist},SQ8"
    nbits = 8 if count >= 39 * 256 else 4  # 8-bit codebooks need ~10k training points
    suffix = "" if nbits == 8 else "x4"
    m = pq_m(dim, max(1, dim // 4))
    if fits(ivfpq_bytes(count, m, nbits)):
        return f"IVF{nlist},PQ{m}{suffix}"
    for cand in sorted((d for d in _divisors(dim) if d < m), reverse=True):
        if fits(ivfpq_bytes(count, cand, nbits)):
            return f"OPQ{cand},IVF{nlist},PQ{cand}{suffix}"
    raise ConfigError(
        f"memory budget {memory_budget_bytes} bytes is too small for {count} vectors of dimension {dim} "
        f"(the smallest PQ code needs {ivfpq_bytes(count, 1, nbits)} bytes); raise the budget"
    )


def _ivf_nlist_of(index_type: str) -> int | None:
    m = re.search(r"IVF(\d+)", index_type)
    return int(m.group(1)) if m else None


def default_search_params(index_type: str) -> dict[str, int]:
    """nprobe for IVF (nlist/16, at least 16) and efSearch for HNSW; stored in the sidecar."""
    params: dict[str, int] = {}
    nlist = _ivf_nlist_of(index_type)
    if nlist:
        params["nprobe"] = min(nlist, max(IVF_MIN_NPROBE, nlist // 16))
    if "HNSW" in index_type:
        params["efSearch"] = HNSW_EF_SEARCH
    return params


# ---------------------------------------------------------------- building


def _as_matrix(vectors: np.ndarray, dim: int | None = None) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ConfigError(f"expected vectors of shape [N, {dim or 'D'}], got {x.shape}")
    return x


def _gpu_worthwhile(index_type: str, count: int) -> bool:
    # FAISS GPU supports flat and IVF families, not HNSW; small galleries lose to transfer overhead.
    faiss = _faiss()
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() <= 0:
        return False
    base = index_type.split(",")
    kind = base[1] if base[0].startswith("OPQ") and len(base) > 1 else base[0]
    return count >= GPU_MIN_COUNT and (kind.startswith("Flat") or kind.startswith("IVF"))


def _to_gpu(index):
    faiss = _faiss()
    ngpu = faiss.get_num_gpus()
    co = faiss.GpuMultipleClonerOptions()
    co.shard = ngpu > 1  # shard the gallery across GPUs (each holds 1/ngpu) instead of replicating
    co.useFloat16 = False
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=ngpu)


def apply_search_params(index, params: dict[str, int]) -> None:
    """Set nprobe / efSearch through ParameterSpace (reaches inside OPQ/IDMap wrappers and GPU clones)."""
    if not params:
        return
    faiss = _faiss()
    ps = faiss.GpuParameterSpace() if "Gpu" in type(index).__name__ and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for name, value in params.items():
        try:
            ps.set_index_parameter(index, name, int(value))
        except RuntimeError as e:
            logger.debug("search parameter %s not applicable to %s: %s", name, type(index).__name__, e)


def create_index(dim: int, index_type: str):
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise ConfigError(
            f"--index-type {index_type!r} is not a valid FAISS factory string for dimension {dim} ({first}); "
            "use 'auto', 'Flat', 'HNSW32,Flat' or 'IVF<nlist>,PQ<m>'"
        ) from None


def _check_trainable(index_type: str, count: int) -> None:
    nlist = _ivf_nlist_of(index_type)
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


def build_faiss_index(vectors: np.ndarray, index_type: str, *, seed: int = 0, use_gpu: bool | None = None):
    """Build a CPU FAISS index (trained on a seeded sample when needed); GPU used for build when worthwhile."""
    faiss = _faiss()
    x = _as_matrix(vectors)
    n, d = x.shape
    index = create_index(d, index_type)
    _check_trainable(index_type, n)
    if "HNSW" in index_type:
        hnsw = faiss.downcast_index(index)
        if hasattr(hnsw, "hnsw"):
            hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    gpu = _gpu_worthwhile(index_type, n) if use_gpu is None else use_gpu
    work = index
    if gpu:
        try:
            work = _to_gpu(index)
            logger.info("building %s on %d GPU(s)", index_type, faiss.get_num_gpus())
        except Exception as e:  # noqa: BLE001 - a GPU problem must not stop a CPU-capable build
            logger.warning("GPU FAISS unavailable (%s); building on CPU", e)
            work, gpu = index, False
    if not gpu:
        logger.info("building %s on CPU (%d vectors, dim %d)", index_type, n, d)
    if not work.is_trained:
        rng = np.random.default_rng(seed)
        # k-means wants >= 39 points per centroid; more than ~64 per centroid buys little.
        sample_size = max(TRAIN_SAMPLE_MAX, 64 * (_ivf_nlist_of(index_type) or 0))
        sample = x if n <= sample_size else x[np.sort(rng.choice(n, sample_size, replace=False))]
        work.train(sample)
    work.add(x)
    if gpu:
        index = faiss.index_gpu_to_cpu(work)
    apply_search_params(index, default_search_params(index_type))
    return index


# ---------------------------------------------------------------- the gallery index


@dataclasses.dataclass
class GalleryIndex:
    """A FAISS index plus its sidecar and item list; row id = position in `items`."""

    index: Any
    meta: dict
    items: list[dict]
    directory: pathlib.Path | None = None
    _searcher: Any = dataclasses.field(default=None, repr=False)

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
            if _gpu_worthwhile(self.index_type, self.count):
                try:
                    self._searcher = _to_gpu(self.index)
                    apply_search_params(self._searcher, self.search_params)
                    logger.info("searching %s on %d GPU(s)", self.index_type, _faiss().get_num_gpus())
                except Exception as e:  # noqa: BLE001
                    logger.warning("GPU FAISS unavailable (%s); searching on CPU", e)
                    self._searcher = self.index
        return self._searcher

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32[Q,k'], row ids int64[Q,k']) with k' = min(k, count); rows sorted by score."""
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        q = _as_matrix(queries, self.dim)
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
        x = _as_matrix(vectors, self.dim)
        if len(items) != x.shape[0]:
            raise ConfigError(f"{len(items)} items for {x.shape[0]} vectors")
        self.index.add(x)
        self.items.extend(dict(it) for it in items)
        self._searcher = None
        self.meta["count"] = self.count
        self.meta["updated"] = _now()

    def save(self, directory) -> pathlib.Path:
        self.meta["count"] = self.count
        self.meta["dim"] = self.dim
        write_index_dir(directory, self.index, self.meta, self.items)
        self.directory = pathlib.Path(directory)
        return self.directory


def _now() -> str:
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
        "created": _now(),
        "imat_version": __version__,
        "search_params": default_search_params(index_type),
    }
    meta.update(extra or {})
    return meta


def build_gallery_index(vectors: np.ndarray, items: Sequence[dict], index_type: str, *,
                        model_fingerprint: str, model_architecture: str, extra_meta: dict | None = None,
                        seed: int = 0) -> GalleryIndex:
    x = _as_matrix(vectors)
    if len(items) != x.shape[0]:
        raise ConfigError(f"{len(items)} items for {x.shape[0]} vectors")
    if index_type == "auto":
        index_type = choose_index_type(x.shape[0], x.shape[1])
        logger.info("index type auto -> %s for %d vectors of dim %d", index_type, x.shape[0], x.shape[1])
    index = build_faiss_index(x, index_type, seed=seed)
    meta = make_sidecar(index_type, x.shape[1], x.shape[0], model_fingerprint=model_fingerprint,
                        model_architecture=model_architecture, extra=extra_meta)
    return GalleryIndex(index=index, meta=meta, items=[dict(it) for it in items])


# ---------------------------------------------------------------- disk format


def write_index_dir(directory, index, meta: dict, items: Sequence[dict]) -> pathlib.Path:
    """Write the three files into a temp folder beside `directory`, then swap it in."""
    faiss = _faiss()
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


def load_index(directory) -> GalleryIndex:
    """Read an index directory; IndexFileError names the folder/file and what is wrong."""
    faiss = _faiss()
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
    return GalleryIndex(index=index, meta=meta, items=items, directory=directory)
