"""``torch.compile`` per transformer block, and float8 matmuls through torchao.

Blocks are compiled one by one rather than the whole model: they are identical, so the
first block's compiled code serves the others, and the embedding, head and the
pipeline / FSDP2 hooks around the blocks stay eager. Applied after activation
checkpointing (compile traces the checkpointed forward) and before FSDP2; under tensor
parallel a fully checkpointed block is compiled inside its checkpoint instead.

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
from torch.distributed.tensor import DTensor

from lightning_3d.compat import (
    AsyncCollectiveTensor,
    CheckpointWrapper,
    compile_backends,
    dynamo_supported,
    wait_tensor,
)
from lightning_3d.plans.base import ParallelPlan

# inductor's CPU code is C++: it needs one of these on PATH (or $CXX)
_CPP_COMPILERS = ("g++", "c++", "clang++")


def compile_problems(compile: bool, backend: str, accelerator: str) -> list[str]:
    """Why ``perf.compile`` cannot work on this machine (none: it can)."""
    if not compile:
        return []
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


def _finish_collectives(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Wait, in eager mode, for every input still in flight from an asynchronous collective.

    Under tensor parallel the embedding's output reaches the first block as the local tensor
    of an async reduce-scatter (all-reduce without sequence parallel): an
    ``AsyncCollectiveTensor``. torch 2.13 hands a compiled region such an input as its inner
    tensor, which has no autograd history, so the block's input gradient never reaches the
    embedding: backward fails (tp alone) or the embedding trains on a wrong gradient (with
    FSDP2). ``wait_tensor`` gives the finished tensor with an identity backward instead.
    """

    def finished(value: object) -> object:
        return wait_tensor(value) if isinstance(value, AsyncCollectiveTensor) else value

    return tuple(finished(arg) for arg in args), {key: finished(value) for key, value in kwargs.items()}


def _compiled(module: nn.Module, backend: str) -> nn.Module:
    compiled = torch.compile(module, backend=backend)
    # a hook of the compiled wrapper runs eagerly, before the compiled code sees the inputs
    compiled.register_forward_pre_hook(_finish_collectives, with_kwargs=True)
    return compiled


def _whole_block_checkpoint_of_dtensors(block: nn.Module) -> bool:
    """A tensor-parallel block under full activation checkpointing (no per-op policy).

    torch 2.13 cannot compile such a checkpoint around the block: the recomputation needs the
    device mesh of the block's collectives, which AOTAutograd tries to save as a tensor
    ("expected all tensors_saved_with_vc_check to be Tensors"). Compiled inside the
    checkpoint, the block trains to the same losses, and the recomputation reruns the
    compiled forward; per-op checkpointing (which keeps the collectives' outputs) compiles whole.
    """
    return (
        isinstance(block, CheckpointWrapper)
        and "context_fn" not in block.checkpoint_fn.keywords
        and any(isinstance(param, DTensor) for param in block.parameters())
    )


def apply_compile(model: nn.Module, plan: ParallelPlan, backend: str) -> None:
    """Replace each block of ``model`` with its compiled version (names gain ``_orig_mod.``, which
    state dicts and initialization strip)."""
    container = model.get_submodule(plan.blocks)
    for key, block in list(container.named_children()):
        if _whole_block_checkpoint_of_dtensors(block):
            # compiled in place (names unchanged); the hook sits on the eager checkpoint around it.
            # Static shapes: the recomputation must run the graph the forward ran, not a dynamic
            # one compiled in between (it saves other tensors: CheckpointError)
            block._checkpoint_wrapped_module.compile(backend=backend, dynamic=False)
            block.register_forward_pre_hook(_finish_collectives, with_kwargs=True)
        else:
            container.register_module(key, _compiled(block, backend))


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
