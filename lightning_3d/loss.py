"""Token-weighted cross entropy over the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross entropy of the non-ignored tokens (a local tensor)."""
    summed = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    # under loss parallel the vocab-sharded logits give a sum replicated over tp
    return summed.to_local() if isinstance(summed, DTensor) else summed


def sum_over(tensor: Tensor, mesh: DeviceMesh | None) -> Tensor:
    """Sum ``tensor`` in place over the ranks of ``mesh`` (nothing to do for one rank or none)."""
    if mesh is not None and mesh.size() > 1:
        dist.all_reduce(tensor, group=mesh.get_group())
    return tensor


def count_tokens(labels: Tensor) -> Tensor:
    """Non-ignored tokens, as float64 so that counts of large global batches stay exact."""
    return (labels != IGNORE_INDEX).sum().double()


def token_weighted_loss(logits: Tensor, labels: Tensor, loss_mesh: DeviceMesh | None) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(loss_to_backward, global_mean_loss, global_token_count)``.

    The global mean is Σ token losses / Σ tokens over every rank of ``loss_mesh``
    (ignore_index excluded), the same number on every rank. The loss to backward is this
    rank's share of it, multiplied by the mesh size because data-parallel gradient
    reduction averages over the same ranks: the averaged gradient is then exactly the
    gradient of the global mean.
    """
    summed = cross_entropy_sum(logits, labels)
    # one collective for both the token count and the loss sum
    tokens, global_sum = sum_over(torch.stack([count_tokens(labels), summed.detach().double()]), loss_mesh)
    mesh_size = loss_mesh.size() if loss_mesh is not None else 1
    denominator = tokens.clamp(min=1)
    return summed * (mesh_size / denominator).to(summed.dtype), (global_sum / denominator).float(), tokens
