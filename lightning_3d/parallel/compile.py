"""``torch.compile`` per transformer block, and float8 matmuls through torchao.

Blocks are compiled one by one rather than the whole model: they are identical, so the
first block's compiled code serves the others, and the embedding, head and the
pipeline / FSDP2 hooks around the blocks stay eager. Applied after activation
checkpointing (compile traces the checkpointed forward) and before FSDP2.

The trade-off: a one-off compile time per process (tens of seconds on CPU) for faster
steps where kernels fuse (element-wise chains: norms, SwiGLU, RoPE); ``aot_eager`` checks
that a model traces without generating code.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional

import torch
from torch import nn

from lightning_3d.compat import compile_backends, dynamo_supported
from lightning_3d.plans.base import ParallelPlan

# inductor's CPU code is C++: it needs one of these on PATH (or $CXX)
_CPP_COMPILERS = ("g++", "c++", "clang++")


def compile_problems(compile: bool, backend: str, accelerator: str, tp: int = 1) -> list[str]:
    """Why ``perf.compile`` cannot work for this layout on this machine (none: it can)."""
    if not compile:
        return []
    if tp > 1:
        # measured on torch 2.13: a compiled block of DTensor layers fails in backward
        # (tp alone) or trains to different losses (with FSDP2)
        return [
            f"perf.compile=true with tensor parallel (parallel.tp={tp}) is not supported: compiled tensor-parallel "
            "blocks fail in backward or change the losses on torch 2.13; use perf.compile=false or parallel.tp=1"
        ]
    if not dynamo_supported():
        return ["perf.compile=true: torch.compile does not support this Python/platform; set perf.compile=false"]
    known = [name for name in compile_backends() if "TESTING" not in name]
    if backend not in known:
        return [f"perf.compile_backend={backend!r} is not a torch.compile backend; valid: {', '.join(known)}"]
    if backend == "inductor" and accelerator == "cpu" and not (os.environ.get("CXX") or any(map(shutil.which, _CPP_COMPILERS))):
        return [
            "perf.compile=true with the inductor backend on CPU needs a C++ compiler (none of "
            f"{', '.join(_CPP_COMPILERS)} on PATH and $CXX unset); install one, or set perf.compile_backend=aot_eager"
        ]
    return []


def apply_compile(model: nn.Module, plan: ParallelPlan, backend: str) -> None:
    """Replace each block of ``model`` with its compiled version (names gain ``_orig_mod.``, which
    state dicts and initialization strip)."""
    container = model.get_submodule(plan.blocks)
    for key, block in list(container.named_children()):
        container.register_module(key, torch.compile(block, backend=backend))


def float8_problems(float8: bool, accelerator: str, tp: int, capability: Optional[tuple[int, int]] = None) -> list[str]:
    """Why ``perf.float8`` cannot work here: it needs torchao, a CUDA GPU of compute capability 8.9+."""
    if not float8:
        return []
    problems = []
    if importlib.util.find_spec("torchao") is None:
        problems.append("perf.float8=true needs torchao: pip install 'lightning-3d[float8]'")
    if accelerator not in ("gpu", "cuda"):
        problems.append(f"perf.float8=true runs float8 matmuls on CUDA GPUs only; this run uses accelerator={accelerator!r}")
    elif capability is not None and capability < (8, 9):
        problems.append(f"perf.float8=true needs a GPU of compute capability 8.9+ (Ada, Hopper); this one has {capability[0]}.{capability[1]}")
    if tp > 1:
        problems.append(f"perf.float8=true is not supported with tensor parallel yet (parallel.tp={tp}); use tp=1")
    return problems


def apply_float8(model: nn.Module, plan: ParallelPlan) -> None:
    """Swap the blocks' linear layers for torchao's float8 training linears (dims divisible by 16)."""
    from torchao.float8 import convert_to_float8_training

    def eligible(module: nn.Module, name: str) -> bool:
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    for block in model.get_submodule(plan.blocks).children():
        convert_to_float8_training(block, module_filter_fn=eligible)
