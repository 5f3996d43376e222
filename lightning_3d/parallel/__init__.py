"""Apply every parallelism to a model, in one fixed order.

meta-device model → [pipeline split: later] → tensor/sequence parallel → [context
parallel: later] → [activation checkpointing, torch.compile: later] → FSDP2 per block,
then the extra units, then the root → materialize the weights.

Tensor parallel comes before FSDP2 because FSDP2 shards the already-TP-sharded DTensor
parameters along the data-parallel mesh (2-D parameters); materializing last means no
rank ever holds the full model.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.config import ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.parallel.data_parallel import apply_data_parallel, mixed_precision_policy
from lightning_3d.parallel.materialize import InitFn, has_meta_parameters, materialize
from lightning_3d.parallel.tensor_parallel import apply_tensor_parallel
from lightning_3d.plans.base import ParallelPlan


def parallelize(
    module: nn.Module,
    plan: ParallelPlan,
    meshes: dict[str, DeviceMesh],
    dims: ParallelDims,
    config: ParallelConfig,
    precision: str,
    device: torch.device,
    init_fn: InitFn | None,
    seed: int,
) -> None:
    """Parallelize ``module`` in place (see the module docstring for the order)."""
    on_meta = has_meta_parameters(module)
    if on_meta and init_fn is None:
        raise TypeError(
            f"{type(module).__name__} creates its parameters on the meta device but defines no "
            "`init_parameter(name, full_tensor, generator)` to initialize them"
        )
    if not on_meta:
        module.to(device)
    if dims.tp > 1:
        apply_tensor_parallel(module, plan, meshes["tp"])
    reshard = config.reshard_after_forward if config.reshard_after_forward is not None else dims.pp == 1
    apply_data_parallel(module, plan, meshes, dims, mixed_precision_policy(precision), reshard)
    if on_meta:
        materialize(module, plan.root, device, init_fn, seed)
