"""Rank groups shared by several test files.

Each launch of a group costs seconds of imports and process-group setup, so the parity-style
files (test_parity, test_zero, test_compile_tp) put their cases for the same number of
ranks into one group, launched once per session when a test first asks for it. Each file
still parametrizes its tests over its own table.
"""

from __future__ import annotations

import pytest
import test_compile_tp
import test_parity
import test_zero
from test_parity import _results


def _merged(*tables: dict) -> dict:
    merged: dict = {}
    for table in tables:
        clash = merged.keys() & table.keys()
        if clash:
            raise ValueError(f"case names used by two test files: {sorted(clash)}")
        merged.update(table)
    return merged


TWO_RANKS = _merged(test_parity.TWO_RANKS, test_zero.TWO_RANKS, test_compile_tp.TP2)
FOUR_RANKS = _merged(test_parity.FOUR_RANKS, test_zero.FOUR_RANKS, test_compile_tp.DP_SHARD2_TP2)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 1-process reference runs every parallel layout is compared with."""
    return _results(tmp_path_factory, "one_rank", 1, test_parity.ONE_RANK)


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _results(tmp_path_factory, "two_ranks", 2, TWO_RANKS)


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _results(tmp_path_factory, "four_ranks", 4, FOUR_RANKS)
