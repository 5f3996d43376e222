"""Apply every parallelism to a model, in one fixed order.

meta-device model → pipeline split (keep only this rank's stages) → float8 linears →
tensor/sequence parallel → context-parallel attention swap → activation checkpointing →
torch.compile per block → FSDP2 per block, then the extra units, then the stage root →
materialize the weights.

Tensor parallel comes before FSDP2 because FSDP2 shards the already-TP-sharded DTensor
parameters along the data-parallel mesh (2-D parameters); materializing last means no
rank ever holds more than its own shards of its own stages.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.config import ParallelConfig, PerfConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.activation_checkpoint import apply_activation_checkpointing
from lightning_3d.parallel.compile import apply_compile, apply_float8
from lightning_3d.parallel.context_parallel import apply_context_parallel
from lightning_3d.parallel.data_parallel import (
    apply_data_parallel,
    mixed_precision_policy,
    resolved_reshard_after_forward,
    resolved_unit_min_bytes,
)
from lightning_3d.parallel.materialize import InitFn, has_meta_parameters, materialize
from lightning_3d.parallel.model_call import use_ring_attention
from lightning_3d.parallel.pipeline_parallel import (
    cut_stage,
    split_blocks,
    stages_of_rank,
)
from lightning_3d.parallel.tensor_parallel import apply_tensor_parallel, blocks_of
from lightning_3d.parallel.tied import tied_aliases
from lightning_3d.plans.base import ParallelPlan
from lightning_3d.plans.hf import is_hf_model


def _pipeline_stages(model: nn.Module, plan: ParallelPlan, config: ParallelConfig, pp_rank: int) -> list[tuple[int, nn.Module]]:
    """(stage index, stage module) for each stage this rank holds."""
    num_stages = config.pp * config.stages_per_rank
    stage_blocks = config.pp_layers or split_blocks(
        len(blocks_of(model, plan)), num_stages, config.pp_embedding_weight, config.pp_head_weight
    )
    return [
        (index, cut_stage(model, plan, stage_blocks[index], is_first=index == 0, is_last=index == num_stages - 1))
        for index in stages_of_rank(pp_rank, config.pp, config.stages_per_rank, config.pp_schedule)
    ]


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
    perf: PerfConfig | None = None,
    stage_list: type[nn.ModuleList] = nn.ModuleList,
) -> list[tuple[int, nn.Module]]:
    """Parallelize ``module`` in place and return this rank's (stage index, stage module)s.

    Without pipeline parallel the single "stage" is ``module.<plan.root>`` itself; with it,
    ``module.<plan.root>`` becomes a ``stage_list`` of this rank's stages, so the optimizer and
    Lightning see exactly the parameters this rank owns. A weight tied between stages (an
    embedding and its head) becomes one copy per stage, each drawn as the tied weight.
    """
    on_meta = has_meta_parameters(module)
    if on_meta and init_fn is None:
        raise TypeError(
            f"{type(module).__name__} creates its parameters on the meta device but defines no "
            "`init_parameter(name, full_tensor, generator)` to initialize them"
        )
    if dims.pp > 1 and not on_meta:
        raise ConfigError(
            f"pipeline parallel (pp={dims.pp}) cuts the model before any weight exists: create the model in "
            f"{type(module).__name__}.configure_model(), which the strategy runs on the meta device"
        )
    model = module.get_submodule(plan.root)
    aliases = tied_aliases(model, plan.root)
    if dims.pp > 1:
        stages = _pipeline_stages(model, plan, config, meshes["pp"].get_local_rank())
        owner, _, attr = plan.root.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, attr, stage_list([part for _, part in stages]))
    else:
        stages = [(0, model)]
    perf = perf or PerfConfig()
    reshard = resolved_reshard_after_forward(config, dims.pp)
    for _, part in stages:
        if not on_meta:
            part.to(device)
        if perf.float8:
            apply_float8(part, plan)
        if dims.tp > 1:
            apply_tensor_parallel(part, plan, meshes["tp"], local_linears=perf.tp_local_linears and not perf.compile)
        if dims.cp > 1 and is_hf_model(part):
            use_ring_attention(part, meshes["cp"].get_group(), config.cp_backend)
            part.context_parallel_rank = (meshes["cp"].get_local_rank(), dims.cp)  # for pipeline stages
        elif dims.cp > 1:
            attention = [block.get_submodule(plan.attention) for block in blocks_of(part, plan)]
            apply_context_parallel(part, attention, meshes["cp"].get_group(), config.cp_backend)
        apply_activation_checkpointing(part, plan, perf.activation_checkpoint, perf.ac_every)
        if perf.compile:
            apply_compile(part, plan, perf.compile_backend)
        apply_data_parallel(
            part, plan, meshes, dims, mixed_precision_policy(precision), reshard, perf.fsdp_prefetch, perf.cpu_offload,
            unit_min_bytes=resolved_unit_min_bytes(perf.dp_unit_min_mb, dims.fsdp, dims.dp_replicate),
        )
        if on_meta:
            materialize(part, plan.root, device, init_fn, seed, aliases)
    leftover = [name for name, param in module.named_parameters() if param.is_meta]
    if leftover:
        raise ConfigError(f"parameters outside the plan's root {plan.root!r} cannot be materialized: {leftover[:5]}")
    return stages
