"""Training FLOPs per token of the reference decoder, and MFU against a device's peak.

The count is the usual one (PaLM appendix B, torchtitan): ``6·N + 12·L·d·s`` per token for
forward + backward, where ``N`` counts the weights used in matmuls (every projection of
every block and the output head; not the embedding lookup, not the norm gains) and
``12·L·d·s`` is attention's two ``s × s`` products per layer, counted in full (a causal
mask is not subtracted, as a dense kernel does the work anyway).
"""

from __future__ import annotations

from typing import Optional

from lightning_3d.config import ModelConfig

# Dense peak FLOP/s per device (vendor figures, no sparsity) by the kind of matmul a run does, keyed by
# a substring of torch.cuda.get_device_name(); the first match wins, so longer names come first.
# "half": bf16 or fp16 tensor cores (the same rate on these parts); "tf32": fp32 matmuls on tensor
# cores (torch.get_float32_matmul_precision() "high" or "medium"); "fp32": plain fp32 ("highest").
# Other GPUs get Lightning's get_available_flops: its table (checked on lightning 2.6) misses a plain
# "NVIDIA H200", reads an L40S as an L4 and gives some Hopper parts with sparsity.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"half": 989e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "H100 PCIe": {"half": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H100": {"half": 989e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "A100": {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"half": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "A10G": {"half": 70e12, "fp32": 31.2e12},
}


def decoder_matmul_params(n_layers: int, dim: int, q_dim: int, kv_dim: int, ffn_dim: int, vocab_size: int) -> int:
    """Weights that take part in a matmul per token of a Llama-style decoder: block projections
    and the output head. ``q_dim`` = heads × head dim (the model dim unless head_dim is set apart)."""
    attention = 2 * dim * q_dim + 2 * dim * kv_dim  # wq, wo; wk, wv
    feed_forward = 3 * dim * ffn_dim  # w1, w2, w3
    return n_layers * (attention + feed_forward) + dim * vocab_size


def decoder_flops_per_token(matmul_params: int, n_layers: int, q_dim: int, seq_len: int) -> int:
    """Forward + backward FLOPs of one training token: 6 per matmul weight, and the attention
    scores and values (12 · layers · q_dim · seq_len)."""
    return 6 * matmul_params + 12 * n_layers * q_dim * seq_len


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token: block projections and the output head."""
    return decoder_matmul_params(
        config.n_layers, config.dim, config.dim, config.kv_heads * config.head_dim, config.hidden_dim, config.vocab_size
    )


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs of one training token at sequence length ``seq_len``."""
    return decoder_flops_per_token(matmul_params(config), config.n_layers, config.dim, seq_len)


def matmul_kind(precision: str, tf32: bool = False) -> Optional[str]:
    """The :data:`PEAK_FLOPS` column for a Lightning precision flag (``"bf16-mixed"``, ``"32-true"``, …);
    None for one the table has no column for (fp64, float8 engines)."""
    if precision.startswith(("bf16", "16")):
        return "half"
    if precision.startswith("32"):
        return "tf32" if tf32 else "fp32"
    return None


def peak_flops(device_name: str, precision: str, override: Optional[float] = None, tf32: bool = False) -> Optional[float]:
    """One device's dense peak FLOP/s for the matmuls of a run at ``precision`` (the trainer's flag):
    ``override`` if given, else the table, else None (unknown device or precision).

    ``tf32``: fp32 matmuls run on tensor cores (``torch.get_float32_matmul_precision() != "highest"``).
    """
    if override is not None:
        return override
    kind = matmul_kind(precision, tf32)
    row = next((row for name, row in PEAK_FLOPS.items() if name in device_name), None)
    return row.get(kind) if row is not None and kind is not None else None


def mfu(tokens_per_s_per_device: float, config: ModelConfig, seq_len: int, peak: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s of one device over its peak."""
    return tokens_per_s_per_device * flops_per_token(config, seq_len) / peak
