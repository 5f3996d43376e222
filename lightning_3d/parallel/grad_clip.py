"""Gradient-norm clipping with the true global norm over every mesh dim.

Gradients may be DTensors on different meshes (2-D FSDP × TP, 1-D FSDP, plain tensors)
and pipeline stages hold different parameters, so ``torch.nn.utils.clip_grad_norm_``
cannot combine them. Instead each rank sums the squares of its local shards, weighted by
1 / (number of ranks holding the same shard), and one all-reduce over the world adds up
the stages and shards.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import prod
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate

from lightning_3d.parallel.tied import TIED_COPY


def _local_and_shards(grad: Tensor) -> tuple[Tensor, int]:
    if isinstance(grad, DTensor):
        # Every non-Replicate mesh dim splits the tensor: Shard, and the _StridedShard that
        # FSDP2 uses on top of tensor parallel (which is not a Shard subclass).
        shards = prod(grad.device_mesh.size(dim) for dim, placement in enumerate(grad.placements) if not placement.is_replicate())
        return grad.to_local(), shards
    return grad, 1


def local_grads(parameters: Iterable[Tensor]) -> list[Tensor]:
    """This rank's part of every gradient (the local shard of a DTensor), for in-place scaling."""
    return [_local_and_shards(param.grad)[0] for param in parameters if param.grad is not None]


@torch.no_grad()
def scale_grads(parameters: Iterable[Tensor], factor: float | Tensor) -> None:
    """Multiply every gradient in place by ``factor``, in one fused kernel."""
    grads = local_grads(parameters)
    if grads:
        torch._foreach_mul_(grads, factor)


@torch.no_grad()
def reduce_partial_grads(parameters: Iterable[Tensor]) -> int:
    """Sum gradients that are still pending sums (``Partial`` DTensors) over their mesh; return how many.

    Under sequence parallel the norm weights each see 1/tp of the tokens, so their gradients
    come out of backward as per-rank partial sums. Squaring those parts would give a wrong
    norm, and the optimizer would sum them again at each read (AdamW reads a gradient three
    times): one all-reduce each, here, serves both.
    """
    reduced = 0
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and any(placement.is_partial() for placement in grad.placements):
            placements = [Replicate() if placement.is_partial() else placement for placement in grad.placements]
            param.grad = grad.redistribute(grad.device_mesh, placements)
            reduced += 1
    return reduced


@torch.no_grad()
def local_grad_square_sum(parameters: Iterable[Tensor], ranks_per_stage: int, device: torch.device) -> Tensor:
    """This rank's share of the squared global gradient norm; summed over the world it is the whole."""
    by_shards: dict[int, list[Tensor]] = {}
    for param in parameters:
        if param.grad is not None and not getattr(param, TIED_COPY, False):  # a tied weight counts once
            local, shards = _local_and_shards(param.grad)
            by_shards.setdefault(shards, []).append(local if local.dtype == torch.float32 else local.float())
    total = torch.zeros((), dtype=torch.float32, device=device)
    for shards, grads in by_shards.items():
        # one fused kernel per group instead of a few small ops per tensor;
        # each shard is held by ranks_per_stage / shards ranks of this stage
        total += torch.stack(torch._foreach_norm(grads, 2.0)).pow(2).sum() * (shards / ranks_per_stage)
    return total


@torch.no_grad()
def global_grad_norm(parameters: Iterable[Tensor], ranks_per_stage: int, device: torch.device) -> Tensor:
    """L2 norm of all gradients of the whole model (all stages, all shards)."""
    total = local_grad_square_sum(parameters, ranks_per_stage, device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[Tensor],
    max_norm: float,
    ranks_per_stage: int,
    device: torch.device,
    norm: Optional[Tensor] = None,
    prescale: Optional[float] = None,
) -> Tensor:
    """Scale gradients in place so the global norm is at most ``max_norm``; return the norm.

    ``norm``: the global norm if already computed for these gradients (saves an all-reduce).
    ``prescale``: a factor the gradients still have to be multiplied by; ``norm`` must then be
    the norm after it (both go into the same multiplication).
    """
    parameters = list(parameters)
    if norm is None:
        if prescale is not None:
            raise ValueError("clip_grad_norm_: prescale needs the norm after it")
        norm = global_grad_norm(parameters, ranks_per_stage, device)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    scale_grads(parameters, scale if prescale is None else scale * prescale)
    return norm
