"""Context parallel: every sequence is split over the cp ranks; attention sees all of it.

Load balance: a sequence of length S is cut into 2·cp chunks of S/(2·cp) tokens and rank r
holds chunks r and 2·cp−1−r, so under a causal mask every rank has the same amount of
work. Positions (RoPE) follow the chunks.

Backends (``parallel.cp_backend``):

- ``ring``: K/V chunks travel around the ring with point-to-point ops, the next transfer
  in flight while the current block is computed; blocks are merged with the log-sum-exp
  rule in fp32; fully masked block pairs are skipped. The backward rotates K/V again
  together with the dK/dV accumulators, which arrive back at their owner after one lap.
- ``allgather``: all-gather K/V, then one masked attention; simple, fine for small cp.
- ``native``: torch's own ``context_parallel`` — CUDA only (no CPU kernel in torch 2.13).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_3d.errors import ConfigError

BACKENDS = ("ring", "allgather", "native")


def chunk_ids(rank: int, cp: int) -> tuple[int, int]:
    """The two global chunk indices rank ``rank`` holds."""
    return rank, 2 * cp - 1 - rank


def balanced_positions(local_len: int, rank: int, cp: int, device: torch.device | None = None) -> Tensor:
    """Global positions (1, local_len) of the tokens rank ``rank`` holds."""
    chunk = local_len // 2
    first, second = chunk_ids(rank, cp)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk), torch.arange(second * chunk, (second + 1) * chunk)]).to(device)[None]


def shard_sequence(tensor: Tensor, rank: int, cp: int, dim: int = 1) -> Tensor:
    """This rank's two chunks of ``tensor`` along ``dim`` (length divisible by 2·cp)."""
    if tensor.shape[dim] % (2 * cp):
        # torch.chunk would return uneven or fewer chunks: tokens lost or misplaced
        raise ConfigError(
            f"context parallel (cp={cp}) cuts a sequence into 2·cp={2 * cp} equal chunks; "
            f"length {tensor.shape[dim]} (dim {dim} of shape {tuple(tensor.shape)}) does not divide"
        )
    chunks = tensor.chunk(2 * cp, dim=dim)
    first, second = chunk_ids(rank, cp)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


# batch entries cut along the sequence (dim 1) unless the module names its own
SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "positions")

SequenceKeys = Iterable[str] | Mapping[str, int | None]


def shard_batch(batch: Any, rank: int, cp: int, sequence_keys: SequenceKeys = ()) -> Any:
    """This cp rank's two chunks of each sequence-shaped entry of a dict batch.

    Sequence-shaped entries are :data:`SEQUENCE_KEYS` plus ``sequence_keys`` (a module's
    ``context_parallel_keys``): names, cut along dim 1, or a mapping name → the dim to cut,
    ``None`` keeping that entry whole on every cp rank. Any other tensor of two or more
    dims, also inside a list or dict, is refused: cutting an image or a per-sample feature
    along dim 1 would be silently wrong, and keeping it whole may be wrong too. 0-/1-D
    tensors and non-tensors pass unchanged. Only shapes are read, so every rank given
    batches of one layout raises the same error, before any collective of the step.
    """
    if cp == 1:
        return batch
    if not isinstance(batch, Mapping):
        raise ConfigError(
            f"context parallel (cp={cp}) cuts dict batches by key; got a {type(batch).__name__}. Return a dict with "
            f"{list(SEQUENCE_KEYS)} (or name the sequence keys in the module's `context_parallel_keys`)"
        )
    named = _named_dims(sequence_keys)
    dims: dict[str, int] = {}  # the entries to cut, and along which dim
    problems = []
    for key, value in batch.items():
        if key in named:
            dim = named[key]
            if dim is None:
                continue
            if not isinstance(value, Tensor) or value.ndim <= dim:
                problems.append(f"{key!r} {_describe(value)} is named in `context_parallel_keys` but has no dim {dim} to cut")
                continue
            dims[key] = dim
        elif isinstance(value, Tensor):
            if value.ndim < 2:
                continue
            if key not in SEQUENCE_KEYS:
                problems.append(f"{key!r} of shape {tuple(value.shape)} is not a known sequence entry")
                continue
            dims[key] = 1
        else:
            nested = _nested_shapes(value)
            if nested:
                problems.append(f"{key!r} holds tensors of shapes {nested} inside a {type(value).__name__}")
    if problems:
        raise ConfigError(
            f"context parallel (cp={cp}) cuts only sequence entries of the batch ({sorted(_cut_names(named))}): "
            + "; ".join(problems)
            + ". In the LightningModule, set `context_parallel_keys = [names]` for (batch, sequence, ...) entries to "
            "cut along dim 1, or a dict {name: dim to cut, or None to keep it whole on every cp rank}"
        )
    lengths = {key: batch[key].shape[dim] for key, dim in dims.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"context parallel (cp={cp}) cuts the sequence entries together: they need one length, got {lengths}")
    short = {key: length for key, length in lengths.items() if length % (2 * cp)}
    if short:
        raise ConfigError(f"context parallel (cp={cp}) cuts each sequence into 2·cp={2 * cp} chunks; lengths {short} do not divide")
    return {key: shard_sequence(value, rank, cp, dims[key]) if key in dims else value for key, value in batch.items()}


def _named_dims(sequence_keys: SequenceKeys) -> dict[str, int | None]:
    """A module's ``context_parallel_keys`` as name → dim to cut (None: keep whole)."""
    if isinstance(sequence_keys, str):  # one name, not its letters
        sequence_keys = (sequence_keys,)
    named = dict(sequence_keys) if isinstance(sequence_keys, Mapping) else dict.fromkeys(sequence_keys, 1)
    bad = {key: dim for key, dim in named.items() if dim is not None and not _is_dim(dim)}
    if bad:
        raise ConfigError(f"context_parallel_keys {bad}: give each entry the dim to cut (1 or more; dim 0 is the batch) or None")
    return named


def _is_dim(dim: Any) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1


def _cut_names(named: Mapping[str, int | None]) -> set[str]:
    return (set(SEQUENCE_KEYS) | set(named)) - {key for key, dim in named.items() if dim is None}


def _nested_shapes(value: Any) -> list[tuple[int, ...]]:
    """Shapes of the tensors of two or more dims inside lists, tuples and dicts."""
    if isinstance(value, Tensor):
        return [tuple(value.shape)] if value.ndim >= 2 else []
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [shape for item in value for shape in _nested_shapes(item)]
    return []


def _describe(value: Any) -> str:
    return f"of shape {tuple(value.shape)}" if isinstance(value, Tensor) else f"(a {type(value).__name__})"


# ----------------------------------------------------------------------------- block math
# q: (b, h, n, d); k, v: (b, h, m, d) with K/V heads already repeated for grouped-query attention


def _scores(q: Tensor, k: Tensor, scale: float, causal_diagonal: bool) -> Tensor:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal_diagonal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores


def _block_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, causal_diagonal: bool) -> tuple[Tensor, Tensor]:
    scores = _scores(q, k, scale, causal_diagonal)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v.float()), lse


def _merge(out: Tensor | None, lse: Tensor | None, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Online softmax: combine two partial attentions by their log-sum-exps (fp32)."""
    if out is None:
        return block_out, block_lse
    new_lse = torch.logaddexp(lse, block_lse)
    return out * torch.exp(lse - new_lse)[..., None] + block_out * torch.exp(block_lse - new_lse)[..., None], new_lse


def _block_backward(q, k, v, out, d_out, lse, delta, scale, causal_diagonal) -> tuple[Tensor, Tensor, Tensor]:
    """Flash-attention backward of one block, given the final output's lse and delta."""
    probs = torch.exp(_scores(q, k, scale, causal_diagonal) - lse[..., None])
    d_v = torch.matmul(probs.transpose(-1, -2), d_out)
    d_scores = probs * (torch.matmul(d_out, v.float().transpose(-1, -2)) - delta[..., None])
    d_q = torch.matmul(d_scores, k.float()) * scale
    d_k = torch.matmul(d_scores.transpose(-1, -2), q.float()) * scale
    return d_q, d_k, d_v


def _block_kind(q_chunk: int, k_chunk: int, causal: bool) -> str | None:
    """'full', 'diagonal' (causal within the chunk) or None (fully masked: skipped)."""
    if not causal or k_chunk < q_chunk:
        return "full"
    return "diagonal" if k_chunk == q_chunk else None


# ----------------------------------------------------------------------------- ring


class _Ring:
    """Sends to rank+1 and receives from rank−1 of the cp group, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def start(self, tensors: list[Tensor], tag: int) -> tuple[list[Tensor], list, list]:
        """Post the sends and receives; ``tag`` keeps two transfers in flight apart."""
        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = []
        for tensor, buffer in zip(sent, received):
            ops.append(dist.P2POp(dist.isend, tensor, group=self.group, tag=tag, group_peer=(self.rank + 1) % self.size))
            ops.append(dist.P2POp(dist.irecv, buffer, group=self.group, tag=tag, group_peer=(self.rank - 1) % self.size))
        return received, dist.batch_isend_irecv(ops), sent  # sent: alive until the wait

    @staticmethod
    def finish(pending: tuple[list[Tensor], list, list]) -> list[Tensor]:
        received, works, _ = pending
        for work in works:
            work.wait()
        return received


def _repeat_kv(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _sum_groups(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.unflatten(1, (-1, groups)).sum(2)


class RingAttention(torch.autograd.Function):
    """Attention of this rank's queries over the whole (cp-sharded) sequence."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, causal: bool, scale: float | None = None) -> Tensor:
        ring = _Ring(group)
        groups = q.shape[1] // k.shape[1]
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        q_chunks = q.chunk(2, dim=2)
        own_ids = chunk_ids(ring.rank, ring.size)
        out, lse = [None, None], [None, None]
        kv = [k, v]
        for step in range(ring.size):
            pending = ring.start(kv, tag=0) if step < ring.size - 1 else None  # next K/V in flight
            source = (ring.rank - step) % ring.size
            k_chunks, v_chunks = (_repeat_kv(t, groups).chunk(2, dim=2) for t in kv)
            for qi, q_id in enumerate(own_ids):
                for ki, k_id in enumerate(chunk_ids(source, ring.size)):
                    kind = _block_kind(q_id, k_id, causal)
                    if kind is None:
                        continue
                    block = _block_forward(q_chunks[qi], k_chunks[ki], v_chunks[ki], scale, kind == "diagonal")
                    out[qi], lse[qi] = _merge(out[qi], lse[qi], *block)
            if pending is not None:
                kv = _Ring.finish(pending)
        out_full, lse_full = torch.cat(out, dim=2), torch.cat(lse, dim=2)
        ctx.save_for_backward(q, k, v, out_full, lse_full)
        ctx.group, ctx.causal, ctx.scale = group, causal, scale
        return out_full.to(q.dtype)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        groups = q.shape[1] // k.shape[1]
        scale = ctx.scale
        d_out = d_out.float()
        delta = (d_out * out).sum(-1)
        q_chunks, out_chunks = q.chunk(2, dim=2), out.chunk(2, dim=2)
        d_out_chunks, lse_chunks, delta_chunks = d_out.chunk(2, dim=2), lse.chunk(2, dim=2), delta.chunk(2, dim=2)
        own_ids = chunk_ids(ring.rank, ring.size)
        d_q = [torch.zeros_like(c, dtype=torch.float32) for c in q_chunks]
        kv = [k, v]
        # dK/dV of the K/V currently held, travelling with them (K/V-head layout, fp32)
        d_kv = [torch.zeros_like(k, dtype=torch.float32) for _ in range(2)]
        for step in range(ring.size):
            pending_kv = ring.start(kv, tag=0) if step < ring.size - 1 else None
            source = (ring.rank - step) % ring.size
            k_chunks, v_chunks = (_repeat_kv(t, groups).chunk(2, dim=2) for t in kv)
            d_k_chunks, d_v_chunks = (list(t.chunk(2, dim=2)) for t in d_kv)
            for qi, q_id in enumerate(own_ids):
                for ki, k_id in enumerate(chunk_ids(source, ring.size)):
                    kind = _block_kind(q_id, k_id, ctx.causal)
                    if kind is None:
                        continue
                    dq, dk, dv = _block_backward(
                        q_chunks[qi], k_chunks[ki], v_chunks[ki], out_chunks[qi], d_out_chunks[qi],
                        lse_chunks[qi], delta_chunks[qi], scale, kind == "diagonal",
                    )
                    d_q[qi] += dq
                    # fold the query-head groups before the gradient rides the ring
                    d_k_chunks[ki] += _sum_groups(dk, groups)
                    d_v_chunks[ki] += _sum_groups(dv, groups)
            d_kv = [torch.cat(d_k_chunks, dim=2), torch.cat(d_v_chunks, dim=2)]
            # the accumulators follow their K/V; one more hop after the last step brings
            # each back to the rank that owns it
            d_kv = _Ring.finish(ring.start(d_kv, tag=1))
            if pending_kv is not None:
                kv = _Ring.finish(pending_kv)
        d_k, d_v = (t.to(k.dtype) for t in d_kv)
        return torch.cat(d_q, dim=2).to(q.dtype), d_k, d_v, None, None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 of the cp group; the backward reduce-scatters the gradient.

    Blocking c10d calls, as the ring's transfers are waited for in place: under gloo, torch's
    asynchronous functional all-gather crashed some two-rank parity runs (segfaults in
    ``wait_tensor``, ``free(): invalid pointer``; docs/benchmarks.md has the counts)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_single(gathered, tensor, group=group)
        return gathered

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        part = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        dist.reduce_scatter_single(part, grad, group=ctx.group)
        return part, None


def allgather_attention(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, causal: bool, scale: float | None = None) -> Tensor:
    """All-gather K/V (the backward reduce-scatters), then one masked attention."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    local = q.shape[2]
    # (cp·b, h, s_local, d) gathered along dim 0, then put in global chunk order
    k_all, v_all = (_GatherSequence.apply(t, group) for t in (k, v))
    order = torch.cat([balanced_positions(local, r, cp)[0] for r in range(cp)])
    k_full, v_full = (t.unflatten(0, (cp, -1)).transpose(0, 1).transpose(1, 2).flatten(2, 3) for t in (k_all, v_all))
    inverse = torch.argsort(order)
    k_full, v_full = k_full[:, :, inverse], v_full[:, :, inverse]
    mask = None
    if causal:
        q_pos = balanced_positions(local, rank, cp, q.device)[0]
        mask = q_pos[:, None] >= torch.arange(local * cp, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


class ContextParallelAttention(nn.Module):
    """Drop-in for a block's core attention (q, k, v) → out over a cp-sharded sequence."""

    def __init__(self, group: dist.ProcessGroup, backend: str, causal: bool = True) -> None:
        super().__init__()
        if backend not in ("ring", "allgather"):
            raise ConfigError(f"cp_backend={backend!r} is not available here; use one of ['ring', 'allgather']")
        self.group, self.backend, self.causal = group, backend, causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
        if self.backend == "ring":
            return RingAttention.apply(q, k, v, self.group, self.causal, scale)
        return allgather_attention(q, k, v, self.group, self.causal, scale)


def apply_context_parallel(model: nn.Module, attention_modules: list[nn.Module], group: dist.ProcessGroup, backend: str) -> None:
    """Swap each block's core attention for the cp version and make positions follow the chunks."""
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    core = ContextParallelAttention(group, backend)
    for attention in attention_modules:
        if not (hasattr(attention, "core_attention") and hasattr(attention, "default_positions")):
            raise TypeError(
                f"context parallel needs the plan's attention module ({type(attention).__name__}) to expose "
                "`core_attention(q, k, v)` and `default_positions(seq_len, device)`"
            )
        attention.core_attention = core
        attention.default_positions = functools.partial(_positions, rank=rank, cp=cp)


def _positions(local_len: int, device: torch.device, rank: int, cp: int) -> Tensor:
    return balanced_positions(local_len, rank, cp, device)
