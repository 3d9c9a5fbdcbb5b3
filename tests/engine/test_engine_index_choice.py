"""Index type choice: the threshold table, impossible inputs, "auto" resolution, default search parameters."""

from __future__ import annotations

import pytest

from imat.engine import index_choice as ic
from imat.errors import ConfigError


@pytest.mark.parametrize(
    "count,dim,budget,expected",
    [
        (1, 16, None, "Flat"),
        (50_000, 128, None, "Flat"),
        (50_001, 128, None, "HNSW32,Flat"),
        (1_000_000, 128, None, "HNSW32,Flat"),
        (1_000_001, 128, None, "IVF4000,SQ8"),
        (4_000_000, 96, None, "IVF8000,SQ8"),
        (4_000_000, 96, 4_000_000 * 104, "IVF8000,SQ8"),  # SQ8 exactly fits
        (4_000_000, 96, 4_000_000 * 103, "IVF8000,PQ24"),  # it does not: PQ with m = D/4
        (10_000_000, 100, 10_000_000 * 50, "IVF12649,PQ25"),
        # memory-bound: 20k x 128 flat = 10 MB does not fit 2 MB -> IVF-PQ; nlist capped at n/39
        (20_000, 128, 2_000_000, "IVF512,PQ32"),
        # small and memory-bound: 4-bit codebooks (too few points for 256 centroids), then OPQ + shorter codes
        (5_000, 64, 80_000, "IVF128,PQ16x4"),
        (5_000, 64, 60_000, "OPQ8,IVF128,PQ8x4"),
        (200_000, 128, 60 * 2**20, "IVF1789,SQ8"),
        (200_000, 128, 20 * 2**20, "IVF1789,PQ32"),
        (200_000, 128, 5_000_000, "OPQ16,IVF1789,PQ16"),
    ],
)
def test_choose_index_type_table(count, dim, budget, expected):
    assert ic.choose_index_type(count, dim, budget) == expected


def test_choose_index_type_rejects_impossible_inputs():
    with pytest.raises(ConfigError, match="at least one vector"):
        ic.choose_index_type(0, 16)
    with pytest.raises(ConfigError, match="too small"):
        ic.choose_index_type(1_000_000, 64, 1000)


def test_resolve_index_type_only_replaces_auto():
    assert ic.resolve_index_type("IVF64,Flat", 10, 8) == "IVF64,Flat"
    assert ic.resolve_index_type("auto", 10, 8) == "Flat"
    assert ic.resolve_index_type("auto", 20_000, 128, 2_000_000) == "IVF512,PQ32"  # the budget reaches the choice


def test_search_params_are_stored_defaults():
    assert ic.default_search_params("Flat") == {}
    assert ic.default_search_params("HNSW32,Flat") == {"efSearch": ic.HNSW_EF_SEARCH}
    assert ic.default_search_params("IVF4000,PQ32") == {"nprobe": 250}
    assert ic.default_search_params("IVF4000,SQ8") == {"nprobe": 250}
    assert ic.default_search_params("IVF64,Flat") == {"nprobe": 16}
