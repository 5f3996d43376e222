"""Speed levers: which blocks each activation-checkpointing mode wraps, and every lever's bad input.

Parity of the levers themselves (the same losses with them on) is in tests/test_parity.py.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from lightning_3d.config import ModelConfig, ParallelConfig, PerfConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.models.llama import Transformer
from lightning_3d.parallel.activation_checkpoint import AC_MODES, apply_activation_checkpointing
from lightning_3d.parallel.compile import apply_compile
from lightning_3d.parallel.materialize import canonical_name
from lightning_3d.parallel.pipeline_parallel import cut_stage
from lightning_3d.plans import llama_plan
from lightning_3d.validation import Hardware, perf_problems

MODEL = ModelConfig(n_layers=6, dim=32, n_heads=4, vocab_size=64)


def _model() -> Transformer:
    with torch.device("meta"):
        return Transformer(MODEL)


def _checkpointed(model: torch.nn.Module) -> list[str]:
    return [key for key, block in model.layers.items() if isinstance(block, CheckpointWrapper)]


@pytest.mark.parametrize(
    "mode, every, expected",
    [
        ("none", 2, []),
        ("full", 2, ["0", "1", "2", "3", "4", "5"]),
        ("op", 2, ["0", "1", "2", "3", "4", "5"]),
        ("selective", 2, ["0", "2", "4"]),
        ("selective", 3, ["0", "3"]),
        ("selective", 1, ["0", "1", "2", "3", "4", "5"]),
    ],
)
def test_each_mode_checkpoints_the_blocks_it_names(mode: str, every: int, expected: list[str]) -> None:
    model = _model()
    apply_activation_checkpointing(model, llama_plan(MODEL, ParallelConfig(), root=""), mode, every)
    assert _checkpointed(model) == expected


def test_selective_counts_blocks_of_the_whole_model_on_a_pipeline_stage() -> None:
    # the second stage holds blocks 3, 4, 5: every layout checkpoints blocks 0 and 3
    plan = llama_plan(MODEL, ParallelConfig(pp=2), root="")
    stage = cut_stage(_model(), plan, [3, 4, 5], is_first=False, is_last=True)
    apply_activation_checkpointing(stage, plan, "selective", 3)
    assert _checkpointed(stage) == ["3"]


def test_wrapped_blocks_keep_their_names_in_checkpoints_and_initialization() -> None:
    plain = _model()
    wrapped = _model()
    plan = llama_plan(MODEL, ParallelConfig(), root="")
    apply_activation_checkpointing(wrapped, plan, "full", 1)
    apply_compile(wrapped, plan, "eager")
    names = list(plain.state_dict())
    assert "layers.0._orig_mod._checkpoint_wrapped_module.attention.wq.weight" in dict(wrapped.named_parameters())
    assert sorted(get_model_state_dict(wrapped)) == sorted(names)  # what checkpoints store
    assert [canonical_name(name) for name, _ in wrapped.named_parameters()] == names  # what initialization sees


DIMS_DP2 = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, tp=1, pp=1, world_size=2)
DIMS_DDP2 = ParallelDims(dp_replicate=2, dp_shard=1, cp=1, tp=1, pp=1, world_size=2)
DIMS_TP2 = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=2, pp=1, world_size=2)
H100 = Hardware(cuda_devices=1, bf16=True, name="NVIDIA H100 80GB HBM3", capability=(9, 0))
A100 = Hardware(cuda_devices=1, bf16=True, name="NVIDIA A100-SXM4-80GB", capability=(8, 0))


@pytest.mark.parametrize(
    "perf, dims, accelerator, hardware, expected",
    [
        (PerfConfig(activation_checkpoint="partial"), DIMS_DP2, "cpu", None,
         "perf.activation_checkpoint='partial' is not a mode; valid: none, full, selective, op"),
        (PerfConfig(activation_checkpoint="selective", ac_every=0), DIMS_DP2, "cpu", None, "perf.ac_every=0 must be >= 1"),
        (PerfConfig(compile=True, compile_backend="inductr"), DIMS_DP2, "cpu", None,
         "perf.compile_backend='inductr' is not a torch.compile backend; valid: aot_eager"),
        (PerfConfig(float8=True), DIMS_DP2, "cpu", None,
         "perf.float8=true runs float8 matmuls on CUDA GPUs only; this run uses accelerator='cpu'"),
        (PerfConfig(float8=True), DIMS_DP2, "gpu", A100, "needs a GPU of compute capability 8.9+ (Ada, Hopper); this one has 8.0"),
        (PerfConfig(float8=True), DIMS_TP2, "gpu", H100, "perf.float8=true is not supported with tensor parallel yet (parallel.tp=2)"),
        (PerfConfig(fsdp_prefetch=0), DIMS_DP2, "cpu", None, "perf.fsdp_prefetch=0 must be >= 1"),
        (PerfConfig(cpu_offload=True), DIMS_DDP2, "cpu", None,
         "perf.cpu_offload=true offloads FSDP2 shards, but dp_shard × cp = 1 × 1 = 1 keeps whole replicas"),
        (PerfConfig(peak_flops=0.0), DIMS_DP2, "cpu", None, "perf.peak_flops=0.0 must be > 0"),
    ],
)
def test_bad_lever_names_the_problem(perf, dims, accelerator, hardware, expected) -> None:
    problems = perf_problems(perf, dims, accelerator, hardware)
    assert any(expected in problem for problem in problems), problems


def test_float8_without_torchao_says_how_to_install_it() -> None:
    try:
        import torchao  # noqa: F401
    except ImportError:
        problems = perf_problems(PerfConfig(float8=True), DIMS_DP2, "gpu", H100)
        assert problems == ["perf.float8=true needs torchao: pip install 'lightning-3d[float8]'"]
    else:
        assert perf_problems(PerfConfig(float8=True), DIMS_DP2, "gpu", H100) == []


def test_inductor_on_cpu_without_a_cpp_compiler_suggests_aot_eager(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    problems = perf_problems(PerfConfig(compile=True), DIMS_DP2, "cpu")
    assert len(problems) == 1 and re.search(r"needs a C\+\+ compiler .* set perf.compile_backend=aot_eager", problems[0])
    assert perf_problems(PerfConfig(compile=True, compile_backend="aot_eager"), DIMS_DP2, "cpu") == []


def test_good_levers_have_no_problems() -> None:
    for mode in AC_MODES:
        assert perf_problems(PerfConfig(activation_checkpoint=mode, compile=True, fsdp_prefetch=2, cpu_offload=True), DIMS_DP2, "cpu") == []
