"""The layout planner: every layout the strategy accepts for a model, a batch and a cluster,
with its predicted memory per device, communication, bubble and step time, ranked.

``python -m lightning_3d.plan ...`` (lightning_3d/plan.py) or ``lightning_3d.plan(...)``
(:func:`lightning_3d.planner.api.plan`); docs/planner.md is the guide.

The model of the world — every assumption the predictions rest on, in one place:

Layouts (layouts.py)
  - The five degrees multiply to the device count; every assignment is tried. Each passes the
    strategy's own pre-flight checks (``validation.layout_problems`` and ``perf_problems``:
    heads, kv heads and vocabulary divisible by tp, sequence by 2·cp (× tp under sequence
    parallel), stages ≤ layers, batch divisible by dp × microbatches, ...) and the ffn width
    divides by tp. Knobs tried with them: pipeline schedule (1F1B with one stage per rank;
    interleaved 1F1B, interleaved zero bubble, ZBV, DualPipeV with two; GPipe and looped BFS
    have 1F1B's bubble with more in flight and are left out), microbatches (the fewest the
    schedule takes, and microbatches of 1, 2, 4 sequences), activation checkpointing (none,
    selective every 2nd block, full), FSDP2 resharding after forward (without pipeline
    parallel; under pp the strategy keeps parameters gathered for the step), loss parallel
    (tp > 1 without pp). Not tried: gradient accumulation, CPU offload, float8, compile,
    FSDP prefetch depth (1: FSDP2's own), context-parallel backends (the ring).
  - Reference models are planned with sequence parallel; transformers models without it (their
    derived plans have none) and with a tied head kept whole over tp.

Memory (memory.py), per device, at the peak of a step
  - Parameters: fp32 (bf16 under bf16-true), each tensor cut by tp along its plan's dim, then its
    dim 0 into dp_shard × cp chunks as torch.chunk cuts it; whole replicas over dp_replicate;
    only this rank's pipeline stages (the project's balanced split, embedding and head each
    weighing one block). Gradients: the same shapes (measured: without any data parallel the
    vocab-sharded embedding's gradient comes out whole). AdamW: two states of the same shape
    and one fp32 step count per tensor.
  - Activations: what autograd saves, counted per block from the model's shapes
    (``memory.block_saved_bytes``; exact against a saved-tensors hook on CPU in fp32), bf16
    for matmul outputs under bf16 (fp32 for norm inputs, log-sum-exp, reciprocal RMS),
    divided by sp/tp/cp as the plan shards them. A checkpointed block keeps its input; one
    block's worth is rebuilt during backward. Per stage, times the microbatches the schedule
    holds in flight (from torch's action table). Under a split backward (zero-bubble
    schedules) the input half keeps its graph, so part of each microbatch stays until the
    step ends (measured): on a middle stage what only input gradients read (a checkpointed
    block: nothing); on the last stage everything but what the weight half runs and frees
    (the matmuls' inputs and the norms' outputs), so a checkpointed block keeps its input and
    the loss its log-softmax; nothing on the first stage (its weight half is a full backward).
  - Logits: the loss's fp32 log-softmax (vocab/tp under loss parallel, whole otherwise) and the
    logits themselves while the loss runs; a pipeline's last stage caches one per microbatch
    in flight.
  - Pipeline buffers: receive buffers per microbatch (activations in, gradients back) and the
    cached stage outputs. Communication buffers: FSDP2's gathered units (the current block and
    one prefetched, plus units never resharded; every unit when parameters stay gathered) in
    the compute dtype, and one unit's unsharded gradient and reduce-scatter input (fp32).
    Without data parallel under bf16-mixed: autocast's bf16 copy of every weight.
  - Reserved: ``cluster.reserved_gib`` per device for the runtime context and allocator slack
    (4 GiB on GPUs; on CPU the ~0.45 GiB each process holds before training). A layout fits
    when the sum is at most the device's memory.

Communication (communication.py), per step and rank: lightning_3d.comm's accounting
  (``Volume``, ``wire_bytes``, ring algorithms; its step-health reduction, which carries the
  loss), extended to every layout: tp-local FSDP2 units padded as FSDP2 pads them, gathers in
  the compute dtype and reductions in fp32, sequence-parallel sends between stages, this
  rank's K/V heads around the cp ring, a checkpointed block's forward collectives run again
  (both gathers, the attention output's reduction). Exact against CommCounter on CPU.

Time (timing.py)
  - Compute: lightning_3d.flops' count (6·N + 12·L·d·s per token), per rank for its blocks and
    head, ÷ tp, plus one forward per checkpointed block, over peak × ``cluster.compute_efficiency``
    (0.5 by default).
  - A collective: latency × ring hops (2(n−1) per all-reduce over n ranks, n−1 for the other
    collectives, 1 per send) + wire bytes ÷ (link rate × ``cluster.comm_efficiency``),
    over the link its group crosses: in a node when all its ranks are on one node (the mesh
    is (pp, dp_replicate, dp_shard, cp, tp), tp innermost), across nodes otherwise. Link rates
    and memory per device: ``cluster.KNOWN_DEVICES`` (H100, H200, A100, CPU) or ``cluster.*``.
  - Overlap: tp, cp and pp communication is on the critical path (no async TP; the ring's
    transfers counted in full); FSDP2's gathers and reductions hide behind the rank's compute,
    all but what exceeds it and at least one unit's worth; the step's health check is exposed.
  - Pipeline: the busiest rank's time ÷ (1 − the schedule's idle fraction), the fraction from
    torch's action table replayed with unit costs (``lightning_3d.bench.pipeline``), balanced
    stages assumed. Processes sharing one host's cores (``cluster.gpu=CPU``) lend each other
    their idle time: a step is the ranks' mean busy time, with no bubble.
    MFU = flops.flops_per_token × tokens ÷ (step time × devices × peak).
"""

from lightning_3d.planner.api import LayoutPlan, PlanRequest, Ranking, plan, rank_layouts
from lightning_3d.planner.cluster import Cluster, ClusterConfig, resolve_cluster
from lightning_3d.planner.layouts import Layout, enumerate_layouts
from lightning_3d.planner.memory import MemoryBreakdown, Precision
from lightning_3d.planner.shapes import ModelShape

__all__ = [
    "Cluster",
    "ClusterConfig",
    "Layout",
    "LayoutPlan",
    "MemoryBreakdown",
    "ModelShape",
    "PlanRequest",
    "Precision",
    "Ranking",
    "enumerate_layouts",
    "plan",
    "rank_layouts",
    "resolve_cluster",
]
