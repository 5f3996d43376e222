"""Tests of the reference decoder (lightning_3d.models.llama) and the LR schedule, on one CPU process."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_3d.config import ModelConfig
from lightning_3d.models.llama import Transformer, apply_rotary, rotary_cis
from lightning_3d.module import warmup_cosine

SMALL = dict(n_layers=2, dim=32, n_heads=4, vocab_size=64, ffn_dim=48, max_seq_len=32)


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


def tokens(batch: int = 2, seq: int = 10, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- shapes and config


@pytest.mark.parametrize(
    "overrides, batch, seq",
    [
        (dict(), 2, 10),
        (dict(n_kv_heads=2), 3, 7),
        (dict(n_kv_heads=1, tie_embeddings=True), 1, 1),
    ],
)
def test_output_shape(overrides: dict, batch: int, seq: int) -> None:
    model = make_model(**overrides)
    with torch.no_grad():
        logits = model(tokens(batch, seq))
    assert logits.shape == (batch, seq, SMALL["vocab_size"])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(dim=30, n_heads=4), r"model\.dim=30 is not divisible by model\.n_heads=4"),
        (dict(n_heads=4, n_kv_heads=3), r"model\.n_heads=4 is not divisible by model\.n_kv_heads=3"),
        (dict(dim=12, n_heads=4), r"head dim 3 \(dim/n_heads\) must be even"),
        (dict(n_kv_heads=0), r"model\.n_kv_heads=0 must be > 0"),
        (dict(vocab_size=0), r"model\.vocab_size=0 must be > 0"),
        (dict(n_heads=0), r"model\.n_heads=0 must be > 0"),
    ],
)
def test_model_config_validate(overrides: dict, pattern: str) -> None:
    config = ModelConfig(**{**SMALL, **overrides})
    with pytest.raises(ValueError, match=pattern):
        config.validate()
    with pytest.raises(ValueError, match=pattern):
        Transformer(config)


def test_model_config_reports_every_problem() -> None:
    with pytest.raises(ValueError, match=r"model\.n_layers=0 must be > 0; model\.dim=30 is not divisible by model\.n_heads=4"):
        ModelConfig(n_layers=0, dim=30, n_heads=4).validate()


@pytest.mark.parametrize(
    "overrides, head_dim, kv_heads, hidden_dim",
    [
        (dict(dim=64, n_heads=4), 16, 4, 176),  # int(8·64/3)=170 → rounded up to a multiple of 16
        (dict(dim=64, n_heads=8, n_kv_heads=2, multiple_of=64), 8, 2, 192),
        (dict(dim=64, n_heads=4, ffn_dim=100), 16, 4, 100),  # explicit ffn_dim wins
        (dict(dim=64, n_heads=4, ffn_dim_multiplier=1.5), 16, 4, 256),  # int(1.5·170)=255 → 256
    ],
)
def test_model_config_derived_sizes(overrides: dict, head_dim: int, kv_heads: int, hidden_dim: int) -> None:
    config = ModelConfig(**overrides)
    assert (config.head_dim, config.kv_heads, config.hidden_dim) == (head_dim, kv_heads, hidden_dim)
    block = Transformer(ModelConfig(**{**overrides, "n_layers": 1})).layers["0"]
    assert block.feed_forward.w1.weight.shape == (hidden_dim, config.dim)
    assert block.attention.wk.weight.shape == (kv_heads * head_dim, config.dim)


# ----------------------------------------------------------------------------- attention


def test_gqa_equals_attention_on_explicitly_repeated_kv_heads() -> None:
    """A GQA model computes what the same model with every K/V head copied per query group computes."""
    n_heads, n_kv_heads = 4, 2
    gqa = make_model(n_heads=n_heads, n_kv_heads=n_kv_heads)
    full = Transformer(ModelConfig(**{**SMALL, "n_heads": n_heads, "n_kv_heads": n_heads})).eval()
    head_dim = gqa.config.head_dim
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            # rows are [head0 dims, head1 dims, ...]; query head h uses kv head h // (n_heads / n_kv_heads)
            per_head = value.view(n_kv_heads, head_dim, -1)
            state[name] = per_head.repeat_interleave(n_heads // n_kv_heads, dim=0).reshape(n_heads * head_dim, -1)
    full.load_state_dict(state)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), full(x), rtol=1e-5, atol=1e-5)


def test_attention_matches_a_hand_written_reference() -> None:
    """q/k/v projection, rotary, causal softmax over repeated kv heads, output projection — by hand."""
    model = make_model(n_heads=4, n_kv_heads=2)
    attention = model.layers["0"].attention
    batch, seq, dim, head_dim = 2, 6, SMALL["dim"], model.config.head_dim
    x = torch.randn(batch, seq, dim, generator=torch.Generator().manual_seed(3))
    positions = torch.arange(seq)[None]

    q = (x @ attention.wq.weight.T).view(batch, seq, 4, head_dim)
    k = (x @ attention.wk.weight.T).view(batch, seq, 2, head_dim)
    v = (x @ attention.wv.weight.T).view(batch, seq, 2, head_dim)
    cis = rotary_cis(positions, head_dim, model.config.rope_theta)
    q, k = apply_rotary(q, cis), apply_rotary(k, cis)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    expected = out.transpose(1, 2).reshape(batch, seq, -1) @ attention.wo.weight.T

    with torch.no_grad():
        torch.testing.assert_close(attention(x, positions), expected, rtol=1e-5, atol=1e-5)
        # and the enable_gqa path of sdpa agrees with SDPA on explicitly repeated heads
        q4, k2, v2 = (torch.randn(batch, n, seq, head_dim) for n in (4, 2, 2))
        torch.testing.assert_close(
            attention.core_attention(q4, k2, v2),
            F.scaled_dot_product_attention(q4, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), is_causal=True),
        )


def test_rotary_rotates_pairs_and_keeps_norms() -> None:
    head_dim = 8
    x = torch.randn(1, 5, 2, head_dim, generator=torch.Generator().manual_seed(0))
    rotated = apply_rotary(x, rotary_cis(torch.arange(5)[None], head_dim, 10000.0))
    torch.testing.assert_close(rotated[:, 0], x[:, 0])  # position 0: angle 0
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))
    # the first pair of position p turns by p radians (inv_freq[0] = 1)
    p = 3
    angle = torch.atan2(rotated[0, p, 0, 1], rotated[0, p, 0, 0]) - torch.atan2(x[0, p, 0, 1], x[0, p, 0, 0])
    assert math.isclose(math.remainder(angle.item() - p, 2 * math.pi), 0.0, abs_tol=1e-5)


@pytest.mark.parametrize("changed", [0, 4, 9])
def test_causal_later_tokens_do_not_change_earlier_logits(changed: int) -> None:
    model = make_model(n_kv_heads=2)
    x = tokens(seq=10)
    y = x.clone()
    y[:, changed] = (y[:, changed] + 1) % SMALL["vocab_size"]
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :changed], b[:, :changed], rtol=0, atol=0)
    assert not torch.allclose(a[:, changed:], b[:, changed:])
    # every later position sees the change
    assert (a[:, changed:] - b[:, changed:]).abs().amax(dim=-1).gt(0).all()


def test_rope_makes_attention_position_dependent() -> None:
    """Shifting all positions leaves logits unchanged (relative), but scrambling them does not."""
    model = make_model()
    x = tokens(seq=8)
    with torch.no_grad():
        base = model(x)
        shifted = model(x, torch.arange(8)[None] + 5)
        reversed_ = model(x, torch.arange(8).flip(0)[None])
    torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(reversed_, base, atol=1e-4)


@pytest.mark.parametrize("shape", ["1,s", "b,s"])
def test_explicit_arange_positions_equal_default(shape: str) -> None:
    model = make_model(n_kv_heads=2)
    x = tokens(batch=3, seq=9)
    positions = torch.arange(9)[None]
    if shape == "b,s":
        positions = positions.expand(3, -1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, positions), model(x), rtol=0, atol=0)


def test_per_sample_positions_are_used_per_sample() -> None:
    model = make_model()
    x = tokens(batch=2, seq=6)
    positions = torch.stack([torch.arange(6), torch.arange(6).flip(0)])
    with torch.no_grad():
        both = model(x, positions)
        first = model(x[:1], positions[:1])
        second = model(x[1:], positions[1:])
    torch.testing.assert_close(both, torch.cat([first, second]), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- removed parts and tying


def test_tie_embeddings_shares_one_parameter() -> None:
    model = make_model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    names = [name for name, _ in model.named_parameters()]
    assert "output.weight" not in names and "tok_embeddings.weight" in names
    untied = make_model(tie_embeddings=False)
    assert untied.output.weight is not untied.tok_embeddings.weight
    vocab, dim = SMALL["vocab_size"], SMALL["dim"]
    assert untied.num_params() - model.num_params() == vocab * dim


def test_forward_without_embedding_takes_hidden_states() -> None:
    model = make_model(n_kv_heads=2)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        hidden = model.tok_embeddings(x)
        model.tok_embeddings = None
        torch.testing.assert_close(model(hidden), expected, rtol=0, atol=0)


def test_forward_without_output_returns_hidden_states() -> None:
    model = make_model()
    x = tokens(batch=2, seq=5)
    with torch.no_grad():
        logits = model(x)
        head = model.output
        model.output = None
        hidden = model(x)
        assert hidden.shape == (2, 5, SMALL["dim"])
        torch.testing.assert_close(head(hidden), logits, rtol=1e-6, atol=1e-6)
        # without the final norm either: the raw residual stream
        norm = model.norm
        model.norm = None
        torch.testing.assert_close(norm(model(x)), hidden, rtol=1e-6, atol=1e-6)


def test_a_middle_pipeline_stage_only_runs_its_blocks() -> None:
    model = make_model(n_layers=3)
    x = tokens(seq=6)
    with torch.no_grad():
        expected = model(x)
        h = model.tok_embeddings(x)
        positions = torch.arange(6)[None]
        h = model.layers["0"](h, positions)
        stage = make_model(n_layers=3)
        stage.load_state_dict(model.state_dict())
        stage.tok_embeddings = None
        del stage.layers["0"]
        assert list(stage.layers.keys()) == ["1", "2"]  # names survive dropping a block
        torch.testing.assert_close(stage(h), expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- init_parameter


def init_all(model: Transformer, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        full = torch.empty_like(param)
        model.init_parameter(name, full, torch.Generator().manual_seed(seed))
        out[name] = full
    return out


def test_init_parameter_fills_norms_with_ones_and_is_deterministic() -> None:
    model = make_model(n_kv_heads=2)
    first, again, other = init_all(model, 7), init_all(model, 7), init_all(model, 8)
    norms = [name for name in first if name.endswith("norm.weight")]
    assert len(norms) == 2 * SMALL["n_layers"] + 1
    for name, value in first.items():
        torch.testing.assert_close(value, again[name], rtol=0, atol=0)
        if name in norms:
            assert torch.equal(value, torch.ones_like(value))
        else:
            assert not torch.equal(value, other[name]), name


@pytest.mark.parametrize(
    "name, expected_std",
    [
        ("tok_embeddings.weight", 0.02),
        ("layers.0.attention.wq.weight", 0.02),
        ("layers.1.feed_forward.w1.weight", 0.02),
        ("layers.0.attention.wo.weight", 0.02 / math.sqrt(2 * 8)),  # depth-scaled residual outputs
        ("layers.1.feed_forward.w2.weight", 0.02 / math.sqrt(2 * 8)),
        ("output.weight", 256**-0.5),  # untied head: 1/sqrt(dim)
    ],
)
def test_init_parameter_stds(name: str, expected_std: float) -> None:
    model = Transformer(ModelConfig(n_layers=8, dim=256, n_heads=4, vocab_size=512, ffn_dim=256, max_seq_len=16))
    param = dict(model.named_parameters())[name]
    full = torch.empty_like(param)
    model.init_parameter(name, full, torch.Generator().manual_seed(0))
    assert abs(full.mean().item()) < 0.1 * expected_std
    assert full.std().item() == pytest.approx(expected_std, rel=0.05)


# ----------------------------------------------------------------------------- warmup_cosine


@pytest.mark.parametrize("warmup, decay, min_ratio", [(10, 100, 0.1), (1, 20, 0.0), (5, 6, 0.5), (0, 50, 0.2)])
def test_warmup_cosine(warmup: int, decay: int, min_ratio: float) -> None:
    values = [warmup_cosine(step, warmup, decay, min_ratio) for step in range(decay + 5)]
    # linear warmup to exactly 1 at the last warmup step
    for step in range(warmup):
        assert values[step] == pytest.approx((step + 1) / warmup)
    if warmup:
        assert values[warmup - 1] == pytest.approx(1.0)
    assert values[warmup] == pytest.approx(1.0)
    # then monotone decreasing to min_lr_ratio at decay_steps, and flat after
    after = values[warmup:]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert values[decay] == pytest.approx(min_ratio)
    assert values[-1] == pytest.approx(min_ratio)
    assert min(after) >= min_ratio - 1e-12
    # the middle of the decay is halfway between 1 and min_lr_ratio
    if (decay - warmup) % 2 == 0:
        assert values[(warmup + decay) // 2] == pytest.approx((1 + min_ratio) / 2)
