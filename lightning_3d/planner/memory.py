"""Memory of one rank under a layout, part by part (the assumptions are listed in
:mod:`lightning_3d.planner`).

- Model states: every parameter's local shard, exactly as the strategy cuts it: tensor
  parallel splits a weight along its plan's dim, FSDP2 then cuts dim 0 of that piece into
  ``dp_shard × cp`` chunks the way ``torch.chunk`` does (the first chunks get the rounded-up
  size), dp_replicate keeps copies. Pipeline parallel keeps this rank's stages only (the
  project's own block split; the embedding on the first stage, the final norm and head on
  the last). Gradients have the shape of the local shards; AdamW keeps two states of that
  shape and one ``step`` scalar per parameter.
- Activations: what autograd saves for backward in one block of the reference model,
  counted tensor by tensor from its shapes (see :func:`block_saved_bytes`), times the
  microbatches the schedule keeps in flight on the stage, plus the embedding's indices and
  the final norm; the loss's log-softmax ("logits") apart.
- Pipeline buffers: the receive buffers ``PipelineStage`` allocates per microbatch, and the
  stage outputs it caches until their backward.
- Communication buffers: FSDP2's unsharded blocks (the gathered one and the ones prefetched)
  or, when parameters stay gathered for the step, every unit of the rank; one unit's
  unsharded gradient and its reduce-scatter input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import prod

from lightning_3d.parallel.data_parallel import group_blocks, is_own_unit, resolved_unit_min_bytes
from lightning_3d.parallel.pipeline_parallel import V_SHAPED, split_blocks, stages_of_rank
from lightning_3d.planner.layouts import Layout
from lightning_3d.planner.schedule import in_flight, peak_split
from lightning_3d.planner.shapes import ModelShape

_INT64, _FP32 = 8, 4
PREFETCH = 1  # FSDP2's own: the next block is gathered while the current one computes


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of tensor under a Lightning precision flag."""

    name: str
    param: int  # sharded parameters (the optimizer's copy)
    grad: int
    optimizer: int  # each AdamW state
    activation: int  # matmul and attention outputs
    compute: int  # gathered parameters used in the matmuls
    reduce: int = _FP32  # gradient reduction (FSDP2's reduce dtype is always fp32 here)

    @classmethod
    def of(cls, flag: str) -> "Precision":
        if flag.startswith("bf16-mixed") or flag.startswith("16-mixed"):
            return cls(flag, 4, 4, 4, 2, 2)
        if flag.startswith("bf16") or flag.startswith("16"):
            return cls(flag, 2, 2, 2, 2, 2)
        return cls(flag, 4, 4, 4, 4, 4)

    @property
    def mixed(self) -> bool:
        return self.compute < self.param


@dataclass(frozen=True)
class Unit:
    """One FSDP2 unit of a stage: its parameters' tensor-parallel-local shapes."""

    kind: str  # block | embedding | head | root
    shapes: tuple[tuple[int, ...], ...]
    resharded: bool  # freed after forward (gathered again for backward)
    table: bool = False  # an untied embedding (whose TP gradient comes out whole, see model_states)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes one rank holds at its peak, by what holds them."""

    parameters: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    pipeline_buffers: int = 0
    communication_buffers: int = 0
    logits: int = 0
    reserved: int = 0  # runtime context and allocator slack (cluster.reserved_gib)
    saved_for_backward: int = field(default=0, compare=False)  # what a saved-tensors hook sees

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return (
            self.model_states + self.activations + self.pipeline_buffers + self.communication_buffers
            + self.logits + self.reserved
        )

    def parts(self) -> dict[str, int]:
        return {
            "parameters": self.parameters,
            "gradients": self.gradients,
            "optimizer states": self.optimizer_states,
            "activations": self.activations,
            "pipeline buffers": self.pipeline_buffers,
            "communication buffers": self.communication_buffers,
            "logits": self.logits,
            "reserved": self.reserved,
        }


# ----------------------------------------------------------------------------- the stages and their units


@lru_cache(maxsize=None)
def stage_blocks(n_layers: int, num_stages: int) -> tuple[tuple[int, ...], ...]:
    """The project's balanced split (embedding and head each weigh one block)."""
    return tuple(tuple(blocks) for blocks in split_blocks(n_layers, num_stages, 1.0, 1.0))


def rank_stages(shape: ModelShape, layout: Layout, pp_rank: int) -> list[tuple[int, tuple[int, ...]]]:
    """(stage index, its blocks) of every stage rank ``pp_rank`` holds."""
    if layout.pp == 1:
        return [(0, tuple(range(shape.n_layers)))]
    split = stage_blocks(shape.n_layers, layout.num_stages)
    return [(s, split[s]) for s in stages_of_rank(pp_rank, layout.pp, layout.stages_per_rank, layout.pp_schedule)]


def _tp_local(shape: tuple[int, ...], split: str, tp: int) -> tuple[int, ...]:
    if split == "col":
        return (shape[0] // tp, *shape[1:])
    if split == "row":
        return (shape[0], shape[1] // tp)
    return shape


def stage_units(shape: ModelShape, layout: Layout, stage: int, blocks: tuple[int, ...]) -> list[Unit]:
    # the strategy's default (perf.dp_unit_min_mb unset)
    unit_min_bytes = resolved_unit_min_bytes(None, layout.fsdp, layout.dp_replicate)
    return list(_stage_units(shape, layout.tp, layout.reshard_after_forward, stage == 0, stage == layout.num_stages - 1, blocks,
                             unit_min_bytes))


@lru_cache(maxsize=None)
def _stage_units(
    shape: ModelShape, tp: int, reshard: bool, first: bool, last: bool, blocks: tuple[int, ...], unit_min_bytes: int = 0
) -> tuple[Unit, ...]:
    """The FSDP2 units of one stage, in forward order (lightning_3d.parallel.data_parallel): the
    blocks, grouped into units of at least ``unit_min_bytes`` of fp32 parameters (one per block at
    0; all but the last resharded after forward), then the embedding and the final norm + head as
    units of their own when each is at least as large as a block and as that minimum (the head is
    not resharded), and the stage's root unit with the rest (never resharded): a tied embedding,
    an embedding or head smaller than a block, the blocks of a last group below the minimum."""
    block = tuple(_tp_local(full, split, tp) for _, full, split in shape.block_parameters())
    groups = group_blocks([shape.block_size * _FP32] * len(blocks), unit_min_bytes)
    units = [Unit("block", block * len(group), reshard and index < len(groups) - 1) for index, group in enumerate(groups)]
    table = _tp_local((shape.vocab_size, shape.dim), shape.table_split(), tp)
    table_size = shape.vocab_size * shape.dim
    root: tuple[tuple[int, ...], ...] = block * (len(blocks) - sum(len(group) for group in groups))

    def own_unit(elements: int) -> bool:
        return is_own_unit(elements, elements * _FP32, shape.block_size if blocks else 0, unit_min_bytes)

    if shape.tie_embeddings:
        if first or last:
            root += (table,)
        if last:
            root += ((shape.dim,),)
    else:
        if first and own_unit(table_size):
            units.append(Unit("embedding", (table,), reshard, table=True))
        elif first:
            root += (table,)
        if last and own_unit(table_size + shape.dim):
            units.append(Unit("head", ((shape.dim,), table), False))
        elif last:
            root += ((shape.dim,), table)
    if root:
        units.append(Unit("root", root, False, table=first and not shape.tie_embeddings))
    return tuple(units)


def rank_units(shape: ModelShape, layout: Layout, pp_rank: int) -> list[Unit]:
    return [unit for stage, blocks in rank_stages(shape, layout, pp_rank) for unit in stage_units(shape, layout, stage, blocks)]


def shard_numel(shape: tuple[int, ...], parts: int, index: int = 0) -> int:
    """Elements of chunk ``index`` when dim 0 is cut into ``parts`` as ``torch.chunk`` cuts it."""
    if parts == 1:
        return prod(shape)
    chunk = -(-shape[0] // parts)
    rows = max(0, min(chunk, shape[0] - index * chunk))
    return rows * prod(shape[1:])


def padded_numel(shape: tuple[int, ...], parts: int) -> int:
    """Elements of the whole tensor once FSDP2 pads dim 0 to a multiple of ``parts``."""
    return -(-shape[0] // parts) * parts * prod(shape[1:])


@lru_cache(maxsize=None)
def unit_numels(shapes: tuple[tuple[int, ...], ...], parts: int, index: int = 0) -> tuple[int, int]:
    """(elements of FSDP shard ``index`` of a unit's parameters, elements FSDP2 gathers: dim 0 padded)."""
    return sum(shard_numel(t, parts, index) for t in shapes), sum(padded_numel(t, parts) for t in shapes)


# ----------------------------------------------------------------------------- model states


def model_states(shape: ModelShape, layout: Layout, precision: Precision, pp_rank: int = 0, fsdp_index: int = 0) -> tuple[int, int, int]:
    """(parameters, gradients, optimizer states) bytes of the rank at pipeline position ``pp_rank``
    and FSDP shard ``fsdp_index`` (0 holds the largest chunks)."""
    parts = layout.fsdp
    params = tensors = 0
    table_grad_extra = 0
    for unit in rank_units(shape, layout, pp_rank):
        params += unit_numels(unit.shapes, parts, fsdp_index)[0]
        tensors += len(unit.shapes)
        if unit.table and layout.tp > 1 and parts == 1 and layout.dp_replicate == 1 and shape.table_split() == "col":
            # measured (torch 2.13): without data parallel, the vocab-sharded embedding's gradient
            # comes out of backward whole
            table_grad_extra += prod((shape.vocab_size, shape.dim)) - prod(unit.shapes[0])
    return (
        params * precision.param,
        (params + table_grad_extra) * precision.grad,
        2 * params * precision.optimizer + tensors * _FP32,  # exp_avg, exp_avg_sq; a step count each
    )


# ----------------------------------------------------------------------------- activations


def local_seq(layout: Layout, seq_len: int) -> int:
    return seq_len // layout.cp


def block_saved_bytes(shape: ModelShape, layout: Layout, precision: Precision, microbatch: int, seq_len: int) -> tuple[int, int, int]:
    """(bytes autograd saves for one block's backward, the part of them only the input
    gradients read, the part the weights' own nodes hold), for one microbatch on one rank.

    Per token (``a`` = activation bytes, ``sp`` = tp under sequence parallel else 1): each of
    the two norms keeps its input in fp32 and its normalized output (both cut by sequence
    parallel), and the gathered output the projections read (``(4 + a)/sp + a`` per dim);
    attention keeps q, k, v and its output (``(2h + 2kv)·hd/tp``), the log-sum-exp (fp32)
    and, for the ring backend, the copy its output projection reads; the SwiGLU keeps four
    ``ffn/tp`` tensors; each norm its fp32 reciprocal RMS. Rotary angles: two
    ``seq × hd/2`` fp32 tables per block. The input-gradient-only part: the norms' inputs
    and reciprocal RMS, attention's tensors and the rotary tables. The weights' own nodes
    (what a split backward's weight half runs, and frees): the norms' normalized outputs
    (multiplied by their weights), the gathered outputs and the down projection's input (the
    matmuls' inputs); the SwiGLU's other three tensors sit on the input path only.
    """
    a, sp, tp = precision.activation, layout.sp, layout.tp
    s_local = local_seq(layout, seq_len)
    tokens = microbatch * s_local
    d, hd = shape.dim, shape.head_dim
    heads, kv = shape.n_heads // tp, shape.kv_heads // tp
    norms_input_only = 2 * (4 * d / sp + _FP32 / sp)  # inputs (fp32) and reciprocal RMS
    norms_weight = 2 * (a * d / sp + a * d)  # normalized outputs; the gathered outputs
    attention = (2 * heads + 2 * kv) * hd * a + heads * _FP32
    ring_copy = heads * hd * a if layout.cp > 1 else 0.0  # the ring's output, re-laid out for wo
    ffn = 4 * (shape.ffn_dim // tp) * a
    rotary = 2 * s_local * (hd // 2) * _FP32
    total = int(tokens * (norms_input_only + norms_weight + attention + ring_copy + ffn)) + rotary
    input_only = int(tokens * (norms_input_only + attention)) + rotary
    weight_nodes = int(tokens * (norms_weight + ffn / 4))
    return total, input_only, weight_nodes


def checkpointed(index: int, layout: Layout) -> bool:
    mode = layout.activation_checkpoint
    return mode == "full" or (mode == "selective" and index % layout.ac_every == 0)


def residual_bytes(shape: ModelShape, layout: Layout, precision: Precision, microbatch: int, seq_len: int) -> int:
    """One microbatch's residual stream on this rank (a block's input; what a pipeline stage sends)."""
    return microbatch * local_seq(layout, seq_len) // layout.sp * shape.dim * precision.activation


def logits_bytes(shape: ModelShape, layout: Layout, microbatch: int, seq_len: int, element: int = _FP32) -> int:
    vocab = shape.vocab_size // layout.tp if layout.loss_parallel else shape.vocab_size
    return microbatch * local_seq(layout, seq_len) * vocab * element


@dataclass(frozen=True)
class StageActivations:
    """One microbatch of one stage: what it keeps for backward, and what recomputation adds."""

    saved: int  # blocks (checkpointed ones keep their input) and the embedding's indices
    ends: int  # final norm, labels, loss scalars (last stage)
    logits: int  # the log-softmax kept by the loss (last stage)
    recompute: int  # one checkpointed block's saved tensors, rebuilt during its backward
    kept_after_weight: int  # still held from a split backward's weight half to the step's end
    logits_kept: int = 0  # the part of kept_after_weight that is the loss's log-softmax

    @property
    def held(self) -> int:
        return self.saved + self.ends + self.logits


def stage_activations(
    shape: ModelShape, layout: Layout, precision: Precision, stage: int, blocks: tuple[int, ...], microbatch: int, seq_len: int
) -> StageActivations:
    full_block, input_only, weight_nodes = block_saved_bytes(shape, layout, precision, microbatch, seq_len)
    block_input = residual_bytes(shape, layout, precision, microbatch, seq_len)
    saved = sum(block_input if checkpointed(index, layout) else full_block for index in blocks)
    recompute = full_block if any(checkpointed(index, layout) for index in blocks) else 0
    tokens = microbatch * local_seq(layout, seq_len)
    ends = logits = 0
    first, last = stage == 0, stage == layout.num_stages - 1
    if first:
        saved += tokens * _INT64  # the embedding's token ids
    if last:
        a, d, sp = precision.activation, shape.dim, layout.sp
        ends = int(tokens * ((4 + a) * d / sp + a * d + _FP32 / sp))  # final norm, the head's gathered input
        ends += tokens * _INT64 + 2 * _FP32  # labels; the loss's scalars
        logits = logits_bytes(shape, layout, microbatch, seq_len)
    # a split backward's input half runs with retain_graph, so what its weight half (retain_graph
    # off) does not run stays saved until the graph goes at the step's end (measured, torch 2.13
    # saved-tensors hook):
    # - the first stage keeps nothing: its "weight half" is a full backward;
    # - a middle stage keeps what only input gradients read in its blocks: the rest of its
    #   graph goes with the stage's backward state after the weight half; a checkpointed
    #   block keeps nothing (its saved input goes too);
    # - the last stage keeps its whole graph (the loss's tensors reach it): everything but what
    #   the weights' own nodes hold, which the weight half runs and frees (the blocks' matmul
    #   inputs and normalized outputs, the final norm's output and the head's input). So a
    #   checkpointed block keeps its input (its recomputation is not saved through the graph's
    #   hooks), and the loss keeps its log-softmax.
    logits_kept = 0
    if first:
        kept = 0
    elif last:
        a, d, sp = precision.activation, shape.dim, layout.sp
        weight_read = sum(0 if checkpointed(index, layout) else weight_nodes for index in blocks)
        weight_read += int(tokens * (a * d / sp + a * d))  # the final norm's output, the head's input
        kept, logits_kept = saved + ends + logits - weight_read, logits
    else:
        kept = sum(0 if checkpointed(index, layout) else input_only for index in blocks)
    return StageActivations(saved, ends, logits, recompute, kept, logits_kept)


def microbatch_size(layout: Layout, global_batch_size: int) -> int:
    return global_batch_size // layout.dp // layout.microbatches


# ----------------------------------------------------------------------------- one rank


def rank_memory(
    shape: ModelShape,
    layout: Layout,
    precision: Precision,
    seq_len: int,
    global_batch_size: int,
    pp_rank: int = 0,
    fsdp_index: int = 0,
    reserved: int = 0,
) -> MemoryBreakdown:
    """Every part of the peak memory of the rank at pipeline position ``pp_rank``."""
    params, grads, optimizer = model_states(shape, layout, precision, pp_rank, fsdp_index)
    mb = microbatch_size(layout, global_batch_size)
    stages = rank_stages(shape, layout, pp_rank)
    per_stage = {stage: stage_activations(shape, layout, precision, stage, blocks, mb, seq_len) for stage, blocks in stages}
    schedule = (layout.pp_schedule, layout.pp, layout.microbatches, layout.stages_per_rank)
    held = in_flight(*schedule, pp_rank)
    saved, logits_saved = peak_split(
        *schedule, pp_rank,
        {s: a.held for s, a in per_stage.items()}, {s: a.kept_after_weight for s, a in per_stage.items()},
        {s: a.logits for s, a in per_stage.items()}, {s: a.logits_kept for s, a in per_stage.items()},
    )
    recompute = max((a.recompute for a in per_stage.values()), default=0)
    activations = int(saved) - int(logits_saved) + recompute

    # the logits themselves live next to their log-softmax while the loss runs (in the compute
    # dtype, gathered over tp without loss parallel); a pipeline caches each in-flight stage output
    last = layout.num_stages - 1
    logits = int(logits_saved)
    if last in per_stage:
        cached = held[last] if layout.pp > 1 else 1
        logits += cached * logits_bytes(shape, layout, mb, seq_len, precision.activation)

    buffers = 0
    if layout.pp > 1:
        residual = residual_bytes(shape, layout, precision, mb, seq_len)
        for stage in per_stage:
            if stage > 0 and not _same_rank(layout, stage - 1, stage):
                buffers += (layout.microbatches - held[stage]) * residual  # receive buffers not already saved
            if stage < last and not _same_rank(layout, stage, stage + 1):
                buffers += layout.microbatches * residual  # gradient receive buffers
                buffers += held[stage] * residual  # cached stage outputs
    return MemoryBreakdown(
        parameters=params,
        gradients=grads,
        optimizer_states=optimizer,
        activations=activations,
        pipeline_buffers=buffers,
        communication_buffers=communication_buffers(shape, layout, precision, pp_rank),
        logits=logits,
        reserved=reserved,
        saved_for_backward=int(saved),
    )


def _same_rank(layout: Layout, stage: int, other: int) -> bool:
    """Whether two adjacent stages sit on one rank: the turn of a V-shaped schedule."""
    return layout.pp_schedule in V_SHAPED and {stage, other} == {layout.pp - 1, layout.pp}


def communication_buffers(shape: ModelShape, layout: Layout, precision: Precision, pp_rank: int) -> int:
    """Gathered parameters and unsharded gradients held by FSDP2 (or by autocast's weight copies)."""
    units = rank_units(shape, layout, pp_rank)
    if not units:
        return 0
    sizes = [unit_numels(unit.shapes, 1)[0] for unit in units]
    if layout.fsdp == 1:
        if layout.dp_replicate == 1 and precision.mixed:
            return sum(sizes) * precision.compute  # autocast keeps a low-precision copy of each weight
        return max(sizes) * precision.reduce  # one unit's gradients being all-reduced
    if layout.reshard_after_forward and layout.pp == 1:
        blocks = sorted((s for s, u in zip(sizes, units) if u.kind == "block"), reverse=True)
        others = [s for s, u in zip(sizes, units) if u.kind != "block" and not u.resharded]
        held = sum(blocks[: 1 + PREFETCH]) + sum(others)
    else:
        held = sum(sizes)  # gathered for the whole step (ZeRO-2 style, or under pp)
    largest = max(sizes)
    return held * precision.compute + largest * (precision.compute + precision.reduce)
