"""Collectives: the strategy's barrier, broadcast, reduce and all-gather, each on the right group.

Barriers, broadcasts and votes run between steps (checkpoint I/O, Lightning's own
bookkeeping): they use the I/O group, which keeps the startup timeout.

``self.log(..., sync_dist=True)``, ``all_gather`` and torchmetrics:

A logged value is reduced over the ranks that hold distinct data — the ``loss`` mesh,
dp × cp — not the whole world, which would count each value once per tp rank and per
pipeline stage. Under pipeline parallel only the last stage computes the loss and the
model's outputs, so every rank takes the last stage's result: what rank 0's logger writes
is what the last stage logged.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import ReduceOp
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_3d.compat import _all_gather_ddp_if_available, _sync_ddp_if_available


class Collectives:
    """Args:
    meshes: the strategy's mesh views (``loss`` and ``pp`` are used).
    io_group: the group for barriers, broadcasts and votes.
    device: this rank's device.
    """

    def __init__(self, meshes: dict[str, DeviceMesh], io_group: Optional[dist.ProcessGroup], device: torch.device) -> None:
        self.io_group, self.device = io_group, device
        self.group = meshes["loss"].get_group()
        pp_mesh = meshes["pp"]
        self.pp_group = pp_mesh.get_group() if pp_mesh.size() > 1 else None
        self.last_stage = pp_mesh.size() - 1  # rank of the last stage in the pp group

    def _from_last_stage(self, tensor: Tensor) -> Tensor:
        if self.pp_group is not None:
            dist.broadcast(tensor, group=self.pp_group, group_src=self.last_stage)
        return tensor

    def reduce(self, tensor: Tensor, group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean") -> Tensor:
        """``tensor`` reduced over ``group`` (default: the ranks holding distinct data), as the last stage has it."""
        if group is not None:
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        reduced = _sync_ddp_if_available(tensor.clone(), self.group, reduce_op=reduce_op)
        return self._from_last_stage(reduced.contiguous())

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """``tensor`` of every rank holding distinct data, stacked on a new dim 0, as the last stage has them
        (another ``group`` than the world, or ``sync_grads``: Lightning's all-gather over that group)."""
        # LightningModule.all_gather passes WORLD when the user names no group
        if (group is not None and group is not dist.group.WORLD) or sync_grads:
            return _all_gather_ddp_if_available(tensor, group=group or self.group, sync_grads=sync_grads)
        size = dist.get_world_size(self.group)
        gathered = torch.empty(size * tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_into_tensor(gathered, tensor.reshape(-1).contiguous(), group=self.group)
        return self._from_last_stage(gathered.view(size, *tensor.shape))

    def gather_metric_state(self, tensor: Tensor, group: Optional[Any] = None) -> list[Tensor]:
        """torchmetrics' ``dist_sync_fn`` under pipeline parallel: the states of the ranks holding
        distinct data (shapes may differ, as torchmetrics allows), as the last stage has them."""
        states = gather_all_tensors(tensor, self.group)
        holder = [[state.cpu() for state in states]]
        dist.broadcast_object_list(holder, group=self.pp_group, group_src=self.last_stage)
        return [state.to(tensor.device) for state in holder[0]]

    def attach_metrics(self, module: nn.Module) -> None:
        """Make every torchmetrics metric of ``module`` sync by the same rule (unless it names its own group)."""
        for metric in module.modules():
            if isinstance(metric, Metric) and metric.process_group is None and metric.dist_sync_fn is None:
                metric.process_group = self.group
                if self.pp_group is not None:
                    metric.dist_sync_fn = self.gather_metric_state

    def barrier(self) -> None:
        if dist.get_backend(self.io_group) == "nccl":
            dist.barrier(group=self.io_group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.io_group)

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        holder = [obj]
        dist.broadcast_object_list(holder, src, group=self.io_group)
        return holder[0]

    def vote(self, decision: bool, all: bool = True) -> bool:
        """Whether every rank (``all``) or any rank decided so."""
        votes = torch.tensor(int(decision), device=self.device)
        dist.all_reduce(votes, group=self.io_group)
        return bool(votes == dist.get_world_size(self.io_group)) if all else bool(votes)
