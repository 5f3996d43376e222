"""A Llama-style decoder written for parallelism.

- Blocks live in an ``nn.ModuleDict`` keyed "0", "1", ... so parameter names stay the same
  when a pipeline stage drops some of them.
- ``forward`` tolerates removed parts: without ``tok_embeddings`` it takes hidden states,
  without ``output`` it returns hidden states.
- Head counts are read from the projected tensors (``view(b, s, -1, head_dim)``), so the
  same code runs with the heads split by tensor parallel.
- Rotary angles are computed from explicit positions: nothing to materialize after meta
  init, and context parallel can hand over non-contiguous positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_3d.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalize in fp32 for stability under bf16
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_cos_sin(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (batch or 1, seq, 1, head_dim/2) for the given token positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) of the last dim by the position angle."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def sequential_positions(seq: int, device: torch.device) -> Tensor:
    return torch.arange(seq, device=device)[None]


class Attention(nn.Module):
    """Grouped-query attention with RoPE.

    Context parallel replaces ``core_attention`` (q, k, v of shape (b, heads, s, head_dim) →
    output) and ``default_positions`` (the positions of the tokens this rank holds).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.core_attention: Callable[[Tensor, Tensor, Tensor], Tensor] = causal_attention
        self.default_positions: Callable[[int, torch.device], Tensor] = sequential_positions
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        batch, seq, _ = x.shape
        if positions is None:
            # here, after sequence parallel's all-gather, seq is all this rank's tokens
            positions = self.default_positions(seq, x.device)
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        out = self.core_attention(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.hidden_dim)

    def forward(self, x: Tensor, positions: Tensor | None) -> Tensor:
        x = x + self.attention(self.attention_norm(x), positions)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(config.dim, config.norm_eps)
        self.output: nn.Linear | None = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """tokens (batch, seq) ids, or hidden states when this stage has no embedding.

        ``positions`` (batch or 1, seq) default to 0..seq-1.
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for block in self.layers.values():
            h = block(h, positions)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def init_parameter(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        init_parameter(self.config, name, full, generator)

    def num_params(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.tok_embeddings is not None:
            total -= self.tok_embeddings.weight.numel()
        return total


def init_parameter(config: ModelConfig, name: str, full: Tensor, generator: torch.Generator) -> None:
    """Fill the full (unsharded) tensor of parameter ``name`` in place.

    A function of the config and the name only, so any pipeline stage cut from the model
    can use it. Output projections of residual branches get a depth-scaled std (GPT-2 style).
    """
    std = config.init_std
    if name.endswith("norm.weight"):
        full.fill_(1.0)
    elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        full.normal_(0.0, std / math.sqrt(2 * config.n_layers), generator=generator)
    elif name == "output.weight" and not config.tie_embeddings:
        full.normal_(0.0, config.dim**-0.5, generator=generator)
    else:
        full.normal_(0.0, std, generator=generator)
