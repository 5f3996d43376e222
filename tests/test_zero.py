"""ZeRO stages by name (``parallel.zero_stage``) and gradient accumulation without per-micro-batch reductions.

Each stage, and each kind of data parallel with accumulated micro-batches, trains the debug
recipe on real gloo groups (tests/parity_worker.py) to the same per-step losses and final
weights as one process: a global batch of 16 as 2 accumulated micro-batches (or as one
batch) is the 1-process run on batches of 16. What each stage communicates is checked in
tests/test_comm.py; its memory is measured by ``python -m lightning_3d.bench.zero``.
"""

from __future__ import annotations

import pytest
import torch
from test_parity import DEBUG, assert_parity

from lightning_3d import ModelParallel4DStrategy
from lightning_3d.config import ParallelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.data_parallel import resolved_reshard_after_forward
from lightning_3d.validation import check_layout

BATCH16 = ["data.global_batch_size=16"]
ACCUMULATE2 = BATCH16 + ["trainer.accumulate_grad_batches=2"]
FSDP2 = ["parallel.dp_shard=2"]

TWO_RANKS = {
    **{f"zero{stage}_accumulate2": DEBUG + FSDP2 + ACCUMULATE2 + [f"parallel.zero_stage={stage}"] for stage in (1, 2, 3)},
    "zero1": DEBUG + FSDP2 + BATCH16 + ["parallel.zero_stage=1"],
    # no stage named: FSDP2 / DDP-style replicas reduce once per optimizer step
    "fsdp_accumulate2": DEBUG + FSDP2 + ACCUMULATE2,
    "ddp_accumulate2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=1"] + ACCUMULATE2,
}
HSDP = ["parallel.dp_replicate=2", "parallel.dp_shard=2"]
FOUR_RANKS = {
    # HSDP: nothing reduced until the last micro-batch; with ZeRO-3 the gradients are
    # reduce-scattered per micro-batch and only the replicas' all-reduce waits for the last
    "hsdp_accumulate2": DEBUG + HSDP + ACCUMULATE2,
    "hsdp_zero3_accumulate2": DEBUG + HSDP + ACCUMULATE2 + ["parallel.zero_stage=3"],
}


@pytest.fixture(scope="module")
def reference_batch16(reference):
    return reference["single_batch16"]  # DEBUG + BATCH16, among the shared 1-process runs


@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_two_rank_parity(case, reference_batch16, two_ranks):
    assert_parity(two_ranks[case], reference_batch16)
    assert two_ranks[case]["global_step"] == 6


@pytest.mark.parametrize("case", list(FOUR_RANKS))
def test_four_rank_parity(case, reference_batch16, four_ranks):
    assert_parity(four_ranks[case], reference_batch16)


def test_stages_end_on_the_same_optimizer_states(reference_batch16, two_ranks):
    # AdamW's moments are sharded in every stage; gathered, they are the 1-process ones
    name = "state.model.layers.0.attention.wq.weight.exp_avg_sq"
    for stage in (1, 2, 3):
        torch.testing.assert_close(two_ranks[f"zero{stage}_accumulate2"]["optimizer"][name], reference_batch16["optimizer"][name], rtol=1e-3, atol=1e-12)


# ----------------------------------------------------------------------------- the names, and bad input


@pytest.mark.parametrize("stage, pp, reshard", [(1, 1, False), (2, 1, False), (3, 1, True), (None, 1, True), (None, 2, False)])
def test_each_stage_sets_reshard_after_forward(stage, pp, reshard):
    assert resolved_reshard_after_forward(ParallelConfig(zero_stage=stage, pp=pp), pp) is reshard
    # the low-level switch may repeat the stage's value
    if stage is not None:
        check_layout(ParallelConfig(zero_stage=stage, reshard_after_forward=reshard), 2)


@pytest.mark.parametrize(
    "options, world_size, message",
    [
        (
            {"zero_stage": 3, "reshard_after_forward": False},
            2,
            "parallel.zero_stage=3 means reshard_after_forward=true, but parallel.reshard_after_forward=false",
        ),
        (
            {"zero_stage": 2, "reshard_after_forward": True},
            2,
            "parallel.zero_stage=2 means reshard_after_forward=false, but parallel.reshard_after_forward=true",
        ),
        ({"zero_stage": 2, "dp_replicate": 2, "dp_shard": 1}, 2, "dp_shard × cp = 1 × 1 = 1 rank: nothing to shard"),
        ({"zero_stage": 1, "dp_shard": 1, "tp": 2}, 2, "dp_shard × cp = 1 × 1 = 1 rank: nothing to shard"),
        ({"zero_stage": 4}, 2, r"parallel.zero_stage=4 is not one of \[1, 2, 3\]"),
        ({"zero_stage": 0}, 2, r"parallel.zero_stage=0 is not one of \[1, 2, 3\]"),
        ({"zero_stage": 3, "pp": 2, "dp_shard": 2}, 4, "parallel.zero_stage=3 with pp=2: the pipeline schedule"),
    ],
)
def test_bad_zero_stage_is_named(options, world_size, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(ParallelConfig(**options), world_size)


def test_cp_ranks_count_as_shards():
    # FSDP2 shards over dp_shard × cp: context parallel alone has something to shard
    check_layout(ParallelConfig(zero_stage=2, dp_shard=1, cp=2), 2)


def test_strategy_takes_zero_stage_as_keyword():
    assert ModelParallel4DStrategy(dp_shard=2, zero_stage=1).parallel.zero_stage == 1
