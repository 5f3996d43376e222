"""Data parallel with FSDP2: FSDP (dp_shard), HSDP (dp_replicate × dp_shard), DDP-style.

One FSDP unit per transformer block (or per group of consecutive blocks holding at least
``perf.dp_unit_min_mb``; see :func:`resolved_unit_min_bytes`), then the plan's extra units
(embedding, head), then the root. The sharding mesh is ``fsdp`` = dp_shard × cp (CP ranks
hold the same weights); with dp_replicate > 1 it becomes the 2-D HSDP mesh (dp_replicate, fsdp). With
dp_shard × cp = 1 the replicas are kept whole and gradients are all-reduced (DDP-style),
through FSDP2's ``replicate``.

Levers: ``prefetch`` > 1 all-gathers that many blocks ahead in forward and backward
(more overlap of communication with compute, more unsharded blocks in memory at once);
``cpu_offload`` keeps the sharded parameters, gradients and optimizer states in CPU memory
(far less device memory; every step copies them to and from the device, and the
optimizer step runs on the CPU).

ZeRO stages by name (``parallel.zero_stage``), as FSDP2 settings over the ``fsdp`` ranks:
3 reshards parameters after forward; 2 keeps them gathered from forward to backward; 1
also keeps gradients whole while a step's micro-batches accumulate (see
:func:`accumulating`). Optimizer states follow the parameter shards in every stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from lightning_3d.compat import replicate
from lightning_3d.config import ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.tensor_parallel import blocks_of, present_module
from lightning_3d.plans.base import ParallelPlan

# Lightning precision flag → FSDP2 policy. Gradients are always reduced in fp32.
_PARAM_DTYPE = {"32-true": None, "bf16-mixed": torch.bfloat16, "bf16-true": None}
SUPPORTED_PRECISIONS = tuple(_PARAM_DTYPE)


# DDP's default bucket_cap_mb: the unit size where replicas are kept whole (see resolved_unit_min_bytes)
REPLICA_UNIT_MIN_MB = 25.0


def resolved_unit_min_bytes(unit_min_mb: Optional[float], fsdp: int, dp_replicate: int) -> int:
    """The smallest data-parallel unit in bytes of parameters (``perf.dp_unit_min_mb``) for a
    layout with ``fsdp`` = dp_shard × cp sharding ranks and ``dp_replicate`` replicas.

    Unset: 0 (one unit per block, torchtitan's) where parameters are sharded, since a unit's
    parameters are gathered whole; :data:`REPLICA_UNIT_MIN_MB` where replicas are kept whole
    (fsdp = 1, dp_replicate > 1: DDP-style), since nothing is gathered there and a unit per
    small block only adds hooks and collectives (DDP's buckets of 25 MB). Without data parallel
    there are no units.
    """
    if unit_min_mb is None:
        unit_min_mb = REPLICA_UNIT_MIN_MB if fsdp == 1 and dp_replicate > 1 else 0.0
    return int(unit_min_mb * 2**20)


def is_own_unit(elements: int, nbytes: int, smallest_block: int, unit_min_bytes: int) -> bool:
    """Whether a plan's extra unit (embedding, final norm + head) is wrapped on its own: only when
    it is at least as large as the smallest block (``smallest_block`` elements, 0 without blocks)
    and as the smallest unit asked for. A unit of its own costs one all-gather and one reduction
    more per step; otherwise its parameters stay in the root unit, gathered through forward and
    backward. The strategy applies this rule; the comm accounting and the planner model it."""
    return elements >= smallest_block and nbytes >= unit_min_bytes


def data_parallel_problems(dims: ParallelDims, prefetch: int, cpu_offload: bool, unit_min_mb: Optional[float] = None) -> list[str]:
    problems = []
    if unit_min_mb is not None and unit_min_mb < 0:
        problems.append(f"perf.dp_unit_min_mb={unit_min_mb} must be >= 0 (0: one data-parallel unit per block)")
    if prefetch < 1:
        problems.append(f"perf.fsdp_prefetch={prefetch} must be >= 1 (blocks all-gathered ahead; 1 is FSDP2's default)")
    if cpu_offload and dims.fsdp == 1:
        problems.append(
            f"perf.cpu_offload=true offloads FSDP2 shards, but dp_shard × cp = {dims.dp_shard} × {dims.cp} = 1 "
            "keeps whole replicas (DDP-style): use parallel.dp_shard > 1"
        )
    return problems


ZERO_STAGES = (1, 2, 3)
# the stage's FSDP2 reshard_after_forward: only stage 3 frees gathered parameters after forward
_ZERO_RESHARD = {1: False, 2: False, 3: True}
# stages whose parameters stay gathered from one accumulated micro-batch to the next
KEEP_GATHERED_STAGES = (1, 2)
# stages whose gradients are reduce-scattered on every micro-batch (they stay sharded)
REDUCE_EVERY_MICROBATCH_STAGES = (2, 3)


def resolved_reshard_after_forward(config: ParallelConfig, pp: int) -> bool:
    """FSDP2's ``reshard_after_forward``: the ZeRO stage's, else the option's, else on without
    pipeline parallel (a schedule would gather every unit again for each microbatch)."""
    if config.zero_stage in _ZERO_RESHARD:
        return _ZERO_RESHARD[config.zero_stage]
    return config.reshard_after_forward if config.reshard_after_forward is not None else pp == 1


def zero_stage_problems(config: ParallelConfig, dims: Optional[ParallelDims]) -> list[str]:
    """Why ``parallel.zero_stage`` cannot be had with this layout (``dims``: None when it did not resolve)."""
    stage = config.zero_stage
    if stage is None:
        return []
    if stage not in ZERO_STAGES:
        return [f"parallel.zero_stage={stage} is not one of {list(ZERO_STAGES)} (or null: set reshard_after_forward yourself)"]
    problems = []
    implied = _ZERO_RESHARD[stage]
    if config.reshard_after_forward is not None and config.reshard_after_forward != implied:
        problems.append(
            f"parallel.zero_stage={stage} means reshard_after_forward={str(implied).lower()}, but "
            f"parallel.reshard_after_forward={str(config.reshard_after_forward).lower()}: set one of the two (or both alike)"
        )
    if dims is not None and dims.fsdp == 1:
        problems.append(
            f"parallel.zero_stage={stage} shards over dp_shard × cp = {dims.dp_shard} × {dims.cp} = 1 rank: nothing to shard; "
            "use parallel.dp_shard > 1, or zero_stage=null for whole replicas (DDP-style)"
        )
    if config.pp > 1:
        problems.append(
            f"parallel.zero_stage={stage} with pp={config.pp}: the pipeline schedule keeps whole gradients over its "
            "microbatches and reduces them once per schedule step, whatever the stage; set parallel.reshard_after_forward instead"
        )
    return problems


@contextmanager
def accumulating(module: nn.Module, zero_stage: Optional[int]) -> Iterator[None]:
    """Around a micro-batch that is not the last of its optimizer step (Lightning's
    ``block_backward_sync``): the data-parallel reductions that can wait for the last one.

    By ``zero_stage``:

    - None, 1: no gradient reduction at all; whole gradients accumulate on every rank
      (FSDP2, HSDP and DDP-style ``replicate`` alike) and are reduced once, on the last micro-batch;
    - 2, 3: gradients are reduce-scattered on every micro-batch, so they stay sharded; HSDP's
      all-reduce over the replicas waits for the last micro-batch;
    - 1, 2: gathered parameters stay gathered from one micro-batch to the next (one
      all-gather per unit and optimizer step); None and 3 reshard after each backward.

    FSDP2's ``is_last_backward`` stays on: each micro-batch's backward is a whole one. Its
    end-of-backward bookkeeping keeps HSDP's partial sums and clears the forward order that
    backward prefetching follows; switched off between micro-batches (as torch's pipeline
    stages do), the first unit's backward prefetched the previous micro-batch's last unit:
    one wasted all-gather per step.
    """
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        if zero_stage in REDUCE_EVERY_MICROBATCH_STAGES:
            unit.set_requires_all_reduce(False, recurse=False)
        else:
            unit.set_requires_gradient_sync(False, recurse=False)
        if zero_stage in KEEP_GATHERED_STAGES:
            unit.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)  # reduce-scatter and all-reduce
            unit.set_reshard_after_backward(True, recurse=False)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    if precision not in _PARAM_DTYPE:
        raise ConfigError(f"precision={precision!r} is not supported; use one of {list(SUPPORTED_PRECISIONS)}")
    return MixedPrecisionPolicy(param_dtype=_PARAM_DTYPE[precision], reduce_dtype=torch.float32)


def apply_data_parallel(
    model: nn.Module,
    plan: ParallelPlan,
    meshes: dict[str, DeviceMesh],
    dims: ParallelDims,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool,
    prefetch: int = 1,
    cpu_offload: bool = False,
    unit_min_bytes: int = 0,
) -> None:
    """Wrap ``model`` (the plan root, or one pipeline stage of it) unit by unit: consecutive
    blocks grouped into units of at least ``unit_min_bytes`` of parameters (one per block at 0),
    the plan's extra units, then the root."""
    if not dims.data_parallel_enabled:
        return
    blocks = blocks_of(model, plan)
    groups = [[blocks[i] for i in group] for group in group_blocks([_bytes(block) for block in blocks], unit_min_bytes)]
    # (modules of the unit, whether backward starts with it: the plan's last unit, the head)
    extra_units = [
        ([m for name in unit if (m := present_module(model, name)) is not None], index == len(plan.fsdp_units) - 1)
        for index, unit in enumerate(plan.fsdp_units)
    ]
    smallest_block = min((_numel(block) for block in blocks), default=0)
    # a Llama-3 embedding is as large as a block; a small vocabulary's is not
    extra_units = [
        (unit, runs_last) for unit, runs_last in extra_units
        if unit and is_own_unit(_numel(*unit), _bytes(*unit), smallest_block, unit_min_bytes)
    ]
    if dims.fsdp == 1:
        for unit in groups + [unit for unit, _ in extra_units]:
            replicate(_one_or_list(unit), mesh=meshes["dp_replicate"], mp_policy=mp_policy)
        replicate(model, mesh=meshes["dp_replicate"], mp_policy=mp_policy)
        return
    shard_mesh = meshes["fsdp"] if dims.dp_replicate == 1 else meshes["hsdp"]
    # pinned host memory makes the copies to the GPU asynchronous; without a GPU it cannot be had
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    options = {"mesh": shard_mesh, "mp_policy": mp_policy, "offload_policy": offload}
    for index, group in enumerate(groups):
        # The backward pass starts with the last block: re-gathering it at once is wasted work.
        reshard = reshard_after_forward and index < len(groups) - 1
        fully_shard(_one_or_list(group), reshard_after_forward=reshard, **options)
    for unit, runs_last in extra_units:
        # like the last block, the head is needed again as soon as backward starts
        fully_shard(_one_or_list(unit), reshard_after_forward=reshard_after_forward and not runs_last, **options)
    # the root holds the head when it is not a unit of its own (or a tied embedding): needed
    # again as soon as backward starts, like the last block
    fully_shard(model, reshard_after_forward=False, **options)
    if prefetch > 1:
        _prefetch_ahead([group[0] for group in groups], prefetch)


def group_blocks(sizes: list[int], min_bytes: int) -> list[list[int]]:
    """Consecutive block indices, cut into groups holding at least ``min_bytes`` each; one group
    per block when ``min_bytes`` is 0. The blocks of a last group that would hold less are left
    out: they join the root unit (with a small model, the root is then the only unit)."""
    groups: list[list[int]] = []
    held = min_bytes  # start a new group at the first block
    for index, size in enumerate(sizes):
        if held >= min_bytes:
            groups.append([])
            held = 0
        groups[-1].append(index)
        held += size
    if groups and held < min_bytes:
        groups.pop()
    return groups


def _one_or_list(modules: list[nn.Module]) -> nn.Module | list[nn.Module]:
    """FSDP2 makes one unit of a list of modules (one all-gather / reduction for all of them)."""
    return modules[0] if len(modules) == 1 else modules


def _numel(*modules: nn.Module) -> int:
    return sum(param.numel() for module in modules for param in module.parameters())


def _bytes(*modules: nn.Module) -> int:
    """Parameter bytes (of the whole tensors: a tensor-parallel DTensor counts its global size)."""
    return sum(param.numel() * param.element_size() for module in modules for param in module.parameters())


def _prefetch_ahead(blocks: list[nn.Module], depth: int) -> None:
    """Explicit FSDP2 prefetch: each block starts the all-gathers of the next ``depth`` blocks
    (in forward order, and in reverse order for backward)."""
    units: list[FSDPModule] = [block for block in blocks if isinstance(block, FSDPModule)]
    for index, unit in enumerate(units):
        unit.set_modules_to_forward_prefetch(units[index + 1 : index + 1 + depth])
        unit.set_modules_to_backward_prefetch(units[max(0, index - depth) : index][::-1])
