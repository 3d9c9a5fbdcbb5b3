"""Building FAISS indexes: recall of the approximate types against brute force, bad factory strings, GPU choice."""

from __future__ import annotations

import numpy as np
import pytest

from imat.engine import faiss_build as fb
from imat.errors import ConfigError

from index_vectors import brute_force, clustered, recall_at


@pytest.mark.parametrize("index_type", ["HNSW32,Flat", "IVF100,Flat", "IVF100,SQ8"])
def test_approximate_indexes_reach_recall(index_type):
    x = clustered(10_000, 32, 0)
    q = clustered(200, 32, 1)
    index = fb.build_faiss_index(x, index_type)
    _, ids = index.search(q, 10)
    _, truth = brute_force(x, q, 10)
    r10 = recall_at(ids, truth)  # 10-recall@10: overlap of the top 10 with the exact top 10
    assert r10 >= 0.95, r10


@pytest.mark.slow
def test_ivf_pq_reaches_recall():
    # PQ training (k-means per sub-space) is the slow part on a shared CPU: keep it small.
    x = clustered(3000, 16, 0)
    q = clustered(200, 16, 1)
    index = fb.build_faiss_index(x, "IVF50,PQ8")
    _, ids = index.search(q, 10)
    _, truth = brute_force(x, q, 10)
    r1 = np.mean([t[0] in f for f, t in zip(ids, truth)])  # 1-recall@10: exact nearest found in the top 10
    r10 = recall_at(ids, truth)
    # PQ codes are lossy by design (8 bytes for 64 bytes of floats): the exact nearest neighbour
    # is found, the order of the rest of the top 10 is approximate.
    assert r1 >= 0.95 and r10 >= 0.75, (r1, r10)


def test_bad_user_index_types_are_config_errors():
    x = clustered(100, 8, 0)
    with pytest.raises(ConfigError, match="not a valid FAISS factory string"):
        fb.build_faiss_index(x, "Nonsense42")
    with pytest.raises(ConfigError, match="needs at least 1024 vectors"):
        fb.build_faiss_index(x, "IVF1024,Flat")
    with pytest.raises(ConfigError, match="PQ codebooks"):
        fb.build_faiss_index(x, "IVF2,PQ4")


def test_gpu_is_not_used_without_gpus():
    import faiss

    if faiss.get_num_gpus() == 0:
        assert not fb.gpu_worthwhile("Flat", 10_000_000)
    assert not fb.gpu_worthwhile("HNSW32,Flat", 10_000_000)
