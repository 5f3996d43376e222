"""Tensor (+ sequence) parallel: apply a plan's module → ParallelStyle dicts with DTensor.

Parameters are always DTensors (what checkpoints, FSDP2 and the optimizer see). With
``local_linears`` (``perf.tp_local_linears``) the modules under torch's own styles also compute
with plain tensors: a plain ``nn.Linear`` under ``ColwiseParallel`` / ``RowwiseParallel`` calls
``F.linear`` once on its local shards; a norm under ``SequenceParallel`` runs its own forward on
the local tokens with local parameters; an ``nn.Embedding`` under ``RowwiseParallel`` looks up
its own block of rows. Where data crosses ranks the layer runs the one c10d
collective DTensor would run, as an autograd function on the local tensor
(:mod:`lightning_3d.parallel.tp_local`), and parameter gradients go back as DTensors with the
placements DTensor gives them. Results and gradients are DTensor's; the matmuls, norms,
transposes, views and layout changes skip DTensor's per-op sharding propagation and checks,
forward and backward. A ``PrepareModuleInput`` that makes a plain input whole becomes
:class:`LocalPrepareModuleInput`: one autograd node for the DTensor it hands on, whose backward
reduces the summed gradient of all the layers that read it once. One that keeps a replicated
input as it is (no sequence parallel) is left out: its module gets the plain input, and the
column-wise layers reading it share one reduction of their summed gradient
(:func:`~lightning_3d.parallel.tp_local.shared_enter_replicated`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from typing_extensions import override

from lightning_3d.parallel.tied import retie, tied_parameter_names
from lightning_3d.parallel.tp_local import (
    gather_replicated,
    gather_shards,
    local_view,
    reduce_partial,
    reduce_scatter_partial,
    replicated_dtensor,
    shared_enter_replicated,
    shared_partial_view,
)
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
        if type(style) is PrepareModuleInput and _keeps_replicated(style):
            continue  # the column-wise layers reading its input share one reduction without it
        try:
            target = owner.get_submodule(name)
        except AttributeError:  # a wildcard name: parallelize_module resolves it, with the style as given
            target = None
        # exact types only: a style subclass (float8's, a user's) keeps its own behaviour
        candidates = (local_style.from_style(style) for local_style in _LOCAL_STYLES.get(type(style), ()))
        swapped[name] = next((local for local in candidates if local.fits(target)), style)
    return swapped


def _keeps_replicated(style: PrepareModuleInput) -> bool:
    """Whether a ``PrepareModuleInput`` asks for every input as it comes, replicated: its only
    effect is to wrap a plain input in a DTensor."""
    pairs = list(zip(style.input_layouts or (), style.desired_input_layouts or ()))
    given_kwargs, wanted_kwargs = style.input_kwarg_layouts or {}, style.desired_input_kwarg_layouts or {}
    pairs += [(given_kwargs.get(key), wanted_kwargs.get(key)) for key in set(given_kwargs) | set(wanted_kwargs)]
    return all(given == wanted and given in (None, Replicate()) for given, wanted in pairs)


class _LocalCompute:
    """Shards a module's parameters as the parent style does, then replaces its forward with one
    on local tensors; a module the local forward does not fit gets the parent style as it is."""

    def fits(self, module: nn.Module | None) -> bool:
        raise NotImplementedError

    def _partition_fn(self) -> Callable[[str, nn.Module, DeviceMesh], None]:
        raise NotImplementedError

    def _forward(self, module: nn.Module, mesh: DeviceMesh) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def fits_mesh(self, module: nn.Module, mesh: DeviceMesh) -> bool:
        return True

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not (self.fits(module) and self.fits_mesh(module, device_mesh)):
            return super()._apply(module, device_mesh)
        distribute_module(module, device_mesh, self._partition_fn())
        module.forward = self._forward(module, device_mesh)
        return module


def _shard_dim(layouts: tuple[Placement, ...]) -> int:
    return layouts[0].dim  # a Shard: the callers checked with _replicate_or_shard


def _replicate_or_shard(layouts: tuple[Placement, ...]) -> bool:
    return len(layouts) == 1 and isinstance(layouts[0], (Replicate, Shard))


class _LocalLayer(_LocalCompute):
    """A local style made from torch's column- or row-wise style, with its layouts."""

    @classmethod
    def from_style(cls, style: ColwiseParallel | RowwiseParallel) -> ParallelStyle:
        local = cls(input_layouts=style.input_layouts[0], output_layouts=style.output_layouts[0],
                    use_local_output=style.use_local_output)
        local.src_data_rank = style.src_data_rank
        return local


class _LocalLinear(_LocalLayer):
    def fits(self, module: nn.Module | None) -> bool:
        # a Linear subclass keeps its own forward; the activation's layout change is one the
        # local collectives make (the column-wise input and the row-wise output)
        layouts = self.input_layouts if isinstance(self, ColwiseParallel) else self.output_layouts
        return type(module) is nn.Linear and _replicate_or_shard(layouts)

    def _partition_fn(self) -> Callable[[str, nn.Module, DeviceMesh], None]:
        return self._partition_linear_fn


class LocalColwiseLinear(_LocalLinear, ColwiseParallel):
    """``ColwiseParallel`` for ``nn.Linear``: weight and bias Shard(0), output Shard(-1). The input
    is made whole (a replicated plain tensor as it is, sequence shards all-gathered) and its
    gradient, a partial sum on each rank, reduced (all-reduce / reduce-scatter); a DTensor input
    leaves that reduction to the DTensor's maker (``LocalPrepareModuleInput``, DTensor's
    ``from_local``), once for all the layers that read it, which share one local view of it
    (:func:`~lightning_3d.parallel.tp_local.shared_partial_view`)."""

    def _forward(self, module: nn.Linear, mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
        input_layouts, output_layouts, use_local = self.input_layouts, self.output_layouts, self.use_local_output

        group = mesh.get_group()
        even_output = module.out_features % mesh.size() == 0  # else DTensor's padded all-gather

        def forward(x: torch.Tensor) -> torch.Tensor:
            if isinstance(x, DTensor):
                x = shared_partial_view(x if x.placements == _REPLICATE else x.redistribute(mesh, _REPLICATE))
            elif input_layouts == _REPLICATE:
                x = shared_enter_replicated(x, group)
            else:  # sequence shards
                x = gather_shards(x, _shard_dim(input_layouts), group)
            bias = local_view(module.bias) if module.bias is not None else None
            y = F.linear(x, local_view(module.weight), bias)
            if output_layouts == _LAST_DIM and use_local:
                return y
            if output_layouts == _REPLICATE and use_local and even_output:  # e.g. a head's logits, made whole
                return gather_replicated(y, -1, group)
            y = DTensor.from_local(y, mesh, _LAST_DIM, run_check=False)
            if y.placements != output_layouts:
                y = y.redistribute(mesh, output_layouts)
            return y.to_local() if use_local else y

        return forward


class LocalRowwiseLinear(_LocalLinear, RowwiseParallel):
    """``RowwiseParallel`` for ``nn.Linear``: weight Shard(1), bias Replicate; the input is the
    local Shard(-1) slice, the product a partial sum, all-reduced (Replicate output) or
    reduce-scattered (sequence shards) into ``output_layouts``."""

    def _forward(self, module: nn.Linear, mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
        input_layouts, output_layouts, use_local = self.input_layouts, self.output_layouts, self.use_local_output

        group, ranks = mesh.get_group(), mesh.size()
        # the bias is added to the reduced output: a sum over this rank's tokens when those are a shard
        bias_grad = _REPLICATE if output_layouts == _REPLICATE else _PARTIAL

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not isinstance(x, DTensor) and input_layouts != _LAST_DIM:
                x = DTensor.from_local(x, mesh, input_layouts, run_check=False)
            if isinstance(x, DTensor):
                x = (x if x.placements == _LAST_DIM else x.redistribute(mesh, _LAST_DIM)).to_local()
            y = F.linear(x, local_view(module.weight))  # this rank's partial sum
            if output_layouts == _REPLICATE:
                y = reduce_partial(y, group)
            elif y.shape[_shard_dim(output_layouts)] % ranks == 0:
                y = reduce_scatter_partial(y, _shard_dim(output_layouts), group)
            else:  # uneven shards: DTensor's padded reduce-scatter, and a DTensor result
                y = DTensor.from_local(y, mesh, _PARTIAL, run_check=False).redistribute(mesh, output_layouts)
                y = y + module.bias if module.bias is not None else y
                return y.to_local() if use_local else y
            if module.bias is not None:
                y = y + local_view(module.bias, bias_grad)
            return y if use_local else DTensor.from_local(y, mesh, output_layouts, run_check=False)

        return forward


class LocalRowwiseEmbedding(_LocalLayer, RowwiseParallel):
    """``RowwiseParallel`` for ``nn.Embedding`` with a vocabulary that splits evenly: weight
    Shard(0), so each rank holds a block of rows. The ids (replicated) outside this rank's block
    look up row 0 and their vectors are zeroed, which makes a partial sum (DTensor's
    ``MaskPartial``), all-reduced (Replicate output) or reduce-scattered (sequence shards) into
    ``output_layouts``; their gradient to row 0 is zero."""

    def fits(self, module: nn.Module | None) -> bool:
        return (
            type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq
            and not module.sparse and self.input_layouts == _REPLICATE and _replicate_or_shard(self.output_layouts)
        )

    def fits_mesh(self, module: nn.Module, mesh: DeviceMesh) -> bool:
        return module.num_embeddings % mesh.size() == 0

    def _partition_fn(self) -> Callable[[str, nn.Module, DeviceMesh], None]:
        return self._partition_embedding_fn

    def _forward(self, module: nn.Embedding, mesh: DeviceMesh) -> Callable[[torch.Tensor], torch.Tensor]:
        output_layouts, use_local = self.output_layouts, self.use_local_output
        group, ranks = mesh.get_group(), mesh.size()
        rows = module.num_embeddings // ranks
        first = mesh.get_local_rank() * rows
        padding = module.padding_idx
        # the padding row's index in this rank's block, if the block holds it
        local_padding = padding - first if padding is not None and first <= padding < first + rows else None

        def forward(ids: torch.Tensor) -> torch.Tensor:
            if isinstance(ids, DTensor):
                ids = (ids if ids.placements == _REPLICATE else ids.redistribute(mesh, _REPLICATE)).to_local()
            outside = (ids < first) | (ids >= first + rows)
            y = F.embedding((ids - first).masked_fill(outside, 0), local_view(module.weight), local_padding)
            y = y.masked_fill(outside.unsqueeze(-1), 0.0)  # this rank's partial sum
            if output_layouts == _REPLICATE:
                y = reduce_partial(y, group)
            elif y.shape[_shard_dim(output_layouts)] % ranks == 0:
                y = reduce_scatter_partial(y, _shard_dim(output_layouts), group)
            else:  # uneven shards: DTensor's padded reduce-scatter
                y = DTensor.from_local(y, mesh, _PARTIAL, run_check=False).redistribute(mesh, output_layouts)
                return y.to_local() if use_local else y
            return y if use_local else DTensor.from_local(y, mesh, output_layouts, run_check=False)

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
                        module._parameters[name] = local_view(param, _PARTIAL)
                y = run(x, *args, **kwargs)
            finally:
                module._parameters.update(params)
            return y if use_local else DTensor.from_local(y, mesh, sharding, run_check=False)

        return forward


class LocalPrepareModuleInput(PrepareModuleInput):
    """``PrepareModuleInput`` whose plain positional inputs made ``Replicate`` (from ``Replicate`` or
    an even ``Shard``, DTensor outputs) take one autograd node: the all-gather if any, the DTensor
    wrapped with a known spec, and in backward the gradient reduced into the input's layout with
    one c10d collective. Other inputs and layouts go through torch's own."""

    @classmethod
    def from_style(cls, style: PrepareModuleInput) -> ParallelStyle:
        local = cls.__new__(cls)
        local.__dict__.update(vars(style))
        return local

    def fits(self, module: nn.Module | None) -> bool:
        return True

    @override
    def _prepare_input_arg(
        self, input: Any, mesh: DeviceMesh, input_layout: Placement | None, desired_layout: Placement | None
    ) -> Any:
        if (
            type(input) is torch.Tensor and not self.use_local_output and mesh.ndim == 1
            and desired_layout == Replicate() and isinstance(input_layout, (Replicate, Shard))
        ):
            return replicated_dtensor(input, mesh, input_layout)
        return super()._prepare_input_arg(input, mesh, input_layout, desired_layout)


# torch's style → the local styles that may replace it, the first that fits the module
_LOCAL_STYLES: dict[type, tuple[Any, ...]] = {
    ColwiseParallel: (LocalColwiseLinear,),
    RowwiseParallel: (LocalRowwiseLinear, LocalRowwiseEmbedding),
    SequenceParallel: (LocalSequenceParallel,),
    PrepareModuleInput: (LocalPrepareModuleInput,),
}
