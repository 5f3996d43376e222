"""``perf.compile=true`` with tensor parallel: compiled blocks train to the 1-process losses and weights.

Two things break a compiled tensor-parallel block on torch 2.13, and parallel/compile.py works
around both: the first block's input is still in flight from the embedding's async
reduce-scatter (its gradient was lost: backward failed on tp=2, FSDP2 trained to other losses),
and a compiled whole-block checkpoint around DTensor collectives fails in its first forward
(the block is compiled inside its checkpoint instead). Each group of ranks runs real gloo process groups on CPU; the
``aot_eager`` backend traces exactly what inductor traces without generating C++, which keeps
the test short (inductor is run by the commands in docs/performance.md).
"""

from __future__ import annotations

from test_parity import DEBUG, assert_parity

from lightning_3d.config import PerfConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.validation import perf_problems

COMPILE = ["perf.compile=true", "perf.compile_backend=aot_eager"]
TP2 = {
    # the first block's input is an in-flight collective: a plain compiled block
    "tp2_compile": DEBUG + ["parallel.dp_shard=1", "parallel.tp=2"] + COMPILE,
}
DP_SHARD2_TP2 = {
    # selective: blocks 0 and 2 compiled inside their checkpoints, 1 and 3 plainly; FSDP2 around both
    "dp_shard2_tp2_compile_ac_selective": DEBUG + ["parallel.dp_shard=2", "parallel.tp=2", "perf.activation_checkpoint=selective"] + COMPILE,
}


def test_compile_is_accepted_with_tensor_parallel() -> None:
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=2, pp=1, world_size=4)
    assert perf_problems(PerfConfig(compile=True, compile_backend="aot_eager", activation_checkpoint="full"), dims, "cpu") == []


def test_compiled_tensor_parallel_blocks_match_one_process(reference, two_ranks):
    assert_parity(two_ranks["tp2_compile"], reference["single"])


def test_compiled_checkpointed_blocks_under_fsdp2_and_tensor_parallel_match_one_process(reference, four_ranks):
    assert_parity(four_ranks["dp_shard2_tp2_compile_ac_selective"], reference["single"])
