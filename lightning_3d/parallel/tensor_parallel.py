"""Tensor (+ sequence) parallel: apply a plan's module → ParallelStyle dicts with DTensor."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from lightning_3d.plans.base import ParallelPlan


def blocks_of(root: nn.Module, plan: ParallelPlan) -> list[tuple[str, nn.Module]]:
    """(full name, module) of each transformer block, in order."""
    container = root.get_submodule(plan.blocks)
    return [(f"{plan.blocks}.{name}", block) for name, block in container.named_children()]


def _tied_parameter_names(root: nn.Module) -> list[list[str]]:
    """Groups of names that refer to one shared parameter (e.g. tied embedding/output)."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    return [names for names in names_by_param.values() if len(names) > 1]


def _retie(root: nn.Module, tied: list[list[str]]) -> None:
    # parallelize_module replaces each module's parameters with new DTensor parameters,
    # which silently unties a shared weight; point every alias back at the first one.
    for first, *aliases in tied:
        shared = root.get_parameter(first)
        for alias in aliases:
            owner_name, _, param_name = alias.rpartition(".")
            setattr(root.get_submodule(owner_name), param_name, shared)


def apply_tensor_parallel(root: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh) -> None:
    """Shard each block with ``plan.block_tp``, then the rest with ``plan.top_tp``."""
    tied = _tied_parameter_names(root)
    for _, block in blocks_of(root, plan):
        parallelize_module(block, tp_mesh, plan.block_tp)
    if plan.top_tp:
        parallelize_module(root, tp_mesh, plan.top_tp)
    _retie(root, tied)
