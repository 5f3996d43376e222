"""Tensor (+ sequence) parallel: apply a plan's module → ParallelStyle dicts with DTensor.

Parameters are always DTensors (what checkpoints, FSDP2 and the optimizer see). With
``local_linears`` (``perf.tp_local_linears``) the modules under torch's own styles also compute
with plain tensors: a plain ``nn.Linear`` under ``ColwiseParallel`` / ``RowwiseParallel`` takes
the local shards with ``to_local`` and calls ``F.linear`` once; a norm under ``SequenceParallel``
runs its own forward on the local tokens with local parameters. DTensor is used only where data
crosses ranks (``redistribute``) or a gradient must be marked a partial sum, so every result and
gradient is DTensor's own, but the matmuls, norms, transposes and views skip DTensor's per-op
sharding propagation, forward and backward.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lightning_3d.parallel.tied import retie, tied_parameter_names
from lightning_3d.plans.base import ParallelPlan

_REPLICATE = (Replicate(),)
_PARTIAL = (Partial(),)
_LAST_DIM = (Shard(-1),)


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


def apply_tensor_parallel(model: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh, local_linears: bool = True) -> None:
    """Shard each block with ``plan.block_tp``, then the rest with ``plan.top_tp``; with
    ``local_linears`` plain linear layers under torch's column-/row-wise styles multiply local shards."""
    tied = tied_parameter_names(model)
    for block in blocks_of(model, plan):
        parallelize_module(block, tp_mesh, _styles(block, plan.block_tp, local_linears))
    top_tp = {name: style for name, style in plan.top_tp.items() if present_module(model, name) is not None}
    if top_tp:
        parallelize_module(model, tp_mesh, _styles(model, top_tp, local_linears))
    retie(model, tied)


def _styles(owner: nn.Module, styles: dict[str, ParallelStyle], local_linears: bool) -> dict[str, ParallelStyle]:
    if not local_linears:
        return styles
    swapped: dict[str, ParallelStyle] = {}
    for name, style in styles.items():
        try:
            target = owner.get_submodule(name)
        except AttributeError:  # a wildcard name: parallelize_module resolves it, with the style as given
            target = None
        # exact types only: a style subclass (float8's, a user's) keeps its own behaviour
        local = _LOCAL_STYLES[type(style)].from_style(style) if type(style) in _LOCAL_STYLES else None
        swapped[name] = local if local is not None and local.fits(target) else style
    return swapped


class _LocalCompute:
    """Shards a module's parameters as the parent style does, then replaces its forward with one
    on local tensors; a module the local forward does not fit gets the parent style as it is."""

    def fits(self, module: nn.Module | None) -> bool:
        raise NotImplementedError

    def _partition_fn(self) -> Callable[[str, nn.Module, DeviceMesh], None]:
        raise NotImplementedError

    def _forward(self, module: nn.Module, mesh: DeviceMesh) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not self.fits(module):
            return super()._apply(module, device_mesh)
        distribute_module(module, device_mesh, self._partition_fn())
        module.forward = self._forward(module, device_mesh)
        return module


class _LocalLinear(_LocalCompute):
    def fits(self, module: nn.Module | None) -> bool:
        return type(module) is nn.Linear  # a Linear subclass keeps its own forward

    def _partition_fn(self) -> Callable[[str, nn.Module, DeviceMesh], None]:
        return self._partition_linear_fn

    @classmethod
    def from_style(cls, style: ColwiseParallel | RowwiseParallel) -> ParallelStyle:
        local = cls(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                    use_local_output=style.use_local_output)
        local.src_data_rank = style.src_data_rank
        return local


class LocalColwiseLinear(_LocalLinear, ColwiseParallel):
    """``ColwiseParallel`` for ``nn.Linear``: weight and bias Shard(0), output Shard(-1); the input
    is made whole (Replicate) and its gradient, a partial sum on each rank, reduced by DTensor."""

    def _forward(self, module: nn.Linear, mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
        input_layouts, output_layouts, use_local = self.input_layouts, self.output_layouts, self.use_local_output

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, input_layouts, run_check=False)
            if x.placements != _REPLICATE:
                x = x.redistribute(mesh, _REPLICATE)
            bias = module.bias.to_local() if module.bias is not None else None
            y = F.linear(x.to_local(grad_placements=_PARTIAL), module.weight.to_local(), bias)
            if output_layouts == _LAST_DIM and use_local:
                return y
            y = DTensor.from_local(y, mesh, _LAST_DIM, run_check=False)
            if y.placements != output_layouts:
                y = y.redistribute(mesh, output_layouts)
            return y.to_local() if use_local else y

        return forward


class LocalRowwiseLinear(_LocalLinear, RowwiseParallel):
    """``RowwiseParallel`` for ``nn.Linear``: weight Shard(1), bias Replicate; the input is the
    local Shard(-1) slice, the product a partial sum that DTensor reduces into ``output_layouts``."""

    def _forward(self, module: nn.Linear, mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
        input_layouts, output_layouts, use_local = self.input_layouts, self.output_layouts, self.use_local_output

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not isinstance(x, DTensor) and input_layouts != _LAST_DIM:
                x = DTensor.from_local(x, mesh, input_layouts, run_check=False)
            if isinstance(x, DTensor):
                x = (x if x.placements == _LAST_DIM else x.redistribute(mesh, _LAST_DIM)).to_local()
            y = DTensor.from_local(F.linear(x, module.weight.to_local()), mesh, _PARTIAL, run_check=False)
            y = y.redistribute(mesh, output_layouts)
            if module.bias is not None:
                y = y + module.bias
            return y.to_local() if use_local else y

        return forward


class LocalSequenceParallel(_LocalCompute, SequenceParallel):
    """``SequenceParallel`` for a module whose parameters are all its own (a norm): parameters
    Replicate; the module's forward runs on this rank's slice of the sequence with plain local
    parameters, whose gradients are marked partial sums (each rank saw other tokens), as
    DTensor's path leaves them for the step to reduce."""

    def fits(self, module: nn.Module | None) -> bool:
        return module is not None and next(module.children(), None) is None

    def _partition_fn(self) -> Callable[[str, nn.Module, DeviceMesh], None]:
        return self._replicate_module_fn

    @classmethod
    def from_style(cls, style: SequenceParallel) -> ParallelStyle:
        local = cls(sequence_dim=style.sequence_sharding[0].dim, use_local_output=style.use_local_output)
        local.src_data_rank = style.src_data_rank
        return local

    def _forward(self, module: nn.Module, mesh: DeviceMesh) -> Callable[..., torch.Tensor]:
        run, sharding, use_local = module.forward, self.sequence_sharding, self.use_local_output

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if isinstance(x, DTensor):
                x = (x if x.placements == sharding else x.redistribute(mesh, sharding)).to_local()
            # the module reads its parameters as attributes: plain local views for this call
            params = dict(module._parameters)
            try:
                for name, param in params.items():
                    if param is not None:
                        module._parameters[name] = param.to_local(grad_placements=_PARTIAL)
                y = run(x, *args, **kwargs)
            finally:
                module._parameters.update(params)
            return y if use_local else DTensor.from_local(y, mesh, sharding, run_check=False)

        return forward


_LOCAL_STYLES: dict[type, Any] = {
    ColwiseParallel: LocalColwiseLinear,
    RowwiseParallel: LocalRowwiseLinear,
    SequenceParallel: LocalSequenceParallel,
}
