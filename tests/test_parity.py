"""Loss and weight parity: the debug recipe on 1 process vs every parallel layout.

Each group of ranks is launched once with torchrun (real gloo process groups on CPU) and
trains several layouts one after another (tests/parity_worker.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("parity_worker.py")
DEBUG = ["recipe=debug"]
TIED = ["model.tie_embeddings=true"]

ONE_RANK = {"single": DEBUG, "single_tied": DEBUG + TIED}
TWO_RANKS = {
    "dp_shard2": DEBUG + ["parallel.dp_shard=2"],
    "tp2": DEBUG + ["parallel.dp_shard=1", "parallel.tp=2"],
    "ddp2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "dp_shard2_bf16_mixed": DEBUG + ["parallel.dp_shard=2", "trainer.precision=bf16-mixed"],
    "tp2_bf16_true": DEBUG + ["parallel.tp=2", "trainer.precision=bf16-true"],
}
FOUR_RANKS = {
    "dp_shard2_tp2": DEBUG + ["parallel.dp_shard=2", "parallel.tp=2"],
    "hsdp2x2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "tp4_loss_parallel": DEBUG + ["parallel.tp=4", "parallel.loss_parallel=true"],
    "ddp2_tp2_no_sp": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.tp=2", "parallel.sequence_parallel=false"],
    "dp_shard4_no_reshard": DEBUG + ["parallel.dp_shard=4", "parallel.reshard_after_forward=false"],
    "dp_shard2_tp2_tied": DEBUG + TIED + ["parallel.dp_shard=2", "parallel.tp=2"],
}
TWO_NODES = {"two_nodes_hsdp2x2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=2"]}

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(nproc: int, cases: dict[str, list[str]], out_dir: Path, nnodes: int = 1) -> None:
    """Launch ``nnodes`` torchrun agents on this machine and wait for all of them."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = []
    for node_rank in range(nnodes):
        rendezvous = (
            ["--standalone"]
            if nnodes == 1
            else ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        )
        command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc), str(WORKER)]
        log = open(out_dir / f"node{node_rank}.log", "w")
        agents.append((subprocess.Popen([*command, str(out_dir), json.dumps(cases)], stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = []
    for process, log in agents:
        if process.wait(timeout=600) != 0:
            failed.append(log.name)
        log.close()
    if failed:
        tails = "\n".join(Path(name).read_text()[-4000:] for name in failed)
        pytest.fail(f"torchrun group failed ({failed}):\n{tails}")


def _results(tmp_path_factory: pytest.TempPathFactory, name: str, nproc: int, cases: dict, nnodes: int = 1) -> dict:
    out_dir = tmp_path_factory.mktemp(name)
    _torchrun(nproc, cases, out_dir, nnodes)
    results = {case: torch.load(out_dir / f"{case}.pt", weights_only=True) for case in cases}
    results["collectives"] = torch.load(out_dir / "collectives.pt", weights_only=True)
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _results(tmp_path_factory, "one_rank", 1, ONE_RANK)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _results(tmp_path_factory, "two_ranks", 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _results(tmp_path_factory, "four_ranks", 4, FOUR_RANKS)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    return _results(tmp_path_factory, "two_nodes", 2, TWO_NODES, nnodes=2)


def _reference_for(case: str, reference: dict) -> dict:
    return reference["single_tied" if case.endswith("_tied") else "single"]


def assert_parity(result: dict, expected: dict) -> None:
    losses, expected_losses = torch.tensor(result["losses"]), torch.tensor(expected["losses"])
    assert len(losses) == 6
    torch.testing.assert_close(losses, expected_losses, rtol=LOSS_RTOL, atol=0.0)
    torch.testing.assert_close(result["val_loss"], expected["val_loss"], rtol=LOSS_RTOL, atol=0.0)
    assert result["weights"].keys() == expected["weights"].keys()
    for name, weight in result["weights"].items():
        torch.testing.assert_close(weight, expected["weights"][name], rtol=0.0, atol=WEIGHT_ATOL, msg=lambda m: f"{name}: {m}")


def test_reference_learns(reference):
    losses = reference["single"]["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("case", [c for c in TWO_RANKS if "bf16" not in c])
def test_two_rank_parity(case, reference, two_ranks):
    assert_parity(two_ranks[case], _reference_for(case, reference))


@pytest.mark.parametrize("case", list(FOUR_RANKS))
def test_four_rank_parity(case, reference, four_ranks):
    assert_parity(four_ranks[case], _reference_for(case, reference))


@pytest.mark.parametrize("case", [c for c in TWO_RANKS if "bf16" in c])
def test_bf16_tracks_fp32(case, reference, two_ranks):
    # bf16 rounds every matmul input: close to the fp32 run, not equal
    losses = torch.tensor(two_ranks[case]["losses"])
    torch.testing.assert_close(losses, torch.tensor(reference["single"]["losses"]), rtol=3e-2, atol=0.0)
    assert all(w.dtype == torch.float32 for w in two_ranks[case]["weights"].values())


def test_two_node_loopback_parity(reference, two_nodes):
    assert_parity(two_nodes["two_nodes_hsdp2x2"], reference["single"])



def test_tied_weights_stay_tied(reference, four_ranks):
    for result in (reference["single_tied"], four_ranks["dp_shard2_tp2_tied"]):
        assert torch.equal(result["weights"]["output.weight"], result["weights"]["tok_embeddings.weight"])


def test_strategy_collectives_and_mesh(four_ranks):
    # the last 4-rank case is dp_shard=2 × tp=2: tp is the innermost mesh dim, so ranks
    # 0,1 load data-parallel slice 0 and ranks 2,3 slice 1
    records = four_ranks["collectives"]
    assert [r["reduce_sum"] for r in records] == [6.0] * 4
    assert [r["reduce_mean"] for r in records] == [1.5] * 4
    assert [r["all_gather"] for r in records] == [[0, 1, 2, 3]] * 4
    assert [r["broadcast"] for r in records] == [{"from": 0}] * 4
    assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": dp} for dp in (0, 0, 1, 1)]
    assert records[0]["mesh_dims"] == ("pp", "dp_replicate", "dp_shard", "cp", "tp")
