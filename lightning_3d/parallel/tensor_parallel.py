"""Tensor (+ sequence) parallel: apply a plan's module → ParallelStyle dicts with DTensor."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from lightning_3d.parallel.tied import retie, tied_parameter_names
from lightning_3d.plans.base import ParallelPlan


def blocks_of(root: nn.Module, plan: ParallelPlan) -> list[tuple[str, nn.Module]]:
    """(full name, module) of each transformer block, in order."""
    container = root.get_submodule(plan.blocks)
    return [(f"{plan.blocks}.{name}", block) for name, block in container.named_children()]


def apply_tensor_parallel(root: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh) -> None:
    """Shard each block with ``plan.block_tp``, then the rest with ``plan.top_tp``."""
    tied = tied_parameter_names(root)
    for _, block in blocks_of(root, plan):
        parallelize_module(block, tp_mesh, plan.block_tp)
    if plan.top_tp:
        parallelize_module(root, tp_mesh, plan.top_tp)
    retie(root, tied)
