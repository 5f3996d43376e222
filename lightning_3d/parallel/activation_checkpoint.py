"""Activation checkpointing: trade recomputation in backward for activation memory.

Modes (``perf.activation_checkpoint``):

- ``none``: every activation is kept for backward (fastest, most memory).
- ``full``: every block keeps only its input; its forward runs again in backward
  (about one extra forward: ~+33% compute, activation memory ~ one block's worth).
- ``selective``: ``full`` on every ``perf.ac_every``-th block (by its index in the
  whole model, so every layout checkpoints the same blocks): memory and time in between.
- ``op``: every block, per operator: outputs of matmuls, attention and collectives are
  kept, the cheap element-wise ops (norms, activations, RoPE) are recomputed — most of
  ``full``'s saving of small tensors at a fraction of its recompute, and no collective
  runs twice.

Each checkpointed block restores the forward's RNG state (CPU and device) before its
recomputation, so dropout draws the same masks in backward; a plan whose blocks draw no
random numbers sets ``ParallelPlan.random_free_blocks`` to skip that per-block save.

Applied after tensor/context parallel and before ``torch.compile`` and FSDP2, so the
FSDP unit is the checkpointed block and compile traces the checkpointed forward.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from lightning_3d.compat import checkpoint_wrapper
from lightning_3d.errors import ConfigError
from lightning_3d.plans.base import ParallelPlan

AC_MODES = ("none", "full", "selective", "op")


def _ops(namespace: Any, names: tuple[str, ...]) -> set[Any]:
    return {getattr(namespace, name).default for name in names if hasattr(namespace, name)}


# outputs worth keeping: expensive to recompute, or a collective that would run again
_SAVED_OPS = _ops(
    torch.ops.aten,
    (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    ),
) | _ops(torch.ops._c10d_functional, ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"))


def activation_checkpoint_problems(mode: str, every: int) -> list[str]:
    problems = []
    if mode not in AC_MODES:
        problems.append(f"perf.activation_checkpoint={mode!r} is not a mode; valid: {', '.join(AC_MODES)}")
    if every < 1:
        problems.append(f"perf.ac_every={every} must be >= 1 (selective checkpointing of every k-th block)")
    return problems


def _save_expensive_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _is_checkpointed(index: int, mode: str, every: int) -> bool:
    return mode in ("full", "op") or (mode == "selective" and index % every == 0)


def apply_activation_checkpointing(model: nn.Module, plan: ParallelPlan, mode: str, every: int) -> None:
    """Wrap the checkpointed blocks of ``model`` (the plan root or one pipeline stage) in place."""
    problems = activation_checkpoint_problems(mode, every)
    if problems:
        raise ConfigError("; ".join(problems))
    if mode == "none":
        return
    container = model.get_submodule(plan.blocks)
    for position, (key, block) in enumerate(list(container.named_children())):
        index = int(key) if key.isdigit() else position  # stages keep the whole model's keys
        if not _is_checkpointed(index, mode, every):
            continue
        # a recomputed dropout must draw the forward's numbers; stashing the RNG state is skipped
        # only where the plan vouches that the blocks draw none
        options: dict[str, Any] = {"preserve_rng_state": not plan.random_free_blocks}
        if mode == "op":
            options["context_fn"] = partial(create_selective_checkpoint_contexts, _save_expensive_ops)
        container.register_module(key, checkpoint_wrapper(block, **options))
