"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest
from test_parity import ONE_RANK, _results


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The 1-process reference runs (test_parity.ONE_RANK), launched once for every file that
    compares a parallel layout with them: each launch costs seconds of imports."""
    return _results(tmp_path_factory, "one_rank", 1, ONE_RANK)
