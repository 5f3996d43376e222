"""Communication accounting: what every collective and point-to-point op moves, per mesh dim.

:class:`CommCounter` is a ``TorchDispatchMode`` that sees every ``torch.ops.c10d.*`` op (what
``torch.distributed``'s eager API dispatches to) and every functional collective
(``torch.ops._c10d_functional*``, what DTensor and ``_functional_collectives`` use). Like
torch's ``CommDebugMode`` it steps aside for DTensor (returns ``NotImplemented``), so DTensor
first desugars into the collectives it really runs and those reach the mode. An op issued
from inside the mode's own handler is not seen again, so a functional ``all_reduce`` that
runs ``c10d.allreduce_`` underneath is counted once. We keep our own mode because
``CommDebugMode`` counts calls only: it has no bytes and no process group → mesh dim.

Each :class:`CommRecord` has two sizes:

- ``bytes``: the logical full buffer — the output of an all-gather, the input of a
  reduce-scatter, the tensor otherwise (for a send and a recv: the message);
- ``wire_bytes``: what this rank sends under ring algorithms over a group of n ranks:
  all-reduce 2(n−1)/n·S, all-gather and reduce-scatter (n−1)/n·S_full, all-to-all
  (n−1)/n·S, broadcast and reduce S on every rank (a pipelined chain: each rank but the
  last forwards the whole buffer once), send S, recv 0 (received bytes are charged to the
  sender, so a group's wire bytes add up to what crossed its links), gather S_in on the
  non-roots, scatter (n−1)/n·S_full on the root.

The second half of the module gives the analytic volumes of one training step of the
reference Llama model (:func:`expected_step_volume`), keyed like the counter's totals.

What a step issues (torch 2.13, gloo on CPU, checked by tests/test_comm.py): FSDP2 runs
``c10d._allgather_base_`` and ``c10d._reduce_scatter_base_`` (gloo has reduce-scatter: no
all-reduce fallback), one per unit; DDP-style ``replicate`` one ``c10d.allreduce_`` per unit;
DTensor (TP/SP) functional collectives; pipeline stages and ring attention ``c10d.send`` /
``c10d.recv_``; the loss and the step's health check ``c10d.allreduce_``. The gradients of
sequence-parallel norm weights come out of backward as ``Partial`` DTensors; the strategy
all-reduces each once before the step (``parallel.grad_clip.reduce_partial_grads``).

Limits: every op dispatches through Python while counting (debug runs only); ops inside
``torch.compile``'d regions are not seen one by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_3d.compat import (
    OpOverload,
    TorchDispatchMode,
    _resolve_process_group,
    op_arguments,
    op_name,
)
from lightning_3d.config import Config, ModelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.data_parallel import (
    KEEP_GATHERED_STAGES,
    REDUCE_EVERY_MICROBATCH_STAGES,
    group_blocks,
    is_own_unit,
    resolved_reshard_after_forward,
    resolved_unit_min_bytes,
)
from lightning_3d.parallel.pipeline_parallel import (
    V_SHAPED,
    num_microbatches,
    split_blocks,
    stages_of_rank,
)

# the mesh dims themselves win over flattened views (dp, fsdp, loss) of the same process group
BASIC_DIMS = ("tp", "cp", "pp", "dp_shard", "dp_replicate")
WORLD = "world"


@dataclass(frozen=True)
class CommRecord:
    op: str  # e.g. "c10d.allreduce_", "_c10d_functional.all_gather_into_tensor"
    kind: str  # all_reduce, all_gather, reduce_scatter, broadcast, all_to_all, send, recv, ...
    dim: str  # label of the process group: a mesh dim, "world" or "other:<ranks>"
    group_size: int
    bytes: int
    wire_bytes: float


@dataclass
class Volume:
    """Calls and bytes of one (dim, kind): a measured total or an analytic expectation."""

    count: int = 0
    bytes: float = 0
    wire_bytes: float = 0

    def __add__(self, other: "Volume") -> "Volume":
        return Volume(self.count + other.count, self.bytes + other.bytes, self.wire_bytes + other.wire_bytes)

    def as_dict(self) -> dict[str, float]:
        return {"count": self.count, "bytes": self.bytes, "wire_bytes": self.wire_bytes}


Totals = dict[tuple[str, str], Volume]


def wire_bytes(kind: str, size: int, group_size: int, is_root: bool = False) -> float:
    """Bytes one rank sends for an op of ``kind`` on a buffer of ``size`` bytes (module docstring)."""
    n = group_size
    if n <= 1 or kind in ("recv", "barrier"):
        return 0.0
    if kind == "all_reduce":
        return 2 * (n - 1) / n * size
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * size
    if kind == "gather":
        return 0.0 if is_root else size / n
    if kind == "scatter":
        return (n - 1) / n * size if is_root else 0.0
    return float(size)  # send, broadcast, reduce


# ----------------------------------------------------------------------------- reading op arguments


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


def _first(args: tuple, group_size: int) -> int:
    return _nbytes(args[0])


def _second(args: tuple, group_size: int) -> int:
    return _nbytes(args[1])


def _first_gathered(args: tuple, group_size: int) -> int:
    return _nbytes(args[0]) * group_size


# c10d op name → (kind, index of the process-group argument, bytes of the logical buffer)
_C10D: dict[str, tuple[str, int, Callable[[tuple, int], int]]] = {
    "allreduce_": ("all_reduce", 1, _first),
    "allreduce_coalesced_": ("all_reduce", 1, _first),
    "allgather_": ("all_gather", 2, _first),  # outputs
    "_allgather_base_": ("all_gather", 2, _first),
    "allgather_coalesced_": ("all_gather", 2, _first),
    "allgather_into_tensor_coalesced_": ("all_gather", 2, _first),
    "reduce_scatter_": ("reduce_scatter", 2, _second),  # inputs
    "_reduce_scatter_base_": ("reduce_scatter", 2, _second),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 2, _second),
    "broadcast_": ("broadcast", 1, _first),
    "reduce_": ("reduce", 1, _first),
    "alltoall_": ("all_to_all", 2, _second),
    "alltoall_base_": ("all_to_all", 2, _second),
    "gather_": ("gather", 2, lambda args, n: _nbytes(args[1]) * n),
    "scatter_": ("scatter", 2, _first_gathered),
    "send": ("send", 1, _first),
    "recv_": ("recv", 1, _first),
    "recv_any_source_": ("recv", 1, _first),
    "barrier": ("barrier", 1, lambda args, n: 0),
}
_ROOT_ARG = {"gather_": 3, "scatter_": 3}  # where the root's group rank is (it sends differently)

# functional op name → (kind, index of the group-name argument, bytes of the logical buffer)
_FUNCTIONAL: dict[str, tuple[str, int, Callable[[tuple, int], int]]] = {
    "all_reduce": ("all_reduce", 2, _first),
    "all_reduce_": ("all_reduce", 2, _first),
    "all_reduce_coalesced": ("all_reduce", 2, _first),
    "all_reduce_coalesced_": ("all_reduce", 2, _first),
    "all_gather_into_tensor": ("all_gather", 2, _first_gathered),
    "all_gather_into_tensor_out": ("all_gather", 2, _first_gathered),
    "all_gather_into_tensor_coalesced": ("all_gather", 2, _first_gathered),
    "reduce_scatter_tensor": ("reduce_scatter", 3, _first),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 3, _first),
    "all_to_all_single": ("all_to_all", 3, _first),
    "broadcast": ("broadcast", 2, _first),
    "isend": ("send", 3, _first),
    "irecv": ("recv", 3, _first),
    "batch_p2p_ops": ("p2p", 4, _first),  # recorded as its sends and receives
}
_FUNCTIONAL_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d_functional")


def _positional(func: OpOverload, args: tuple, kwargs: dict) -> tuple:
    """The op's arguments in schema order, defaults filled in."""
    if not kwargs:
        return tuple(args)
    rest = op_arguments(func)[len(args):]
    return tuple(args) + tuple(kwargs.get(a.name, a.default_value) for a in rest)


def _process_group(group: Any) -> dist.ProcessGroup:
    """c10d ops carry the group boxed as a ScriptObject; functional ones carry its name."""
    if isinstance(group, dist.ProcessGroup):
        return group
    if isinstance(group, torch.ScriptObject):
        return dist.ProcessGroup.unbox(group)
    return _resolve_process_group(group)


class CommCounter(TorchDispatchMode):
    """Record every communication op run while the mode is active (see the module docstring).

    Args:
        group_labels: process-group name → label (:func:`group_labels`); other groups are
            "world" (the default group) or "other:<ranks>".
    """

    def __init__(self, group_labels: Optional[Mapping[str, str]] = None) -> None:
        super().__init__()
        self.group_labels = dict(group_labels or {})
        self.records: list[CommRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor desugars first; its collectives come back here
        kwargs = kwargs or {}
        if not isinstance(func, OpOverload):
            return func(*args, **kwargs)  # higher-order operators: never a collective
        self._record(func, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, func: OpOverload, args: tuple, kwargs: dict) -> None:
        namespace, name = func.namespace, op_name(func)
        table = _C10D if namespace == "c10d" else _FUNCTIONAL if namespace in _FUNCTIONAL_NAMESPACES else {}
        if name not in table:
            return
        kind, group_index, size_of = table[name]
        args = _positional(func, args, kwargs)
        group = _process_group(args[group_index])
        op = f"{namespace}.{name}"
        if name == "batch_p2p_ops":
            for direction, tensor in zip(args[0], args[3]):
                self._add(op, "send" if direction == "isend" else "recv", group, _nbytes(tensor), False)
            return
        is_root = name in _ROOT_ARG and args[_ROOT_ARG[name]] == group.rank()
        self._add(op, kind, group, size_of(args, group.size()), is_root)

    def _add(self, op: str, kind: str, group: dist.ProcessGroup, size: int, is_root: bool) -> None:
        n = group.size()
        label = self.group_labels.get(group.group_name) or _fallback_label(group)
        self.records.append(CommRecord(op, kind, label, n, size, wire_bytes(kind, size, n, is_root)))

    def totals(self) -> Totals:
        """(dim, kind) → calls and bytes of everything recorded so far."""
        return totals(self.records)

    def reset(self) -> None:
        self.records.clear()


def totals(records: Iterable[CommRecord]) -> Totals:
    out: Totals = {}
    for record in records:
        key = (record.dim, record.kind)
        out[key] = out.get(key, Volume()) + Volume(1, record.bytes, record.wire_bytes)
    return out


def per_dim(table: Totals) -> dict[str, Volume]:
    """Totals summed over the op kinds of each dim."""
    out: dict[str, Volume] = {}
    for (dim, _), volume in table.items():
        out[dim] = out.get(dim, Volume()) + volume
    return out


def _fallback_label(group: dist.ProcessGroup) -> str:
    if group.group_name == dist.group.WORLD.group_name:
        return WORLD
    return "other:" + ",".join(map(str, dist.get_process_group_ranks(group)))


# ----------------------------------------------------------------------------- mesh → labels


def view_labels(meshes: Mapping[str, DeviceMesh]) -> dict[str, str]:
    """Label of the process group behind each 1-D mesh view, and of "world".

    Views that share one process group (a size-2 dim of a 2-rank job is the default group
    itself; dp and fsdp often equal dp_shard) all get the label of the first of: the mesh
    dims (:data:`BASIC_DIMS`), then the flattened views, then "world".
    """
    by_group: dict[str, list[str]] = {}
    for name, mesh in meshes.items():
        if mesh.ndim == 1:
            by_group.setdefault(mesh.get_group().group_name, []).append(name)
    by_group.setdefault(dist.group.WORLD.group_name, []).append(WORLD)

    def preference(name: str) -> tuple[int, int]:
        return (0, BASIC_DIMS.index(name)) if name in BASIC_DIMS else ((2, 0) if name == WORLD else (1, 0))

    return {view: min(names, key=preference) for names in by_group.values() for view in names}


def group_labels(meshes: Mapping[str, DeviceMesh]) -> dict[str, str]:
    """Process-group name → label, for :class:`CommCounter`."""
    views = view_labels(meshes)
    groups = {name: mesh.get_group().group_name for name, mesh in meshes.items() if mesh.ndim == 1}
    groups[WORLD] = dist.group.WORLD.group_name
    return {groups[view]: label for view, label in views.items()}


# ----------------------------------------------------------------------------- analytic volumes
#
# One optimizer step of the reference Llama model (models/llama.py with plans/llama.py) on
# one rank, in the steady state: a pipeline's first step also sends the stages' shape
# metadata. With accumulate_grad_batches = k, a step is k passes (each of its own
# microbatches under pipeline parallel); data parallel then follows parallel.zero_stage. Each source (a parallelism, or one of the step's own small reductions) is kept
# apart, keyed by (mesh view, kind), so that each can be checked on its own even where
# several views share one process group; on_labels() sums them onto the counter's labels.

# the strategy sums each Partial (pending-sum) DTensor gradient once before the optimizer step
PARTIAL_GRAD_REDUCTIONS = 1
_FP32, _FP64 = 4, 8


@dataclass(frozen=True)
class _Pass:
    """One rank's share of a forward + backward pass."""

    batch: int  # sequences (one microbatch under pipeline parallel)
    repeats: int  # passes per optimizer step: accumulated micro-batches (× microbatches under pipeline parallel)
    accumulate: int  # Lightning micro-batches per optimizer step (trainer.accumulate_grad_batches)
    seq: int  # tokens of each sequence on this rank (seq_len / cp)
    blocks: int  # transformer blocks on this rank
    has_embedding: bool
    has_head: bool  # final norm + output projection


def add_volume(table: Totals, view: str, kind: str, count: int, size: float, group_size: int) -> None:
    """``count`` ops of ``size`` bytes each over ``group_size`` ranks (nothing on a single rank)."""
    if count > 0 and group_size > 1:
        added = Volume(count, count * size, count * wire_bytes(kind, size, group_size))
        table[(view, kind)] = table.get((view, kind), Volume()) + added


def modeling_problems(config: Config, dims: ParallelDims) -> list[str]:
    """Why :func:`expected_step_volume` has no formula for this run (empty when it has one)."""
    parallel, problems = config.parallel, []
    if config.trainer.precision != "32-true":
        problems.append(f"trainer.precision={config.trainer.precision} (modeled: 32-true)")
    perf = config.perf
    if perf.activation_checkpoint != "none" or perf.compile or perf.float8:
        problems.append("activation checkpointing, torch.compile and float8 are not modeled")
    if dims.tp > 1 and (dims.pp > 1 or dims.cp > 1 or dims.data_parallel_enabled):
        problems.append(f"tp={dims.tp} is modeled alone, not with pp, cp or data parallel ({dims})")
    if dims.tp > 1 and (parallel.loss_parallel or config.model.tie_embeddings):
        problems.append("tensor parallel is modeled without loss_parallel and tied embeddings")
    if dims.pp > 1 and (dims.cp > 1 or dims.data_parallel_enabled):
        problems.append(f"pp={dims.pp} is modeled alone, not with cp or data parallel ({dims})")
    if dims.pp > 1 and parallel.pp_schedule in V_SHAPED:
        problems.append(f"parallel.pp_schedule={parallel.pp_schedule}: V-shaped schedules are not modeled")
    if dims.cp > 1 and parallel.cp_backend not in ("ring", "allgather"):
        problems.append(f"parallel.cp_backend={parallel.cp_backend} is not modeled")
    return problems


def expected_step_volume(config: Config, dims: ParallelDims, pp_rank: int = 0) -> dict[str, Totals]:
    """Analytic communication of one optimizer step on a rank at pipeline position ``pp_rank``.

    ``dims``: the run's resolved layout (``strategy.dims``). Returns source → {(mesh view, kind): Volume};
    sources: ``tp``, ``sp_norm_grads``, ``data_parallel``, ``pp``, ``cp``, ``step_health``
    (the reference model's training loss rides the step's health check: no loss collective). Raises ``ValueError`` for a run it has no formula for
    (:func:`modeling_problems`).
    """
    problems = modeling_problems(config, dims)
    if problems:
        raise ConfigError("no analytic communication volume for this run: " + "; ".join(problems))
    parallel, model = config.parallel, config.model
    if dims.pp > 1:
        num_stages = dims.pp * parallel.stages_per_rank
        stage_ids = stages_of_rank(pp_rank, dims.pp, parallel.stages_per_rank, parallel.pp_schedule)
        stage_blocks = parallel.pp_layers or split_blocks(
            model.n_layers, num_stages, parallel.pp_embedding_weight, parallel.pp_head_weight
        )
        repeats = num_microbatches(parallel.microbatches, num_stages)
        blocks = sum(len(stage_blocks[k]) for k in stage_ids)
    else:
        num_stages, stage_ids, repeats, blocks = 1, [0], 1, model.n_layers
    accumulate = config.trainer.accumulate_grad_batches
    one = _Pass(
        batch=config.data.global_batch_size // dims.dp // accumulate // repeats,
        repeats=repeats * accumulate,
        accumulate=accumulate,
        seq=config.data.seq_len // dims.cp,
        blocks=blocks,
        has_embedding=0 in stage_ids,
        has_head=num_stages - 1 in stage_ids,
    )
    reshard = resolved_reshard_after_forward(parallel, dims.pp)
    sources = {
        "tp": _tensor_parallel(model, parallel.sequence_parallel, dims.tp, one),
        "sp_norm_grads": _sequence_parallel_norm_grads(model, parallel.sequence_parallel, dims.tp, one),
        "data_parallel": _data_parallel(
            model, dims, one, reshard, parallel.zero_stage, resolved_unit_min_bytes(config.perf.dp_unit_min_mb, dims.fsdp, dims.dp_replicate)
        ),
        "pp": _pipeline(model, dims.pp, one, stage_ids, num_stages),
        "cp": _context_parallel(model, parallel.cp_backend, dims.cp, one),
        "step_health": step_health_volume(dims.world_size),
    }
    return {name: table for name, table in sources.items() if table}


def on_labels(expected: Mapping[str, Totals], labels: Mapping[str, str]) -> Totals:
    """Sum expected volumes, keyed by mesh view, onto the counter's labels (:func:`view_labels`)."""
    out: Totals = {}
    for table in expected.values():
        for (view, kind), volume in table.items():
            key = (labels[view], kind)
            out[key] = out.get(key, Volume()) + volume
    return out


def _tensor_parallel(model: ModelConfig, sequence_parallel: bool, tp: int, one: _Pass) -> Totals:
    table: Totals = {}
    residual = one.batch * one.seq * model.dim * _FP32  # one pass's residual stream, full size
    logits = one.batch * one.seq * model.vocab_size * _FP32
    ends = int(one.has_embedding) + int(one.has_head)
    if sequence_parallel:
        # each block gathers the sequence before attention and FFN and reduce-scatters wo's and
        # w2's outputs; backward mirrors both. The embedding reduce-scatters its output
        # (its backward gathers), the head gathers its input (its backward reduce-scatters).
        add_volume(table, "tp", "all_gather", (4 * one.blocks + ends) * one.repeats, residual, tp)
        add_volume(table, "tp", "reduce_scatter", (4 * one.blocks + ends) * one.repeats, residual, tp)
    else:
        # wo's and w2's partial outputs in forward, the attention and FFN input grads in
        # backward; the embedding's output in forward, the head's input grad in backward
        add_volume(table, "tp", "all_reduce", (4 * one.blocks + ends) * one.repeats, residual, tp)
    add_volume(table, "tp", "all_gather", int(one.has_head) * one.repeats, logits, tp)  # replicated logits
    return table


def _sequence_parallel_norm_grads(model: ModelConfig, sequence_parallel: bool, tp: int, one: _Pass) -> Totals:
    """Norm weights see 1/tp of the tokens: their Partial gradients are all-reduced once before the step."""
    table: Totals = {}
    if sequence_parallel:
        norms = 2 * one.blocks + int(one.has_head)
        add_volume(table, "tp", "all_reduce", PARTIAL_GRAD_REDUCTIONS * norms, model.dim * _FP32, tp)
    return table


def _unit_sizes(model: ModelConfig, one: _Pass, unit_min_bytes: int = 0) -> list[tuple[int, bool]]:
    """(parameter elements, resharded after forward when resharding is on) of each FSDP unit:
    the blocks, grouped into units of at least ``unit_min_bytes`` (all but the last unit), the
    embedding and the final norm + head when each is at least as large as a block and as that
    minimum (the head is not resharded: backward starts with it), and the root, which holds the
    rest (a tied embedding, a smaller embedding or head) and is never resharded
    (parallel.data_parallel.apply_data_parallel)."""
    attention = 2 * (model.n_heads + model.kv_heads) * model.head_dim * model.dim
    block = attention + 3 * model.dim * model.hidden_dim + 2 * model.dim
    groups = group_blocks([block * _FP32] * one.blocks, unit_min_bytes)
    units = [(block * len(group), index < len(groups) - 1) for index, group in enumerate(groups)]
    table = model.vocab_size * model.dim
    root = block * (one.blocks - sum(len(group) for group in groups))  # blocks of a group too small
    if model.tie_embeddings:
        root += table + model.dim
    else:
        for present, elements, resharded in ((one.has_embedding, table, True), (one.has_head, table + model.dim, False)):
            if present and is_own_unit(elements, elements * _FP32, block if one.blocks else 0, unit_min_bytes):
                units.append((elements, resharded))
            elif present:
                root += elements
    return units + ([(root, False)] if root else [])


def _data_parallel(
    model: ModelConfig, dims: ParallelDims, one: _Pass, reshard: bool, zero_stage: Optional[int], unit_min_bytes: int = 0
) -> Totals:
    """Gradients are reduced once per optimizer step, on its last micro-batch (ZeRO-2/3:
    reduce-scattered on every micro-batch; HSDP's replica all-reduce still once). Parameters
    are gathered for every micro-batch, except under ZeRO-1/2, where they stay gathered
    from the first micro-batch to the last (parallel.data_parallel.accumulating)."""
    table: Totals = {}
    units = _unit_sizes(model, one, unit_min_bytes)
    if dims.fsdp == 1:  # DDP-style: each unit's gradients all-reduced once
        for elements, _ in units:
            add_volume(table, "dp_replicate", "all_reduce", 1, elements * _FP32, dims.dp_replicate)
        return table
    view = "fsdp" if dims.dp_replicate == 1 or dims.cp > 1 else "dp_shard"
    gathered_once = zero_stage in KEEP_GATHERED_STAGES
    reductions = one.accumulate if zero_stage in REDUCE_EVERY_MICROBATCH_STAGES else 1
    for elements, resharded in units:
        size = elements * _FP32  # exact when every parameter's first dim divides by the fsdp size
        gathers = 1 if gathered_once else one.accumulate * (1 + int(reshard and resharded))  # forward, again in backward
        add_volume(table, view, "all_gather", gathers, size, dims.fsdp)
        add_volume(table, view, "reduce_scatter", reductions, size, dims.fsdp)
        add_volume(table, "dp_replicate", "all_reduce", 1, size // dims.fsdp, dims.dp_replicate)  # HSDP
    return table


def _pipeline(model: ModelConfig, pp: int, one: _Pass, stage_ids: list[int], num_stages: int) -> Totals:
    table: Totals = {}
    activation = one.batch * one.seq * model.dim * _FP32
    for stage in stage_ids:
        # each microbatch crosses every boundary of the stage: an activation one way, its gradient back
        boundaries = int(stage > 0) + int(stage < num_stages - 1)
        add_volume(table, "pp", "send", boundaries * one.repeats, activation, pp)
        add_volume(table, "pp", "recv", boundaries * one.repeats, activation, pp)
    return table


def _context_parallel(model: ModelConfig, backend: str, cp: int, one: _Pass) -> Totals:
    table: Totals = {}
    kv = one.batch * model.kv_heads * one.seq * model.head_dim * _FP32  # K or V (or dK, dV in fp32)
    passes = one.blocks * one.repeats
    if backend == "ring":
        # forward: K and V travel cp−1 hops; backward: K and V cp−1 hops again, and dK, dV
        # cp hops (the last brings them home)
        hops = 2 * (cp - 1) + 2 * (cp - 1) + 2 * cp
        add_volume(table, "cp", "send", hops * passes, kv, cp)
        add_volume(table, "cp", "recv", hops * passes, kv, cp)
    else:  # all-gather K and V; the backward reduce-scatters their gradients
        add_volume(table, "cp", "all_gather", 2 * passes, kv * cp, cp)
        add_volume(table, "cp", "reduce_scatter", 2 * passes, kv * cp, cp)
    return table


def step_health_volume(world_size: int) -> Totals:
    """nonfinite.step_health, the step's only collective outside the parallelisms: the squared grad
    norm, the deferred token-loss sum and token count, the stop requests, and a loss and a grad
    flag per rank (fp64)."""
    table: Totals = {}
    add_volume(table, WORLD, "all_reduce", 1, (4 + 2 * world_size) * _FP64, world_size)
    return table
