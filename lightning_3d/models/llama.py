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

import json
import math
from collections.abc import Callable
from pathlib import Path

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


def rotary_cis(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """e^(i·angle) (complex64) of shape (batch or 1, seq, 1, head_dim/2) for the given token positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def apply_rotary(x: Tensor, cis: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) of the last dim by the position angle: each pair as the
    complex number x0 + i·x1 times e^(i·angle), one multiplication (a handful of ops fewer, forward
    and backward, than rotating real halves)."""
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * cis).flatten(-2).type_as(x)


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
        cis = rotary_cis(positions, self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cis), apply_rotary(k, cis)
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


# ----------------------------------------------------------------------------- pretrained weights

# Hugging Face Llama names → ours (block-level parts, then the top-level ones)
_HF_BLOCK_PARTS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}


def hf_name_to_ours(name: str) -> str | None:
    """Our parameter name for a Hugging Face Llama one (None for names we have no use for)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:-1])
        if inner in _HF_BLOCK_PARTS:
            return f"layers.{parts[2]}.{_HF_BLOCK_PARTS[inner]}.{parts[-1]}"
    return None


def rotary_halves_to_pairs(weight: Tensor, heads: int) -> Tensor:
    """Reorder the rows of a q/k projection from Hugging Face's rotary layout (each head's
    first half of dims paired with its second half) to ours (adjacent dims paired)."""
    out_dim, in_dim = weight.shape
    return weight.view(heads, 2, out_dim // heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def rotary_pairs_to_halves(weight: Tensor, heads: int) -> Tensor:
    """Inverse of :func:`rotary_halves_to_pairs` (ours → Hugging Face)."""
    out_dim, in_dim = weight.shape
    return weight.view(heads, out_dim // heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# config.json field → (ModelConfig field, how to read ours), for a Hugging Face Llama folder
_HF_CONFIG_FIELDS = {
    "num_hidden_layers": ("n_layers", lambda c: c.n_layers),
    "hidden_size": ("dim", lambda c: c.dim),
    "num_attention_heads": ("n_heads", lambda c: c.n_heads),
    "num_key_value_heads": ("n_kv_heads", lambda c: c.kv_heads),
    "vocab_size": ("vocab_size", lambda c: c.vocab_size),
    "intermediate_size": ("ffn_dim", lambda c: c.hidden_dim),
    "rms_norm_eps": ("norm_eps", lambda c: c.norm_eps),
    "rope_theta": ("rope_theta", lambda c: c.rope_theta),
    "tie_word_embeddings": ("tie_embeddings", lambda c: c.tie_embeddings),
}


def hf_config_problems(config: ModelConfig) -> list[str]:
    """A Hugging Face folder's ``config.json`` against the model config: every field the forward
    uses must agree, and rope scaling, which the reference model does not implement, is refused."""
    folder = Path(config.init_from)
    file = (folder if folder.is_dir() else folder.parent) / "config.json"
    if not file.is_file():
        return []  # bare safetensors: shapes are checked, the rest is the user's word
    hf = json.loads(file.read_text())
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5 keeps rope_theta and the scaling here
    if "rope_theta" in rope:
        hf.setdefault("rope_theta", rope["rope_theta"])
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope.get("rope_type", "default") != "default" else None)
    problems = []
    if hf.get("model_type") not in (None, "llama"):
        problems.append(f"{file}: model_type={hf['model_type']!r}; the reference model reads Llama folders only (use model=hf for others)")
    if scaling:
        problems.append(f"{file}: rope scaling {scaling} is not implemented by the reference model; use model=hf model.path={folder}")
    for key, (ours, value) in _HF_CONFIG_FIELDS.items():
        if key in hf and hf[key] is not None and not math.isclose(float(hf[key]), float(value(config)), rel_tol=1e-9):
            problems.append(f"{file}: {key}={hf[key]}, but model.{ours}={value(config)}")
    return problems


class PretrainedWeights:
    """The full weights of ``config.init_from`` under our names, checked against the config.

    Reads files written by ``python -m lightning_3d.export`` or Hugging Face Llama
    safetensors (names mapped, q/k rows reordered for our rotary layout). Every problem —
    missing, unexpected or mis-shaped parameter — is found when it is created, before any
    process group exists.
    """

    def __init__(self, config: ModelConfig) -> None:
        from lightning_3d.checkpoint import (  # the model file itself needs no I/O
            SafetensorsWeights,
            raise_if_problems,
        )

        self.config = config
        self.files = SafetensorsWeights(config.init_from)
        self.hf_format = "model.embed_tokens.weight" in self.files.shapes
        if self.hf_format:
            self.source = {ours: hf for hf in self.files.shapes if (ours := hf_name_to_ours(hf)) is not None}
        else:
            self.source = {name: name for name in self.files.shapes}
        with torch.device("meta"):
            expected = {name: tuple(p.shape) for name, p in Transformer(config).named_parameters()}
        problems = hf_config_problems(config) if self.hf_format else []
        for name, shape in expected.items():
            if name not in self.source:
                problems.append(f"parameter {name} (shape {shape}) is missing")
            elif self.files.shapes[self.source[name]] != shape:
                problems.append(f"parameter {name} has shape {self.files.shapes[self.source[name]]} in the file but {shape} in the model config")
        unexpected = sorted(set(self.source) - set(expected) - ({"output.weight"} if config.tie_embeddings else set()))
        if unexpected:
            problems.append(f"the file has parameters the model config lacks: {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise_if_problems(f"model.init_from={config.init_from} does not fit the model config", problems)

    def tensor(self, name: str) -> Tensor:
        """The full tensor of our parameter ``name``."""
        weight = self.files.get(self.source[name])
        if self.hf_format and name.endswith("attention.wq.weight"):
            weight = rotary_halves_to_pairs(weight, self.config.n_heads)
        elif self.hf_format and name.endswith("attention.wk.weight"):
            weight = rotary_halves_to_pairs(weight, self.config.kv_heads)
        return weight
