"""FAISS index types vs numpy brute force, same run: queries/s and recall@10.

    python benchmarks/search.py [--n 100000] [--dim 128] [--queries 1000] [--k 10] [--seed 0]

Clustered synthetic unit vectors (like embeddings: fashion photos group by garment). Every
index is built by imat.engine.faiss_build exactly as `imat index` builds it (same search parameters),
and compared with an exact float32 numpy scan (matrix product + argpartition) measured in the
same process; every search is timed --repeats times and the fastest run counts (on a shared
machine a single run mostly measures the neighbours' load). Recall columns:

- 10-R@10: |top-10 found & exact top-10| / 10 (the strict one)
- 1-R@10: the exact nearest neighbour is in the top 10 (FAISS's usual R@10)
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

from imat.engine import index_choice as ix
from imat.engine.faiss_build import build_faiss_index


def clustered(n: int, dim: int, seed: int, *, clusters: int = 1000, spread: float = 0.35) -> np.ndarray:
    centres = np.random.default_rng(12345).standard_normal((clusters, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_search(gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), chunk):
        sims = queries[s : s + chunk] @ gallery.T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1)
        out[s : s + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def recalls(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    r10 = np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])
    r1 = np.mean([t[0] in f for f, t in zip(found, truth)])
    return float(r10), float(r1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5,
                    help="each search is timed this many times; the fastest counts (a shared machine's "
                         "other load only ever slows a run down)")
    ap.add_argument("--types", default=None, help="factory strings separated by ';' (default: Flat;HNSW32,Flat;IVF..,SQ8;IVF..,PQ..)")
    args = ap.parse_args(argv)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    import faiss

    x = clustered(args.n, args.dim, args.seed)
    q = clustered(args.queries, args.dim, args.seed + 1)
    nlist, m = ix.ivf_nlist(args.n), ix.pq_m(args.dim, args.dim // 4)  # as `auto` picks them
    types = args.types.split(";") if args.types else [
        "Flat", "HNSW32,Flat", f"IVF{nlist},SQ8", f"IVF{nlist},PQ{m}"]
    print(f"gallery {args.n} x {args.dim} (clustered, unit norm), {args.queries} queries, k={args.k}, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; auto for this n = "
          f"{ix.choose_index_type(args.n, args.dim)}; fastest of {args.repeats}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    def fastest(fn) -> tuple[float, object]:
        best, out = float("inf"), None
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return best, out

    numpy_search(x, q[:64], args.k)  # warm-up (BLAS threads)
    numpy_s, truth = fastest(lambda: numpy_search(x, q, args.k))
    numpy_qps = args.queries / numpy_s
    rows = [("numpy brute force", 0.0, numpy_qps, 1.0, 1.0, args.n * args.dim * 4)]
    for t in types:
        t0 = time.perf_counter()
        index = build_faiss_index(x, t, seed=args.seed)
        build_s = time.perf_counter() - t0
        index.search(q[:64], args.k)  # warm-up
        search_s, (_, ids) = fastest(lambda index=index: index.search(q, args.k))
        qps = args.queries / search_s
        r10, r1 = recalls(ids, truth)
        size = faiss.serialize_index(index).size
        rows.append((f"{t} {ix.default_search_params(t) or ''}", build_s, qps, r10, r1, size))

    print(f"{'index':<40}{'build s':>9}{'QPS':>11}{'vs numpy':>10}{'10-R@10':>9}{'1-R@10':>8}{'MB':>8}")
    for name, build_s, qps, r10, r1, size in rows:
        print(f"{name:<40}{build_s:>9.1f}{qps:>11.0f}{qps / numpy_qps:>9.1f}x{r10:>9.3f}{r1:>8.3f}{size / 2**20:>8.1f}")


if __name__ == "__main__":
    main()
