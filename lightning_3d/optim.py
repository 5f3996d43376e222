"""Optimizers that update DTensor parameters through their local shards."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardLocalAdamW(torch.optim.AdamW):
    """torch's AdamW, run on each rank's local shards of parameters, gradients and states.

    AdamW's update is elementwise, so updating the local shards gives exactly what the same
    update on the DTensors gives, without DTensor's sharding propagation for every op of the
    step (with a foreach update on CPU that propagation cost more than the update itself). A
    gradient whose placements differ from its parameter's (a partial sum) is redistributed
    first, as DTensor would inside the update. The states are still created as DTensors, so
    ``state_dict()``, distributed checkpoints and resharding see torch's AdamW; a plain-tensor
    parameter is updated as torch's AdamW does, and a model may mix the two (the update's
    lists are all plain tensors).
    """

    @override
    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], *states: Any) -> Any:
        # torch's AdamW collects the tensors of the step in these lists, then updates them in place
        has_complex = super()._init_group(group, params, grads, *states)
        for index, (param, grad) in enumerate(zip(params, grads)):
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                grads[index] = grad.redistribute(param.device_mesh, param.placements)
        for tensors in (params, grads, *states):
            tensors[:] = [_local(tensor) for tensor in tensors]
        return has_complex
