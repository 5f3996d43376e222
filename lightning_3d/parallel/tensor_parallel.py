"""Tensor (+ sequence) parallel: apply a plan's module → ParallelStyle dicts with DTensor."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from lightning_3d.parallel.tied import retie, tied_parameter_names
from lightning_3d.plans.base import ParallelPlan


def blocks_of(model: nn.Module, plan: ParallelPlan) -> list[nn.Module]:
    """The transformer blocks this model (or pipeline stage) holds, in order (none when the plan names none)."""
    return list(model.get_submodule(plan.blocks).children()) if plan.blocks else []


def present_module(model: nn.Module, name: str) -> nn.Module | None:
    """``model.<name>``, or None where a pipeline stage has dropped it (None, or an Identity placeholder)."""
    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        return None
    found = getattr(owner, attr, None)
    return None if isinstance(found, nn.Identity) else found


def apply_tensor_parallel(model: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh) -> None:
    """Shard each block with ``plan.block_tp``, then the rest with ``plan.top_tp``."""
    tied = tied_parameter_names(model)
    for block in blocks_of(model, plan):
        parallelize_module(block, tp_mesh, plan.block_tp)
    top_tp = {name: style for name, style in plan.top_tp.items() if present_module(model, name) is not None}
    if top_tp:
        parallelize_module(model, tp_mesh, top_tp)
    retie(model, tied)
