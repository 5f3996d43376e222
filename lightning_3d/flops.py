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

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), by a substring of
# torch.cuda.get_device_name(); the first match wins, so longer names come first.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def matmul_params(config: ModelConfig) -> int:
    """Weights that take part in a matmul per token: block projections and the output head."""
    d, kv_dim = config.dim, config.kv_heads * config.head_dim
    attention = 2 * d * d + 2 * d * kv_dim  # wq, wo; wk, wv
    feed_forward = 3 * d * config.hidden_dim  # w1, w2, w3
    return config.n_layers * (attention + feed_forward) + d * config.vocab_size


def flops_per_token(config: ModelConfig, seq_len: int) -> int:
    """Forward + backward FLOPs of one training token at sequence length ``seq_len``."""
    return 6 * matmul_params(config) + 12 * config.n_layers * config.dim * seq_len


def peak_flops(device_name: str, override: Optional[float] = None) -> Optional[float]:
    """A device's dense bf16 peak FLOP/s: ``override`` if given, else the table, else None (unknown)."""
    if override is not None:
        return override
    return next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)


def mfu(tokens_per_s_per_device: float, config: ModelConfig, seq_len: int, peak: float) -> float:
    """Model FLOPs utilization: achieved training FLOP/s of one device over its peak."""
    return tokens_per_s_per_device * flops_per_token(config, seq_len) / peak
