"""Test helpers for the index tests: clustered unit vectors and an exact float64 reference search."""

from __future__ import annotations

import numpy as np


def clustered(n, d, seed, *, clusters=50, spread=0.4):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(gallery, queries, k):
    sims = queries.astype(np.float64) @ gallery.astype(np.float64).T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def recall_at(found, truth):
    return np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)])


def small_gallery(n, seed=0, labelled=True):
    """(GalleryIndex "Flat" of n clustered 16-d vectors with items, the vectors)."""
    from imat.engine.gallery_index import build_gallery_index

    x = clustered(n, 16, seed)
    items = [{"id": f"i{seed}-{r}", "path": f"/p/{r}.jpg", **({"categories": ["shoe"]} if labelled else {})}
             for r in range(n)]
    return build_gallery_index(x, items, "Flat", model_fingerprint="fp", model_architecture="arch"), x
