"""Data parallel with FSDP2: FSDP (dp_shard), HSDP (dp_replicate × dp_shard), DDP-style.

One FSDP unit per transformer block, then the plan's extra units (embedding, head), then
the root. The sharding mesh is ``fsdp`` = dp_shard × cp (CP ranks hold the same weights);
with dp_replicate > 1 it becomes the 2-D HSDP mesh (dp_replicate, fsdp). With
dp_shard × cp = 1 the replicas are kept whole and gradients are all-reduced (DDP-style),
through FSDP2's ``replicate``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lightning_3d.dims import ParallelDims
from lightning_3d.parallel.tensor_parallel import blocks_of, present_module
from lightning_3d.plans.base import ParallelPlan

# Lightning precision flag → FSDP2 policy. Gradients are always reduced in fp32.
_PARAM_DTYPE = {"32-true": None, "bf16-mixed": torch.bfloat16, "bf16-true": None}
SUPPORTED_PRECISIONS = tuple(_PARAM_DTYPE)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    if precision not in _PARAM_DTYPE:
        raise ValueError(f"precision={precision!r} is not supported; use one of {list(SUPPORTED_PRECISIONS)}")
    return MixedPrecisionPolicy(param_dtype=_PARAM_DTYPE[precision], reduce_dtype=torch.float32)


def apply_data_parallel(
    model: nn.Module,
    plan: ParallelPlan,
    meshes: dict[str, DeviceMesh],
    dims: ParallelDims,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool,
) -> None:
    """Wrap ``model`` (the plan root, or one pipeline stage of it) unit by unit."""
    if not dims.data_parallel_enabled:
        return
    blocks = blocks_of(model, plan)
    extra_units = [[m for name in unit if (m := present_module(model, name)) is not None] for unit in plan.fsdp_units]
    extra_units = [unit for unit in extra_units if unit]
    if dims.fsdp == 1:
        for unit in blocks + extra_units + [model]:
            replicate(unit, mesh=meshes["dp_replicate"], mp_policy=mp_policy)
        return
    shard_mesh = meshes["fsdp"] if dims.dp_replicate == 1 else meshes["hsdp"]
    for index, block in enumerate(blocks):
        # The backward pass starts with the last block: re-gathering it at once is wasted work.
        reshard = reshard_after_forward and index < len(blocks) - 1
        fully_shard(block, mesh=shard_mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    for unit in extra_units + [model]:
        fully_shard(unit, mesh=shard_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
