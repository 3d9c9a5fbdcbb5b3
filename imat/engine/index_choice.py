"""Which FAISS index for a gallery: a pure function of (count, dim, memory budget), plus its search defaults.

Thresholds (inner product metric; the recall measurements behind them are in benchmarks/RESULTS.md, "Search"):

    count <= 50,000 and fits budget   -> "Flat"              exact; N*D*4 bytes
    count <= 1,000,000 and fits       -> "HNSW32,Flat"       graph; ~N*(4D+276) bytes
    larger, SQ8 fits (or no budget)   -> "IVF{nlist},SQ8"    nlist ~ 4*sqrt(N); 8-bit scalar codes, 4x smaller than Flat
    memory-bound                      -> "IVF{nlist},PQ{m}"  m = largest divisor of D <= D/4 (16x smaller;
                                                             PQ codes blur close neighbours)
    tighter still                     -> "OPQ{m},IVF{nlist},PQ{m}" with the largest m that fits
                                         (the OPQ rotation recovers part of the recall lost by short codes)

IVF search uses nprobe = max(16, nlist/16) and HNSW efSearch = 256 (stored in the sidecar).
`resolve_index_type` is the one place where the user's "auto" becomes a factory string.
No FAISS import here: this module is arithmetic only.
"""

from __future__ import annotations

import logging
import math
import re

from imat.errors import ConfigError

logger = logging.getLogger(__name__)

AUTO = "auto"
FLAT_MAX_COUNT = 50_000
HNSW_MAX_COUNT = 1_000_000
HNSW_M = 32
HNSW_EF_SEARCH = 256
IVF_MIN_NPROBE = 16


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
        # SQ8 before PQ: PQ(D/4) codes lose much more recall (benchmarks/RESULTS.md, "Search")
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


def resolve_index_type(index_type: str, count: int, dim: int, memory_budget_bytes: int | None = None) -> str:
    """The factory string to build: `index_type` itself, or the choice for (count, dim, budget) when "auto"."""
    if index_type != AUTO:
        return index_type
    chosen = choose_index_type(count, dim, memory_budget_bytes)
    logger.info("index type auto -> %s for %d vectors of dim %d", chosen, count, dim)
    return chosen


def ivf_nlist_of(index_type: str) -> int | None:
    """The number of inverted lists of an IVF factory string, None for other types."""
    m = re.search(r"IVF(\d+)", index_type)
    return int(m.group(1)) if m else None


def default_search_params(index_type: str) -> dict[str, int]:
    """nprobe for IVF (nlist/16, at least 16) and efSearch for HNSW; stored in the sidecar."""
    params: dict[str, int] = {}
    nlist = ivf_nlist_of(index_type)
    if nlist:
        params["nprobe"] = min(nlist, max(IVF_MIN_NPROBE, nlist // 16))
    if "HNSW" in index_type:
        params["efSearch"] = HNSW_EF_SEARCH
    return params
