"""What one rank communicates in one optimizer step, per mesh view and kind of op.

The same accounting as :func:`lightning_3d.comm.expected_step_volume` (its ``Volume`` and
``wire_bytes``, and its step-health reduction, which the training loss rides, are used as they are), for every layout
the planner offers rather than the one-parallelism-at-a-time runs that function covers:
tensor-parallel sizes shrink by tp, FSDP2 units are the tensor-parallel shards (padded as
FSDP2 pads them), pipeline stages send the sequence-parallel shard of the residual stream,
context parallel moves this rank's K/V heads, activation checkpointing runs a checkpointed
block's forward collectives again, and the gathers and casts follow the precision (FSDP2
gathers in the compute dtype and reduces in fp32; the ring sends K/V in the activation dtype
and dK/dV in fp32). Where both apply, the two agree byte for byte (tests/test_planner.py).

Keys are mesh views, as in ``lightning_3d.comm``: ``tp``, ``cp``, ``pp``, ``dp_shard``,
``dp_replicate``, ``fsdp`` (dp_shard × cp), ``world``; a tied embedding's gradients, summed
between the first and the last stage's ranks, are counted on ``pp`` (a two-rank group along it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache

from lightning_3d.comm import Totals, Volume, add_volume, step_health_volume
from lightning_3d.planner.layouts import Layout
from lightning_3d.planner.memory import (
    Precision,
    checkpointed,
    local_seq,
    microbatch_size,
    rank_stages,
    residual_bytes,
    shard_numel,
    stage_units,
    unit_numels,
)
from lightning_3d.planner.shapes import ModelShape

_FP32 = 4
VIEW_SIZES = {
    "tp": lambda lay: lay.tp,
    "cp": lambda lay: lay.cp,
    "pp": lambda lay: lay.pp,
    "dp_shard": lambda lay: lay.dp_shard,
    "dp_replicate": lambda lay: lay.dp_replicate,
    "fsdp": lambda lay: lay.fsdp,
    "world": lambda lay: lay.world_size,
}


@dataclass(frozen=True)
class _Rank:
    """What one rank runs in a step: its stages' blocks, ends and microbatches."""

    microbatch: int
    repeats: int
    blocks: tuple[int, ...]
    stages: tuple[int, ...]
    has_embedding: bool
    has_head: bool


def _rank(shape: ModelShape, layout: Layout, global_batch_size: int, pp_rank: int) -> _Rank:
    stages = rank_stages(shape, layout, pp_rank)
    return _Rank(
        microbatch=microbatch_size(layout, global_batch_size),
        repeats=layout.microbatches if layout.pp > 1 else 1,
        blocks=tuple(block for _, blocks in stages for block in blocks),
        stages=tuple(stage for stage, _ in stages),
        has_embedding=any(stage == 0 for stage, _ in stages),
        has_head=any(stage == layout.num_stages - 1 for stage, _ in stages),
    )


def step_volume(
    shape: ModelShape, layout: Layout, precision: Precision, seq_len: int, global_batch_size: int, pp_rank: int = 0
) -> dict[str, Totals]:
    """Source → {(mesh view, kind): Volume} of one steady-state optimizer step on the rank at
    pipeline position ``pp_rank`` (sources as in ``lightning_3d.comm.expected_step_volume``)."""
    rank = _rank(shape, layout, global_batch_size, pp_rank)
    sources = {
        "tp": _tensor_parallel(shape, layout, precision, seq_len, rank),
        "sp_norm_grads": _sequence_parallel_norm_grads(shape, layout, rank),
        "data_parallel": _data_parallel(shape, _data_parallel_key(layout), precision, pp_rank),
        "pp": _pipeline(shape, layout, precision, seq_len, rank),
        "cp": _context_parallel(shape, layout, precision, seq_len, rank),
        "tied": _tied(shape, layout, precision, rank),
        "step_health": step_health_volume(layout.world_size),
    }
    return {name: table for name, table in sources.items() if table}


def per_view(sources: dict[str, Totals]) -> dict[str, Volume]:
    """Every source summed by mesh view."""
    out: dict[str, Volume] = {}
    for table in sources.values():
        for (view, _), volume in table.items():
            out[view] = out.get(view, Volume()) + volume
    return out


def _tensor_parallel(shape: ModelShape, layout: Layout, precision: Precision, seq_len: int, rank: _Rank) -> Totals:
    table: Totals = {}
    tp = layout.tp
    if tp == 1:
        return table
    a = precision.activation
    tokens = rank.microbatch * local_seq(layout, seq_len)
    residual = tokens * shape.dim * a  # the full residual stream of one microbatch on this rank
    ends = int(rank.has_embedding) + int(rank.has_head)
    # each block: two collectives in forward (attention and FFN), two in backward. A checkpointed
    # block runs its forward again in backward, up to the last tensor it saves: both gathers and
    # the attention output's reduction, not the FFN output's
    recomputed = sum(checkpointed(index, layout) for index in rank.blocks)
    per_pass = 4 * len(rank.blocks) + ends
    if layout.sequence_parallel:
        add_volume(table, "tp", "all_gather", (per_pass + 2 * recomputed) * rank.repeats, residual, tp)
        add_volume(table, "tp", "reduce_scatter", (per_pass + recomputed) * rank.repeats, residual, tp)
    else:
        add_volume(table, "tp", "all_reduce", (per_pass + recomputed) * rank.repeats, residual, tp)
    if rank.has_head:
        if layout.loss_parallel:  # the vocab-sharded cross entropy: max, sum of exps, target logit
            add_volume(table, "tp", "all_reduce", 3 * rank.repeats, tokens * _FP32, tp)
        else:  # the head's output gathered whole
            add_volume(table, "tp", "all_gather", rank.repeats, tokens * shape.vocab_size * a, tp)
    return table


def _sequence_parallel_norm_grads(shape: ModelShape, layout: Layout, rank: _Rank) -> Totals:
    """Norm weights see 1/tp of the tokens: their partial gradients are all-reduced over tp once
    before the optimizer step, whole (measured so under FSDP2 too)."""
    table: Totals = {}
    if layout.tp > 1 and layout.sequence_parallel:
        norms = 2 * len(rank.blocks) + int(rank.has_head)
        add_volume(table, "tp", "all_reduce", norms, shape.dim * _FP32, layout.tp)
    return table


def _data_parallel_key(layout: Layout) -> Layout:
    """The layout with the knobs that do not change data-parallel traffic set alike (a cache key)."""
    return replace(layout, activation_checkpoint="none", microbatches=1, loss_parallel=False)


@lru_cache(maxsize=4096)
def _data_parallel(shape: ModelShape, layout: Layout, precision: Precision, pp_rank: int) -> Totals:
    table: Totals = {}
    units = Counter(unit for stage, blocks in rank_stages(shape, layout, pp_rank) for unit in stage_units(shape, layout, stage, blocks))
    if layout.fsdp == 1:  # DDP-style: each unit's gradients all-reduced once
        for unit, times in units.items():
            add_volume(table, "dp_replicate", "all_reduce", times, unit_numels(unit.shapes, 1)[0] * _FP32, layout.dp_replicate)
        return table
    view = "fsdp" if layout.dp_replicate == 1 or layout.cp > 1 else "dp_shard"
    for unit, times in units.items():
        gathered = unit_numels(unit.shapes, layout.fsdp)[1]  # dim 0 padded to a multiple of the shards
        # forward, and again for backward when resharded after forward; under pp the strategy
        # keeps parameters gathered for the whole step, so each unit is gathered once
        gathers = 1 + int(layout.pp == 1 and unit.resharded)
        add_volume(table, view, "all_gather", gathers * times, gathered * precision.compute, layout.fsdp)
        add_volume(table, view, "reduce_scatter", times, gathered * precision.reduce, layout.fsdp)
        add_volume(table, "dp_replicate", "all_reduce", times, gathered // layout.fsdp * precision.reduce, layout.dp_replicate)  # HSDP
    return table


def _pipeline(shape: ModelShape, layout: Layout, precision: Precision, seq_len: int, rank: _Rank) -> Totals:
    table: Totals = {}
    if layout.pp == 1:
        return table
    activation = residual_bytes(shape, layout, precision, rank.microbatch, seq_len)
    last = layout.num_stages - 1
    for stage in rank.stages:
        # each microbatch crosses every boundary of the stage that leads to another rank:
        # an activation one way, its gradient back
        neighbours = [other for other in (stage - 1, stage + 1) if 0 <= other <= last and other not in rank.stages]
        add_volume(table, "pp", "send", len(neighbours) * rank.repeats, activation, layout.pp)
        add_volume(table, "pp", "recv", len(neighbours) * rank.repeats, activation, layout.pp)
    return table


def _context_parallel(shape: ModelShape, layout: Layout, precision: Precision, seq_len: int, rank: _Rank) -> Totals:
    table: Totals = {}
    cp = layout.cp
    if cp == 1:
        return table
    kv = rank.microbatch * (shape.kv_heads // layout.tp) * local_seq(layout, seq_len) * shape.head_dim
    passes = len(rank.blocks) * rank.repeats
    recomputed = sum(checkpointed(index, layout) for index in rank.blocks) * rank.repeats
    # forward: K and V travel cp−1 hops (again when recomputed); backward: K and V cp−1 hops, and
    # their fp32 gradients cp hops (the last brings them home)
    kv_hops = 2 * (cp - 1) * (2 * passes + recomputed)
    grad_hops = 2 * cp * passes
    for count, size in ((kv_hops, kv * precision.activation), (grad_hops, kv * _FP32)):
        add_volume(table, "cp", "send", count, size, cp)
        add_volume(table, "cp", "recv", count, size, cp)
    return table


def _tied(shape: ModelShape, layout: Layout, precision: Precision, rank: _Rank) -> Totals:
    """A weight tied across the first and last stage: each copy's gradient summed with the other's."""
    table: Totals = {}
    ends_apart = layout.pp > 1 and not (rank.has_embedding and rank.has_head)
    if shape.tie_embeddings and ends_apart and (rank.has_embedding or rank.has_head):
        table_shape = (shape.vocab_size // (layout.tp if shape.table_split() == "col" else 1), shape.dim)
        add_volume(table, "pp", "all_reduce", 1, shard_numel(table_shape, layout.fsdp) * precision.grad, 2)
    return table
