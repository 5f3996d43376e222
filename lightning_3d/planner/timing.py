"""Step time of a layout: compute, the communication that is not hidden, the pipeline bubble.

- Compute: each rank's training FLOPs (``lightning_3d.flops``' count per token, for the
  blocks and head it holds, divided by tp, plus one more forward of every checkpointed
  block) over the device's peak × ``cluster.compute_efficiency``.
- Each collective costs a latency per ring hop (an all-reduce over n ranks 2(n−1) hops, the
  other collectives n−1, a send 1) plus its wire bytes (``lightning_3d.comm``'s ring-algorithm
  count) over the bandwidth of the link its group crosses: inside a node when the group's
  ranks sit on one node (tp innermost, pp outermost in the mesh), across nodes otherwise.
- Exposed: tensor, context and pipeline parallel communication sits on the critical path of
  every microbatch (no asynchronous TP; the ring's transfers counted in full). FSDP2's
  gathers and reductions overlap with compute: only what exceeds ``cluster.overlap`` × the
  rank's busy time is exposed (overlap 1 on GPUs, 0 on CPU, where collectives and compute
  share the cores), and at least one unit's worth (the first gather and the last reduction). The
  step's health check (which carries the loss) is exposed.
- Pipeline: the busiest rank's time per step, divided by 1 − the schedule's idle fraction
  (its action table replayed with unit costs; the stages are taken as balanced). Processes
  that share a host's cores (``cluster.gpu=CPU``) lend their idle time to each other: a step
  is then the ranks' mean busy time, with no bubble.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_3d.comm import Volume
from lightning_3d.planner.cluster import Cluster
from lightning_3d.planner.communication import VIEW_SIZES, per_view, step_volume
from lightning_3d.planner.layouts import Layout
from lightning_3d.planner.memory import Precision, checkpointed, local_seq, rank_stages, rank_units
from lightning_3d.planner.schedule import bubble_fraction
from lightning_3d.planner.shapes import ModelShape

# the mesh dims each view spans, innermost last (the mesh is (pp, dp_replicate, dp_shard, cp, tp))
VIEW_DIMS = {
    "tp": ("tp",),
    "cp": ("cp",),
    "pp": ("pp",),
    "dp_shard": ("dp_shard",),
    "dp_replicate": ("dp_replicate",),
    "fsdp": ("dp_shard", "cp"),
    "world": ("pp", "dp_replicate", "dp_shard", "cp", "tp"),
}
_INNER = {"pp": ("dp_replicate", "dp_shard", "cp", "tp"), "dp_replicate": ("dp_shard", "cp", "tp"),
          "dp_shard": ("cp", "tp"), "cp": ("tp",), "tp": ()}
DATA_PARALLEL_VIEWS = ("fsdp", "dp_shard", "dp_replicate")
CRITICAL_PATH_VIEWS = ("tp", "cp", "pp")


def crosses_nodes(layout: Layout, view: str, gpus_per_node: int) -> bool:
    """Whether the ranks of one group of ``view`` sit on more than one node."""
    dims = VIEW_DIMS[view]
    stride = 1
    for inner in _INNER[dims[-1]]:
        stride *= getattr(layout, inner)
    size = 1
    for dim in dims:
        size *= getattr(layout, dim)
    return size * stride > gpus_per_node


def ring_hops(kind: str, group_size: int) -> int:
    """Latency-bound steps of one op under ring algorithms: an all-reduce 2(n−1), the other
    collectives n−1, a send 1 (a receive is the sender's)."""
    if kind == "all_reduce":
        return 2 * (group_size - 1)
    if kind in ("send", "p2p"):
        return 1
    return 0 if kind in ("recv", "barrier") else group_size - 1


def collective_seconds(kind: str, volume: Volume, group_size: int, inter_node: bool, cluster: Cluster) -> float:
    """Latency per hop and call, plus the wire bytes over the link's bandwidth."""
    latency, bandwidth = (
        (cluster.inter_node_latency, cluster.inter_node_bandwidth) if inter_node else (cluster.intra_node_latency, cluster.intra_node_bandwidth)
    )
    return volume.count * ring_hops(kind, group_size) * latency + volume.wire_bytes / bandwidth


def rank_flops(shape: ModelShape, layout: Layout, seq_len: int, global_batch_size: int, pp_rank: int) -> float:
    """Training FLOPs of one step on the rank at pipeline position ``pp_rank``."""
    q, kv = shape.n_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    block_matmul = 2 * q * shape.dim + 2 * kv * shape.dim + 3 * shape.dim * shape.ffn_dim
    attention = 4 * q * seq_len  # forward, per token: the two seq × seq products (flops.py's rule)
    tokens = global_batch_size // layout.dp * local_seq(layout, seq_len)
    per_token = 0.0
    for stage, blocks in rank_stages(shape, layout, pp_rank):
        for index in blocks:
            forward = 2 * block_matmul + attention
            per_token += forward * (4 if checkpointed(index, layout) else 3)
        if stage == layout.num_stages - 1:
            per_token += 6 * shape.dim * shape.vocab_size
    return tokens * per_token / layout.tp


@dataclass(frozen=True)
class ViewTraffic:
    """One mesh view's communication in one step, on the rank that moves the most over it."""

    view: str
    ranks: int  # group size
    inter_node: bool
    volume: Volume
    seconds: float

    @property
    def link(self) -> str:
        return "across nodes" if self.inter_node else "in a node"


@dataclass(frozen=True)
class StepTime:
    compute_s: float  # the busiest pipeline rank's compute
    bubble: float  # idle fraction of the pipeline schedule
    exposed_comm_s: float  # communication on the busiest rank's critical path, and the step's exposed tail
    step_s: float
    mfu: float
    tokens_per_s: float
    traffic: tuple[ViewTraffic, ...]


def pipeline_ranks(layout: Layout) -> list[int]:
    """The pipeline positions evaluated: all of them up to 8, else the ends, the middle and their neighbours."""
    if layout.pp <= 8:
        return list(range(layout.pp))
    return sorted({0, 1, layout.pp // 2, layout.pp - 2, layout.pp - 1})


def step_time(
    shape: ModelShape, layout: Layout, precision: Precision, seq_len: int, global_batch_size: int, cluster: Cluster
) -> StepTime:
    peak = cluster.peak_flops * cluster.compute_efficiency
    busy, tail = [], []
    traffic: dict[str, ViewTraffic] = {}
    for pp_rank in pipeline_ranks(layout):
        compute = rank_flops(shape, layout, seq_len, global_batch_size, pp_rank) / peak
        seconds: dict[str, float] = {}
        sources = step_volume(shape, layout, precision, seq_len, global_batch_size, pp_rank)
        for table in sources.values():
            for (view, kind), volume in table.items():
                inter = crosses_nodes(layout, view, cluster.gpus_per_node)
                size = 2 if view == "pp" and kind == "all_reduce" else VIEW_SIZES[view](layout)  # a tied pair along pp
                seconds[view] = seconds.get(view, 0.0) + collective_seconds(kind, volume, size, inter, cluster)
        for view, volume in per_view(sources).items():
            inter = crosses_nodes(layout, view, cluster.gpus_per_node)
            if view not in traffic or volume.wire_bytes > traffic[view].volume.wire_bytes:
                traffic[view] = ViewTraffic(view, VIEW_SIZES[view](layout), inter, volume, seconds[view])
        rank_busy = compute + sum(seconds.get(view, 0.0) for view in CRITICAL_PATH_VIEWS)
        data_parallel = sum(seconds.get(view, 0.0) for view in DATA_PARALLEL_VIEWS)
        units = max(1, len(rank_units(shape, layout, pp_rank)))
        exposed = max(data_parallel - cluster.overlap * rank_busy, data_parallel / units) if data_parallel else 0.0
        small = sum(t for view, t in seconds.items() if view not in CRITICAL_PATH_VIEWS + DATA_PARALLEL_VIEWS)
        busy.append((rank_busy, compute))
        tail.append(exposed + small)
    bubble = bubble_fraction(layout.pp_schedule, layout.pp, layout.microbatches, layout.stages_per_rank)
    slowest, compute = max(busy)
    if cluster.shared_host:
        # processes sharing a host's cores: a rank waiting in the bubble leaves its cores to the
        # others, so a step costs the ranks' mean busy time, and idle time none
        slowest = sum(b for b, _ in busy) / len(busy)
        compute = sum(c for _, c in busy) / len(busy)
        step = slowest + max(tail)
    else:
        step = slowest / (1.0 - bubble) + max(tail)
    tokens = global_batch_size * seq_len
    model_flops = shape.flops_per_token(seq_len) * tokens
    return StepTime(
        compute_s=compute,
        bubble=bubble,
        exposed_comm_s=(slowest - compute) + max(tail),
        step_s=step,
        mfu=model_flops / (step * layout.world_size * cluster.peak_flops),
        tokens_per_s=tokens / step,
        traffic=tuple(sorted(traffic.values(), key=lambda t: -t.volume.wire_bytes)),
    )
