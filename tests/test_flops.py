"""The FLOPs-per-token formula against torch's own count of the reference model's matmuls."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lightning_3d.config import ModelConfig
from lightning_3d.flops import flops_per_token, matmul_params, mfu, peak_flops
from lightning_3d.models.llama import Transformer


@pytest.mark.parametrize(
    "shape, seq_len",
    [
        (dict(n_layers=2, dim=64, n_heads=4, vocab_size=512), 32),
        (dict(n_layers=3, dim=96, n_heads=6, n_kv_heads=2, vocab_size=300, ffn_dim=200), 48),  # GQA
        (dict(n_layers=2, dim=64, n_heads=4, vocab_size=512, tie_embeddings=True), 64),  # the head is the embedding
    ],
)
def test_formula_equals_flop_counter_on_the_reference_model(shape: dict, seq_len: int) -> None:
    config = ModelConfig(max_seq_len=128, **shape)
    model = Transformer(config)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    batch = 2
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len))
    # the math backend spells attention as matmuls, which the counter sees (CPU's fused kernel it does not)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).float().logsumexp(-1).sum().backward()
    assert counter.get_total_flops() == batch * seq_len * flops_per_token(config, seq_len)
    matmul_weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "tok_embeddings" not in n)
    assert matmul_params(config) == matmul_weights + (config.dim * config.vocab_size if config.tie_embeddings else 0)


def test_peak_flops_table_and_override() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("cpu", "bf16-mixed") is None
    assert peak_flops("cpu", "32-true", override=1e12) == 1e12


def test_mfu() -> None:
    config = ModelConfig(n_layers=2, dim=64, n_heads=4, vocab_size=512)
    # exactly the peak's worth of tokens per second is 100%
    tokens_per_s = 1e12 / flops_per_token(config, 32)
    assert mfu(tokens_per_s, config, 32, 1e12) == pytest.approx(1.0)
