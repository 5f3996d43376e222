"""The autograd pieces of tensor parallel's local compute: plain tensors in, plain tensors out.

Each function is one layout change that DTensor would make for a tensor-parallel layer, written
as a single autograd function on the local tensor: the c10d collective of the tensor-parallel
group forward, its transpose backward (Megatron-LM's pairs). A DTensor round trip
(``from_local`` → ``redistribute`` → ``to_local``) does the same in three autograd nodes with
sharding checks in each, tens of µs per call on CPU, several times per layer and microbatch.

- :func:`local_view`: a DTensor parameter's local shard; its gradient goes back as a DTensor
  with the parameter's spec (or partial-sum placements), wrapped without checks.
  :func:`shared_partial_view`: one such view of a replicated DTensor input for all the layers
  that read it.
- :func:`enter_replicated`: identity forward; backward all-reduces the gradient, a partial sum
  on each rank (a replicated input to column-wise layers). :func:`shared_enter_replicated`:
  one such node per activation for all the column-wise layers that read it.
- :func:`reduce_partial`: all-reduce forward (a row-wise layer's partial sums → replicated);
  identity backward.
- :func:`gather_shards`: all-gather along ``dim`` forward (sequence shards → whole sequence for a
  column-wise layer); reduce-scatter of the partial gradient backward.
- :func:`reduce_scatter_partial`: reduce-scatter along ``dim`` forward (a row-wise layer's
  partial sums → sequence shards); all-gather backward.
- :func:`replicated_dtensor`: a plain input (replicated, or sequence shards all-gathered)
  → a replicated DTensor, built without ``from_local``'s checks (a ``PrepareModuleInput``
  before q, k, v); backward reduces the gradient, whatever DTensor left it as, into the input's
  layout once for all the layers that read it.
- :func:`gather_replicated`: all-gather along ``dim`` forward (a column-wise layer's output
  shards → the whole output, e.g. the logits); backward keeps this rank's slice of the
  gradient, which is the same on every rank (no collective).

Every collective is torch's eager c10d op on the group (the comm accounting sees the same
calls and bytes per mesh dim as for DTensor's path); shards along ``dim`` are equal, as
``DTensor.from_local`` assumes too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from lightning_3d.compat import DTensorSpec, TensorMeta, dtensor_spec, dtensor_with_spec


class _LocalView(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: DTensor, grad_spec: DTensorSpec) -> Tensor:
        ctx.grad_spec = grad_spec
        local = tensor.to_local()  # autograd is off inside forward: the local tensor itself
        return local.view_as(local)  # a new tensor object for autograd to attach to

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[DTensor, None]:
        return dtensor_with_spec(grad.contiguous(), ctx.grad_spec), None


def local_view(tensor: DTensor, grad_placements: Sequence[Placement] | None = None) -> Tensor:
    """``tensor.to_local(grad_placements=...)`` in one cheap autograd node."""
    spec = dtensor_spec(tensor)
    if grad_placements is not None and tuple(grad_placements) != spec.placements:
        spec = DTensorSpec(spec.mesh, tuple(grad_placements), tensor_meta=spec.tensor_meta)
    return _LocalView.apply(tensor, spec)


_SHARED_VIEW = "_local_partial_view"  # the attribute of a replicated DTensor that holds its shared view


def shared_partial_view(tensor: DTensor) -> Tensor:
    """``local_view(tensor, (Partial(),))`` made once per replicated DTensor and shared by every
    column-wise layer that reads it (q, k and v; gate and up): their gradients add up as plain
    tensors, and the sum goes back as one partial-sum DTensor, instead of one DTensor per layer
    added up by DTensor's dispatch. Kept only while autograd records (a view made without it
    carries no gradient)."""
    if not torch.is_grad_enabled():
        return local_view(tensor, (Partial(),))
    view = getattr(tensor, _SHARED_VIEW, None)
    if view is None:
        view = local_view(tensor, (Partial(),))
        setattr(tensor, _SHARED_VIEW, view)
    return view


def _all_reduce(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def _all_reduced_copy(grad: Tensor, group: dist.ProcessGroup) -> Tensor:
    # autograd may hand the same gradient tensor to several nodes: reduce a copy
    return _all_reduce(grad.clone(memory_format=torch.contiguous_format), group)


def _all_gather(tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    ranks = dist.get_world_size(group)
    gathered = tensor.new_empty((ranks * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(gathered, tensor.contiguous(), group=group)
    if dim == 0:
        return gathered
    # rank blocks stacked on dim 0 → side by side on dim
    blocks = gathered.view(ranks, *tensor.shape).movedim(0, dim)
    return blocks.reshape(*tensor.shape[:dim], ranks * tensor.shape[dim], *tensor.shape[dim + 1 :])


def _reduce_scatter(tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    ranks = dist.get_world_size(group)
    if tensor.shape[dim] % ranks:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {tensor.shape[dim]} over {ranks} tensor-parallel ranks")
    shard_shape = (*tensor.shape[:dim], tensor.shape[dim] // ranks, *tensor.shape[dim + 1 :])
    # dim split into (ranks, shard) with the rank blocks moved to the front, contiguous for c10d
    blocks = tensor.reshape(*tensor.shape[:dim], ranks, -1, *tensor.shape[dim + 1 :]).movedim(dim, 0).contiguous()
    output = tensor.new_empty(shard_shape)
    dist.reduce_scatter_tensor(output, blocks.view(ranks * shard_shape[0], *shard_shape[1:]), group=group)
    return output


class _EnterReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return tensor.detach()  # the same storage; unlike a view it holds no reference to ``tensor``

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduced_copy(grad, ctx.group), None


class _ReducePartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        if not tensor.is_contiguous():
            return _all_reduce(tensor.contiguous(), group)
        ctx.mark_dirty(tensor)  # reduced in place: autograd must know the partial sums are gone
        return _all_reduce(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GatherShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(tensor, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ReduceScatterPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(tensor, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.rank, ctx.ranks = dim, dist.get_rank(group), dist.get_world_size(group)
        return _all_gather(tensor, dim, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.chunk(ctx.ranks, dim=ctx.dim)[ctx.rank], None, None


class _ReplicatedDTensor(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor, mesh: DeviceMesh, layout: Placement) -> DTensor:
        ctx.mesh, ctx.layout, ctx.group = mesh, layout, mesh.get_group()
        if isinstance(layout, Shard):
            whole = _all_gather(tensor, layout.dim % tensor.ndim, ctx.group)
        else:
            whole = tensor.view_as(tensor)  # a new tensor object for autograd to attach to
        spec = DTensorSpec(mesh, (Replicate(),), tensor_meta=TensorMeta(whole.shape, whole.stride(), whole.dtype))
        return dtensor_with_spec(whole, spec)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        layout = ctx.layout
        if not isinstance(grad, DTensor):  # a plain gradient of a replicated tensor: the same on every rank
            grad_layout, local = Replicate(), grad
        else:
            grad_layout, local = grad.placements[0], grad.to_local()
        if isinstance(grad_layout, Partial) and grad_layout.reduce_op == "sum":
            if isinstance(layout, Shard):
                return _reduce_scatter(local, layout.dim % local.ndim, ctx.group), None, None
            return _all_reduced_copy(local, ctx.group), None, None
        if isinstance(grad_layout, Replicate):
            if isinstance(layout, Shard):
                return local.chunk(ctx.mesh.size(), dim=layout.dim)[ctx.mesh.get_local_rank()], None, None
            return local, None, None
        # any other layout: DTensor's redistribute
        return grad.redistribute(ctx.mesh, (layout,)).to_local(), None, None


def replicated_dtensor(tensor: Tensor, mesh: DeviceMesh, layout: Placement) -> DTensor:
    """``DTensor.from_local(tensor, mesh, (layout,)).redistribute(mesh, (Replicate(),))`` for a
    1-D mesh and a ``Replicate`` or even ``Shard`` layout, in one autograd node."""
    return _ReplicatedDTensor.apply(tensor, mesh, layout)


def enter_replicated(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """A replicated input to column-wise layers: the same tensor; its gradient all-reduced."""
    return _EnterReplicated.apply(tensor, group)


_SHARED_ENTERED = "_tp_entered"  # an activation's (group, its shared enter_replicated alias)


def shared_enter_replicated(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``enter_replicated(tensor, group)`` made once per activation and shared by every column-wise
    layer that reads it (q, k and v; gate and up): their partial input gradients add up as plain
    tensors and are all-reduced once. Other readers of ``tensor`` are not affected: their
    gradients reach it directly, as without tensor parallel.

    Only for activations (tensors made by autograd in this forward pass) while autograd
    records; a leaf such as a parameter may be read again in a later pass, so it gets a node
    per layer. The alias shares the activation's storage but holds no reference to it (no
    cycle), so both go when the graph that saved the activation goes.
    """
    if not torch.is_grad_enabled() or tensor.grad_fn is None:
        return enter_replicated(tensor, group)
    cached = getattr(tensor, _SHARED_ENTERED, None)
    if cached is not None and cached[0] is group:
        return cached[1]
    entered = enter_replicated(tensor, group)
    setattr(tensor, _SHARED_ENTERED, (group, entered))
    return entered


def reduce_partial(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Partial sums → their sum on every rank; the gradient passes through."""
    return _ReducePartial.apply(tensor, group)


def gather_shards(tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """Equal shards along ``dim`` → the whole tensor; the (partial) gradient reduce-scattered back."""
    return _GatherShards.apply(tensor, dim % tensor.ndim, group)


def reduce_scatter_partial(tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """Partial sums → this rank's shard of their sum along ``dim``; the gradient all-gathered back."""
    return _ReduceScatterPartial.apply(tensor, dim % tensor.ndim, group)


def gather_replicated(tensor: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """Equal shards along ``dim`` → the whole tensor, replicated; this rank's slice of the gradient back."""
    return _GatherReplicated.apply(tensor, dim % tensor.ndim, group)
