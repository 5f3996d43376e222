"""Context-parallel attention (ring and all-gather) against full SDPA, on real gloo groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_parity import FORK_LAUNCH

from lightning_3d.parallel.context_parallel import balanced_positions, shard_sequence

WORKER = Path(__file__).with_name("context_parallel_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=lambda cp: f"cp{cp}")
def op_results(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_op") / "results.json"
    command = [sys.executable, str(FORK_LAUNCH), str(request.param), str(WORKER), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("backend", ["ring", "allgather"])
@pytest.mark.parametrize("mask", ["causal", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_matches_full_attention(op_results, backend, mask, kv_heads):
    for rank, results in enumerate(op_results):
        diffs = results[f"{backend}/{mask}/kv{kv_heads}"]
        assert set(diffs) == {"out", "dq", "dk", "dv"}
        assert max(diffs.values()) < TOLERANCE, (rank, diffs)


def test_load_balanced_chunks_and_positions():
    sequence = torch.arange(16)[None]
    # cp=2: 4 chunks of 4 tokens; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    assert shard_sequence(sequence, 0, 2).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard_sequence(sequence, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    for rank in range(2):
        assert torch.equal(balanced_positions(8, rank, 2), shard_sequence(sequence, rank, 2))
