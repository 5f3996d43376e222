"""Communication accounting on real gloo groups: measured calls and bytes against the analytic volumes.

One torchrun group of 2 ranks trains each layout for 2 steps of the debug recipe with the
CommAccounting callback (tests/comm_worker.py). In a 2-rank job every size-2 mesh dim is
the default process group itself, so a case's step lands on one label (its dim); the
analytic volumes keep the sources apart (the parallelism, the loss reduction, the step's
grad-norm check), which is how the ratios below are taken. With gradient accumulation a
step is the sum of its micro-batches. After the cases, the same group runs one op of each
kind under the counter (the sweep).
"""

from __future__ import annotations

import json

import pytest
from test_parity import DEBUG, _torchrun, pp
from test_parity import WORKER as PARITY_WORKER

from lightning_3d.comm import PARTIAL_GRAD_REDUCTIONS

WORKER = PARITY_WORKER.with_name("comm_worker.py")
STEPS = ["trainer.max_steps=2"]
ACCUMULATE4 = "trainer.accumulate_grad_batches=4"
TP = ["parallel.dp_shard=1", "parallel.tp=2"]
CASES = {
    "tp2": DEBUG + STEPS + TP + ["parallel.sequence_parallel=false"],
    "tp2_sp": DEBUG + STEPS + TP + ["parallel.sequence_parallel=true"],
    "tp2_dtensor": DEBUG + STEPS + TP + ["parallel.sequence_parallel=false", "perf.tp_local_linears=false"],
    "fsdp2": DEBUG + STEPS + ["parallel.dp_shard=2"],
    "fsdp2_no_reshard": DEBUG + STEPS + ["parallel.dp_shard=2", "parallel.reshard_after_forward=false"],
    "ddp2": DEBUG + STEPS + ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "pp2_1f1b": DEBUG + STEPS + pp(2, "1f1b") + ["parallel.dp_shard=1"],
    "cp2_ring": DEBUG + STEPS + ["parallel.cp=2", "parallel.dp_shard=1"],
    # data-parallel units of two blocks (a block holds 0.157 MiB), and DDP-style units of one block
    # (unset, DDP-style layouts group blocks into units of 25 MiB: here all four, with the root)
    "fsdp2_units_of_2_blocks": DEBUG + STEPS + ["parallel.dp_shard=2", "perf.dp_unit_min_mb=0.2"],
    "ddp2_unit_per_block": DEBUG + STEPS + ["parallel.dp_replicate=2", "parallel.dp_shard=1", "perf.dp_unit_min_mb=0"],
    # 4 micro-batches of 1 sequence per rank and optimizer step
    "fsdp2_accumulate4": DEBUG + STEPS + ["parallel.dp_shard=2", ACCUMULATE4],
    "ddp2_accumulate4": DEBUG + STEPS + ["parallel.dp_replicate=2", "parallel.dp_shard=1", ACCUMULATE4],
    **{f"fsdp2_zero{stage}_accumulate4": DEBUG + STEPS + ["parallel.dp_shard=2", f"parallel.zero_stage={stage}", ACCUMULATE4]
       for stage in (1, 2, 3)},
}

# the debug model (conf/model/debug.yaml) in fp32 bytes: 4 blocks, dim 64, ffn 128, vocab 512
BLOCK = 4 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)  # 164352
EMBEDDING = 4 * 512 * 64
HEAD = 4 * (64 + 512 * 64)  # final norm + output
PARAMS = 4 * BLOCK + EMBEDDING + HEAD  # 919808
ROOT = EMBEDDING + HEAD  # each smaller than a block: both in the root FSDP unit
# the step's one extra all-reduce: squared grad norm, token-loss sum, token count, the stop
# requests, and a loss and a grad flag per rank, fp64 (the training loss needs no collective of its own)
STEP_HEALTH = 8 * (4 + 2 * 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out_dir = tmp_path_factory.mktemp("comm")
    _torchrun(2, CASES, out_dir, worker=WORKER)
    results = {case: json.loads((out_dir / f"{case}.json").read_text()) for case in CASES}
    results["sweep"] = json.loads((out_dir / "sweep.json").read_text())
    return results


def last_step(runs: dict, case: str, rank: int = 0) -> dict:
    return runs[case][rank]["steps"][-1]


def wire(table: dict) -> float:
    return sum(volume["wire_bytes"] for volume in table.values())


def parallelism_wire(runs: dict, case: str) -> float:
    """Measured wire bytes of the last step, less the loss reduction and the step's health check."""
    by_source = runs[case][0]["expected_by_source"]
    return wire(last_step(runs, case)) - sum(wire(by_source.get(source, {})) for source in ("loss", "step_health"))


@pytest.mark.parametrize("case", list(CASES))
def test_measured_equals_analytic(case, runs):
    for rank, result in enumerate(runs[case]):
        assert len(result["steps"]) == 2
        assert result["steps"][-1] == result["expected"], f"rank {rank}"


def test_tensor_parallel_by_hand(runs):
    residual, logits = 8 * 32 * 64 * 4, 8 * 32 * 512 * 4  # batch 8 × seq 32 × dim / vocab
    # 2 all-reduces per block forward and 2 backward, the embedding's output, the head's input grad
    assert last_step(runs, "tp2") == {
        "tp/all_gather": {"count": 1, "bytes": logits, "wire_bytes": logits / 2},
        "tp/all_reduce": {"count": 18 + 1, "bytes": 18 * residual + STEP_HEALTH, "wire_bytes": 18 * residual + STEP_HEALTH},
    }
    # sequence parallel: each all-reduce becomes a reduce-scatter + an all-gather; the norm
    # weights' Partial gradients are all-reduced once each before the step (9 norms)
    norm_grads = PARTIAL_GRAD_REDUCTIONS * 9
    assert norm_grads == 9
    assert last_step(runs, "tp2_sp") == {
        "tp/all_gather": {"count": 18 + 1, "bytes": 18 * residual + logits, "wire_bytes": (18 * residual + logits) / 2},
        "tp/reduce_scatter": {"count": 18, "bytes": 18 * residual, "wire_bytes": 18 * residual / 2},
        "tp/all_reduce": {
            "count": norm_grads + 1,
            "bytes": norm_grads * 64 * 4 + STEP_HEALTH,
            "wire_bytes": norm_grads * 64 * 4 + STEP_HEALTH,
        },
    }
    # the activations move the same bytes either way
    by_source = runs["tp2_sp"][0]["expected_by_source"]
    assert parallelism_wire(runs, "tp2") == parallelism_wire(runs, "tp2_sp") - wire(by_source["sp_norm_grads"])


def test_each_collective_counted_once(runs):
    # The local tensor-parallel layers run eager c10d collectives (the embedding's and the blocks'
    # all-reduces, the head's logits all-gather). DTensor's path runs functional collectives,
    # which run c10d.allreduce_ underneath: seen once, as the functional op. Both paths count
    # the same calls and bytes per mesh dim.
    assert runs["tp2"][0]["ops"] == [
        "c10d._allgather_base_ all_gather 524288",
        f"c10d.allreduce_ all_reduce {STEP_HEALTH}",
        "c10d.allreduce_ all_reduce 65536",
    ]  # sorted as strings
    dtensor_ops = runs["tp2_dtensor"][0]["ops"]
    assert "_c10d_functional.all_reduce all_reduce 65536" in dtensor_ops
    assert "c10d.allreduce_ all_reduce 65536" not in dtensor_ops
    assert last_step(runs, "tp2_dtensor") == last_step(runs, "tp2")


def test_one_op_of_each_kind(runs):
    # 10 fp32 elements (40 bytes) on the default group of 2 ranks: (op, kind, bytes, wire bytes
    # on rank 0, on rank 1); functional collectives appear once, not again as their c10d op
    expected = [
        ("c10d.allreduce_", "all_reduce", 40, 40, 40),
        ("c10d.broadcast_", "broadcast", 40, 40, 40),
        ("c10d._allgather_base_", "all_gather", 80, 40, 40),
        ("c10d._reduce_scatter_base_", "reduce_scatter", 40, 20, 20),
        ("c10d.alltoall_base_", "all_to_all", 40, 20, 20),
        ("c10d.gather_", "gather", 80, 0, 40),  # rank 0 is the root
        ("c10d.scatter_", "scatter", 80, 40, 0),
        ("_c10d_functional.all_reduce", "all_reduce", 40, 40, 40),
        ("_c10d_functional.all_gather_into_tensor", "all_gather", 80, 40, 40),
        ("_c10d_functional.reduce_scatter_tensor", "reduce_scatter", 40, 20, 20),
        ("c10d.send", "send", 40, 40, 40),  # batch_isend_irecv: one send and one recv each
        ("c10d.recv_", "recv", 40, 0, 0),
        ("c10d.barrier", "barrier", 0, 0, 0),
    ]
    rank0, rank1 = runs["sweep"]
    assert [(op, kind, size, wire) for op, kind, _, size, wire in rank0] == [row[:4] for row in expected]
    assert [(op, kind, size, wire) for op, kind, _, size, wire in rank1] == [(*row[:3], row[4]) for row in expected]
    assert {dim for *_, dim, _, _ in rank0 + rank1} == {"world"}


def test_fsdp_by_hand(runs):
    # gloo on CPU: FSDP2 all-gathers with _allgather_base_ and reduce-scatters with
    # _reduce_scatter_base_, one per unit: 4 blocks and the root, which holds the embedding and
    # norm + head (each smaller than a block, so not a unit of its own)
    assert {op.split()[0] for op in runs["fsdp2"][0]["ops"]} == {
        "c10d._allgather_base_", "c10d._reduce_scatter_base_", "c10d.allreduce_"
    }
    # gathered in forward, and again in backward except the last block and the root (not resharded)
    gathered = 2 * PARAMS - BLOCK - ROOT
    assert last_step(runs, "fsdp2") == {
        "dp_shard/all_gather": {"count": 5 + 3, "bytes": gathered, "wire_bytes": gathered / 2},
        "dp_shard/reduce_scatter": {"count": 5, "bytes": PARAMS, "wire_bytes": PARAMS / 2},
        "dp_shard/all_reduce": {"count": 1, "bytes": STEP_HEALTH, "wire_bytes": STEP_HEALTH},
    }
    # DDP-style with a unit per block: one all-reduce per unit
    assert last_step(runs, "ddp2_unit_per_block")["dp_replicate/all_reduce"]["count"] == 5 + 1


def test_grouped_units_move_the_same_bytes_in_fewer_collectives(runs):
    # two units of two blocks and the root: gathered in forward, the first unit again in backward
    gathered = 2 * PARAMS - 2 * BLOCK - ROOT
    assert last_step(runs, "fsdp2_units_of_2_blocks") == {
        "dp_shard/all_gather": {"count": 3 + 1, "bytes": gathered, "wire_bytes": gathered / 2},
        "dp_shard/reduce_scatter": {"count": 3, "bytes": PARAMS, "wire_bytes": PARAMS / 2},
        "dp_shard/all_reduce": {"count": 1, "bytes": STEP_HEALTH, "wire_bytes": STEP_HEALTH},
    }
    # DDP-style, perf.dp_unit_min_mb unset: units of 25 MiB (DDP's buckets); the four blocks
    # (0.63 MiB) hold less, so they join the root: one unit
    assert last_step(runs, "ddp2")["dp_replicate/all_reduce"] == {
        "count": 1 + 1, "bytes": PARAMS + STEP_HEALTH, "wire_bytes": PARAMS + STEP_HEALTH,
    }
    assert parallelism_wire(runs, "ddp2") == parallelism_wire(runs, "ddp2_unit_per_block")


def test_fsdp_to_ddp_wire_ratio(runs):
    ddp = parallelism_wire(runs, "ddp2")
    assert ddp == PARAMS  # all-reduce on 2 ranks: 2·(n−1)/n·S = S
    # FSDP: (n−1)/n of the parameters gathered twice and of the gradients scattered once =
    # 1.5 × DDP, less the second gathers of the last block and the root (embedding, norm + head)
    ratio = parallelism_wire(runs, "fsdp2") / ddp
    assert ratio == pytest.approx(1.5 - 0.5 * (BLOCK + ROOT) / PARAMS, rel=1e-12)
    assert 1.25 < ratio < 1.5
    assert parallelism_wire(runs, "fsdp2_no_reshard") / ddp == 1.0


def test_pipeline_and_ring_by_hand(runs):
    microbatch = 4 * 32 * 64 * 4  # 2 microbatches of 4 sequences
    for rank in (0, 1):  # stage 0 sends activations and receives grads; stage 1 the reverse
        step = last_step(runs, "pp2_1f1b", rank)
        assert step["pp/send"] == {"count": 2, "bytes": 2 * microbatch, "wire_bytes": 2 * microbatch}
        assert step["pp/recv"] == {"count": 2, "bytes": 2 * microbatch, "wire_bytes": 0}
    # the first step also sends the stages' shape metadata
    first = runs["pp2_1f1b"][0]["steps"][0]["pp/send"]["count"]
    assert first > 2
    # ring attention, per block: K and V 1 hop forward; K, V 1 hop and dK, dV 2 hops backward
    kv = 8 * 4 * 16 * 16 * 4  # batch × kv heads × 16 local tokens × head dim
    step = last_step(runs, "cp2_ring")
    assert step["cp/send"] == {"count": 4 * 8, "bytes": 4 * 8 * kv, "wire_bytes": 4 * 8 * kv}
    assert step["cp/all_gather"]["count"] == 8  # FSDP2 shards over dp_shard × cp


def test_steps_repeat_and_metrics_are_logged(runs):
    for case in CASES:
        results = runs[case]
        if case != "pp2_1f1b":
            assert results[0]["steps"][0] == results[0]["steps"][1], case
        # the callback logs each training batch: with accumulation, a step's last micro-batch
        last_batch = results[0]["microbatches"][-1]
        for dim in {key.split("/")[0] for key in last_batch}:
            logged = results[0]["logged"][f"comm/{dim}_bytes"]
            assert logged == sum(v["bytes"] for k, v in last_batch.items() if k.startswith(f"{dim}/"))


def data_parallel_step(runs: dict, case: str) -> dict:
    """The last step's measured totals less the loss reductions and the step's health check
    (their analytic volumes, each its own source): what data parallel moved."""
    step = {key: dict(volume) for key, volume in last_step(runs, case).items()}
    for source in ("loss", "step_health"):
        for key, volume in runs[case][0]["expected_by_source"].get(source, {}).items():
            step[key] = {field: step[key][field] - volume[field] for field in volume}
    return {key: volume for key, volume in step.items() if volume["count"]}


def test_accumulated_micro_batches_reduce_gradients_once_per_step(runs):
    # accumulate_grad_batches=4: the gradients are reduce-scattered (FSDP2) or all-reduced
    # (DDP-style) on the step's last micro-batch only, not on each of the 4
    gathered = 2 * PARAMS - BLOCK - ROOT  # FSDP2 still gathers the units for every micro-batch
    fsdp = {
        "dp_shard/all_gather": {"count": 4 * 8, "bytes": 4 * gathered, "wire_bytes": 4 * gathered / 2},
        "dp_shard/reduce_scatter": {"count": 5, "bytes": PARAMS, "wire_bytes": PARAMS / 2},
    }
    assert data_parallel_step(runs, "fsdp2_accumulate4") == fsdp
    assert runs["fsdp2_accumulate4"][0]["expected_by_source"]["data_parallel"] == fsdp
    assert data_parallel_step(runs, "fsdp2_accumulate4")["dp_shard/reduce_scatter"] == data_parallel_step(runs, "fsdp2")["dp_shard/reduce_scatter"]
    assert data_parallel_step(runs, "ddp2_accumulate4") == data_parallel_step(runs, "ddp2") == {
        "dp_replicate/all_reduce": {"count": 1, "bytes": PARAMS, "wire_bytes": PARAMS},
    }
    # only the step's last micro-batch reduces gradients
    micro_batches = runs["fsdp2_accumulate4"][0]["microbatches"][-4:]
    assert [("dp_shard/reduce_scatter" in batch) for batch in micro_batches] == [False, False, False, True]
    # the step's other collective: the health check (which also carries the loss), once per step
    for case, single in (("fsdp2_accumulate4", "fsdp2"), ("ddp2_accumulate4", "ddp2")):
        accumulated, one = runs[case][0]["expected_by_source"], runs[single][0]["expected_by_source"]
        assert accumulated["step_health"] == one["step_health"]
        assert "loss" not in accumulated and "loss" not in one


def test_zero_stages_under_accumulation(runs):
    # 4 micro-batches per step on dp_shard=2. ZeRO-1: gathered once, reduced once (whole
    # gradients meanwhile); ZeRO-2: gathered once, reduce-scattered per micro-batch; ZeRO-3:
    # gathered for every forward and backward, reduce-scattered per micro-batch
    def volume(stage: int, kind: str) -> tuple[int, float]:
        entry = last_step(runs, f"fsdp2_zero{stage}_accumulate4")[f"dp_shard/{kind}"]
        return entry["count"], entry["bytes"]

    assert volume(1, "all_gather") == volume(2, "all_gather") == (5, PARAMS)
    assert volume(3, "all_gather") == (4 * 8, 4 * (2 * PARAMS - BLOCK - ROOT))
    assert volume(1, "reduce_scatter") == (5, PARAMS)
    assert volume(2, "reduce_scatter") == volume(3, "reduce_scatter") == (4 * 5, 4 * PARAMS)
