"""Context parallel, measured: load balance, bytes on the ring, activation memory per rank.

    python -m lightning_3d.bench.context_parallel

1. Causal attention work per rank — (query, key) pairs a rank must score — with the
   load-balanced split (rank r: chunks r and 2·cp−1−r) against a plain contiguous split,
   as max / mean over ranks (1.00 = perfectly balanced).
2. Bytes each rank sends in one attention layer with the ring backend, counted on the
   real point-to-point ops of a run on cp CPU processes, against 2·b·s·n_kv·d_h·(c−1)/c
   elements for the forward.
3. Peak activation bytes per rank (a saved-tensors hook) for one forward/backward of the
   reference model at a fixed global sequence length, for cp = 1, 2, 4.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.memory import SavedTensorBytes
from lightning_3d.config import ModelConfig
from lightning_3d.models.llama import Transformer
from lightning_3d.parallel import context_parallel
from lightning_3d.parallel.context_parallel import (
    ContextParallelAttention,
    apply_context_parallel,
    chunk_ids,
    shard_sequence,
)

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 2, 16


def causal_pairs(seq: int, cp: int, balanced: bool) -> list[int]:
    """(query, key ≤ query) pairs held by each rank."""
    chunk = seq // (2 * cp) if balanced else seq // cp
    per_rank = []
    for rank in range(cp):
        chunks = chunk_ids(rank, cp) if balanced else (rank,)
        # query positions p in a chunk score p + 1 keys
        per_rank.append(sum(sum(p + 1 for p in range(c * chunk, (c + 1) * chunk)) for c in chunks))
    return per_rank


def balance_table(seq: int) -> str:
    rows = ["| cp | contiguous split max/mean | load-balanced split max/mean |", "|---|---|---|"]
    for cp in (2, 4, 8):
        ratios = []
        for balanced in (False, True):
            work = causal_pairs(seq, cp, balanced)
            ratios.append(max(work) / (sum(work) / cp))
        rows.append(f"| {cp} | {ratios[0]:.2f} | {ratios[1]:.2f} |")
    return "\n".join(rows)


def _worker(out: Path, seq: int) -> None:
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    result: dict[str, float] = {}
    # bytes on the ring: count every tensor the ring sends
    sent = {"bytes": 0}
    start = context_parallel._Ring.start

    def counting_start(ring, tensors, tag):
        sent["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return start(ring, tensors, tag)

    context_parallel._Ring.start = counting_start
    if cp > 1:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(BATCH, HEADS, seq, HEAD_DIM, generator=generator)
        k, v = (torch.randn(BATCH, KV_HEADS, seq, HEAD_DIM, generator=generator) for _ in range(2))
        local = [shard_sequence(t, rank, cp, dim=2).requires_grad_() for t in (q, k, v)]
        attended = ContextParallelAttention(dist.group.WORLD, "ring")(*local)
        result["forward_bytes"] = sent["bytes"]
        attended.sum().backward()
        result["backward_bytes"] = sent["bytes"] - result["forward_bytes"]
    context_parallel._Ring.start = start
    # activation memory of the reference model at a fixed global length
    config = ModelConfig(n_layers=2, dim=128, n_heads=HEADS, n_kv_heads=KV_HEADS, vocab_size=512, ffn_dim=256, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(config)
    if cp > 1:
        attention = [block.attention for block in model.layers.values()]
        apply_context_parallel(model, attention, dist.group.WORLD, "ring")
    tokens = shard_sequence(torch.randint(0, 256, (BATCH, seq), generator=torch.Generator().manual_seed(1)), rank, cp)
    with SavedTensorBytes() as counter:
        model(tokens).float().logsumexp(-1).sum().backward()
    result["peak_saved_bytes"] = counter.peak
    gathered = [None] * cp
    dist.all_gather_object(gathered, result)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024, help="global sequence length")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.seq)
        return
    print(f"## Causal attention work per rank, sequence {args.seq}\n\n{balance_table(args.seq)}\n")
    runs = {cp: run_workers("lightning_3d.bench.context_parallel", cp, "--seq", str(args.seq)) for cp in (1, 2, 4)}
    print(f"## Bytes sent per rank in one attention layer (ring; b={BATCH}, s={args.seq}, n_kv={KV_HEADS}, d_h={HEAD_DIM}, fp32)\n")
    print("| cp | forward measured | forward analytic 2·b·s·n_kv·d_h·(c−1)/c | backward measured | backward analytic (K/V again + dK/dV one full lap) |")
    print("|---|---|---|---|---|")
    for cp in (2, 4):
        kv_bytes = 2 * BATCH * args.seq * KV_HEADS * HEAD_DIM * 4  # K and V of the whole sequence, fp32
        forward = max(r["forward_bytes"] for r in runs[cp])
        backward = max(r["backward_bytes"] for r in runs[cp])
        print(
            f"| {cp} | {forward / 2**10:.0f} KiB | {kv_bytes * (cp - 1) / cp / 2**10:.0f} KiB | "
            f"{backward / 2**10:.0f} KiB | {(kv_bytes * (cp - 1) / cp + kv_bytes) / 2**10:.0f} KiB |"
        )
    print(f"\n## Peak activation bytes per rank, 2-block reference model, global sequence {args.seq}\n")
    print("| cp | peak saved MiB (max over ranks) | vs cp=1 |")
    print("|---|---|---|")
    base = max(r["peak_saved_bytes"] for r in runs[1])
    for cp, results in runs.items():
        peak = max(r["peak_saved_bytes"] for r in results)
        print(f"| {cp} | {peak / 2**20:.1f} | {peak / base:.2f} |")


if __name__ == "__main__":
    main()
