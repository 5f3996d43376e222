"""Context-parallel attention against full scaled_dot_product_attention; run by torchrun.

usage: torchrun --nproc-per-node CP tests/context_parallel_worker.py OUT_JSON
Every rank builds the same full q, k, v and output weights; the reference is plain SDPA on
the whole sequence. Each case runs the cp-sharded attention and records the largest
difference of this rank's output and q/k/v gradients from the reference's shards.
"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lightning_3d.parallel.context_parallel import ContextParallelAttention, shard_sequence


def main() -> None:
    dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    results = {}
    for backend, causal, kv_heads in itertools.product(("ring", "allgather"), (True, False), (4, 2)):
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 8 * cp, 16, generator=generator)
        k, v = (torch.randn(2, kv_heads, 8 * cp, 16, generator=generator) for _ in range(2))
        weight = torch.randn(2, 4, 8 * cp, 16, generator=generator)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        reference = F.scaled_dot_product_attention(*full, is_causal=causal, enable_gqa=kv_heads != 4)
        (reference * weight).sum().backward()
        local = [shard_sequence(t, rank, cp, dim=2).detach().requires_grad_() for t in (q, k, v)]
        out = ContextParallelAttention(dist.group.WORLD, backend, causal)(*local)
        (out * shard_sequence(weight, rank, cp, dim=2)).sum().backward()
        diffs = {"out": (out - shard_sequence(reference, rank, cp, dim=2)).abs().max().item()}
        for name, mine, ref in zip("qkv", local, full):
            diffs[f"d{name}"] = (mine.grad - shard_sequence(ref.grad, rank, cp, dim=2)).abs().max().item()
        results[f"{backend}/{'causal' if causal else 'full'}/kv{kv_heads}"] = diffs
    gathered = [None] * cp
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(sys.argv[1], "w") as handle:
            json.dump(gathered, handle)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
