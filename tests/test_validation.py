"""Tests of the pre-flight layout checks: ParallelDims.from_config and check_layout.

Nothing here creates a process group: both functions only do arithmetic on the configs.
"""

from __future__ import annotations

import re

import pytest

from lightning_3d.config import DataConfig, ModelConfig, ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.validation import check_layout

# A model whose every head count and vocab size divides by 1, 2, 4 and 8.
OK_MODEL = dict(n_layers=2, dim=64, n_heads=8, n_kv_heads=8, vocab_size=512, max_seq_len=128)
OK_DATA = dict(seq_len=64, global_batch_size=16)


def problems_of(error: pytest.ExceptionInfo) -> list[str]:
    """The bullet points of a check_layout error."""
    message = str(error.value)
    assert message.startswith("invalid configuration:")
    return [line.removeprefix("  - ") for line in message.splitlines()[1:]]


# ----------------------------------------------------------------------------- ParallelDims.from_config


@pytest.mark.parametrize(
    "world_size, degrees, expected",
    [
        # dp_shard=-1 takes the leftover ranks
        (8, dict(tp=2, dp_replicate=2), dict(pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2)),
        (8, dict(), dict(pp=1, dp_replicate=1, dp_shard=8, cp=1, tp=1)),
        (8, dict(tp=8), dict(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=8)),
        (12, dict(tp=2, cp=3), dict(pp=1, dp_replicate=1, dp_shard=2, cp=3, tp=2)),
        (16, dict(pp=2, tp=2, dp_replicate=2), dict(pp=2, dp_replicate=2, dp_shard=2, cp=1, tp=2)),
        (1, dict(), dict(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=1)),
        # explicit degrees whose product is the world size are kept as given
        (4, dict(dp_replicate=4, dp_shard=1), dict(pp=1, dp_replicate=4, dp_shard=1, cp=1, tp=1)),
        (8, dict(dp_replicate=2, dp_shard=2, tp=2), dict(pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2)),
    ],
)
def test_from_config_resolves_degrees(world_size: int, degrees: dict, expected: dict) -> None:
    dims = ParallelDims.from_config(ParallelConfig(**degrees), world_size)
    assert {name: getattr(dims, name) for name in expected} == expected
    assert dims.world_size == world_size
    assert dims.pp * dims.dp_replicate * dims.dp_shard * dims.cp * dims.tp == world_size


@pytest.mark.parametrize(
    "degrees, dp, fsdp, loss, data_parallel",
    [
        (dict(pp=1, dp_replicate=2, dp_shard=3, cp=1, tp=2), 6, 3, 6, True),
        (dict(pp=1, dp_replicate=1, dp_shard=2, cp=2, tp=2), 2, 4, 4, True),  # CP ranks join fsdp and loss
        (dict(pp=2, dp_replicate=2, dp_shard=2, cp=2, tp=1), 4, 4, 8, True),
        (dict(pp=1, dp_replicate=1, dp_shard=1, cp=1, tp=4), 1, 1, 1, False),  # TP only: no data parallel
        (dict(pp=1, dp_replicate=1, dp_shard=1, cp=2, tp=1), 1, 2, 2, True),  # CP alone still shards params
        (dict(pp=1, dp_replicate=2, dp_shard=1, cp=1, tp=1), 2, 1, 2, True),  # DDP-style
    ],
)
def test_flattened_sizes(degrees: dict, dp: int, fsdp: int, loss: int, data_parallel: bool) -> None:
    world_size = degrees["pp"] * degrees["dp_replicate"] * degrees["dp_shard"] * degrees["cp"] * degrees["tp"]
    dims = ParallelDims.from_config(ParallelConfig(**degrees), world_size)
    assert (dims.dp, dims.fsdp, dims.loss) == (dp, fsdp, loss)
    assert dims.data_parallel_enabled is data_parallel
    assert str(dims) == " × ".join(f"{name}={degrees[name]}" for name in ("pp", "dp_replicate", "dp_shard", "cp", "tp"))


@pytest.mark.parametrize(
    "world_size, degrees, pattern",
    [
        (
            8,
            dict(dp_replicate=2, dp_shard=3, tp=2),
            r"pp=1 × dp_replicate=2 × dp_shard=3 × cp=1 × tp=2 = 12 ranks, but the world size is 8",
        ),
        (
            1,
            dict(dp_shard=2, tp=2),
            r"pp=1 × dp_replicate=1 × dp_shard=2 × cp=1 × tp=2 = 4 ranks, but the world size is 1",
        ),
        (
            16,
            dict(pp=2, dp_replicate=1, dp_shard=2, cp=1, tp=2),
            r"pp=2 × dp_replicate=1 × dp_shard=2 × cp=1 × tp=2 = 8 ranks, but the world size is 16",
        ),
    ],
)
def test_product_must_equal_world_size(world_size: int, degrees: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ParallelDims.from_config(ParallelConfig(**degrees), world_size)


@pytest.mark.parametrize(
    "world_size, degrees, pattern",
    [
        (8, dict(tp=0), r"parallel\.tp=0 must be >= 1"),
        (8, dict(dp_shard=0), r"parallel\.dp_shard=0 must be >= 1"),
        (8, dict(dp_shard=-2), r"parallel\.dp_shard=-2 must be >= 1"),
        (8, dict(pp=-1), r"parallel\.pp=-1 must be >= 1"),
        (8, dict(cp=0), r"parallel\.cp=0 must be >= 1"),
        (8, dict(dp_replicate=0), r"parallel\.dp_replicate=0 must be >= 1"),
        (0, dict(), r"world size 0 must be >= 1"),
        # all bad degrees are named at once
        (8, dict(tp=0, cp=-3), r"parallel\.cp=-3 must be >= 1; parallel\.tp=0 must be >= 1"),
    ],
)
def test_non_positive_degree_is_named(world_size: int, degrees: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ParallelDims.from_config(ParallelConfig(**degrees), world_size)


@pytest.mark.parametrize(
    "world_size, degrees, pattern",
    [
        (6, dict(tp=4), r"tp=4 = 4 does not divide the world size 6.*divide 6: \[1, 2, 3, 6\]"),
        (8, dict(tp=2, dp_replicate=3), r"dp_replicate=3 .* tp=2 = 6 does not divide the world size 8.*\[1, 2, 4, 8\]"),
        (4, dict(pp=3), r"pp=3 .* = 3 does not divide the world size 4.*\[1, 2, 4\]"),
    ],
)
def test_leftover_needs_the_others_to_divide_the_world(world_size: int, degrees: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ParallelDims.from_config(ParallelConfig(dp_shard=-1, **degrees), world_size)


# ----------------------------------------------------------------------------- check_layout


def test_valid_layout_returns_the_resolved_dims() -> None:
    dims = check_layout(
        ParallelConfig(tp=2, dp_replicate=2),
        8,
        model=ModelConfig(**OK_MODEL),
        data=DataConfig(**OK_DATA),
        accumulate_grad_batches=2,
    )
    assert dims == ParallelDims(pp=1, dp_replicate=2, dp_shard=2, cp=1, tp=2, world_size=8)


def test_check_layout_without_model_or_data_checks_only_the_layout() -> None:
    assert check_layout(ParallelConfig(tp=4), 8).dp_shard == 2
    with pytest.raises(ValueError, match=r"= 4 ranks, but the world size is 8"):
        check_layout(ParallelConfig(dp_shard=2, tp=2), 8)


@pytest.mark.parametrize(
    "model_overrides, tp, pattern",
    [
        # each divisibility problem names the value, the tp degree and the tp values that work
        (dict(n_heads=6, dim=48, n_kv_heads=6), 4, r"model\.n_heads=6 is not divisible by parallel\.tp=4; valid tp values: \[1, 2\]"),
        (dict(n_kv_heads=2), 4, r"model\.n_kv_heads=2 is not divisible by parallel\.tp=4; valid tp values: \[1, 2\]"),
        (dict(vocab_size=500), 8, r"model\.vocab_size=500 is not divisible by parallel\.tp=8; valid tp values: \[1, 2, 4\]"),
        (dict(vocab_size=257), 2, r"model\.vocab_size=257 is not divisible by parallel\.tp=2; valid tp values: \[1\]"),
    ],
)
def test_model_shapes_must_divide_by_tp(model_overrides: dict, tp: int, pattern: str) -> None:
    model = ModelConfig(**{**OK_MODEL, **model_overrides})
    with pytest.raises(ValueError, match=pattern):
        check_layout(ParallelConfig(tp=tp), 8, model=model)


def test_n_kv_heads_defaults_to_n_heads_for_the_tp_check() -> None:
    model = ModelConfig(**{**OK_MODEL, "n_heads": 2, "dim": 32, "n_kv_heads": None})
    with pytest.raises(ValueError) as error:
        check_layout(ParallelConfig(tp=4), 8, model=model)
    assert any(re.search(r"model\.n_kv_heads=2 is not divisible by parallel\.tp=4", p) for p in problems_of(error))


@pytest.mark.parametrize(
    "model_overrides, pattern",
    [
        (dict(dim=66, n_heads=8), r"model\.dim=66 is not divisible by model\.n_heads=8"),
        (dict(dim=24, n_heads=8), r"head dim 3 \(dim/n_heads\) must be even"),
        (dict(n_heads=8, n_kv_heads=3), r"model\.n_heads=8 is not divisible by model\.n_kv_heads=3"),
        (dict(n_layers=0), r"model\.n_layers=0 must be > 0"),
    ],
)
def test_model_config_problems_are_reported(model_overrides: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        check_layout(ParallelConfig(), 1, model=ModelConfig(**{**OK_MODEL, **model_overrides}))


@pytest.mark.parametrize(
    "world_size, parallel, batch, accumulate, pattern",
    [
        (
            4,
            dict(),
            10,
            1,
            r"data\.global_batch_size=10 is not divisible by the data-parallel size 4 \(dp_replicate=1 × dp_shard=4\) "
            r"× accumulate_grad_batches=1 = 4; nearest valid: \[8, 12\]",
        ),
        (
            8,
            dict(tp=2, dp_replicate=2),
            12,
            2,
            r"data\.global_batch_size=12 is not divisible by the data-parallel size 4 \(dp_replicate=2 × dp_shard=2\) "
            r"× accumulate_grad_batches=2 = 8; nearest valid: \[8, 16\]",
        ),
        (
            2,
            dict(),
            1,
            1,
            r"global_batch_size=1 is not divisible by the data-parallel size 2 .* = 2; nearest valid: \[2\]",
        ),
        (
            1,
            dict(),
            6,
            4,
            r"global_batch_size=6 is not divisible by the data-parallel size 1 .*accumulate_grad_batches=4 = 4; "
            r"nearest valid: \[4, 8\]",
        ),
    ],
)
def test_global_batch_must_divide_by_dp_times_accumulation(
    world_size: int, parallel: dict, batch: int, accumulate: int, pattern: str
) -> None:
    data = DataConfig(**{**OK_DATA, "global_batch_size": batch})
    with pytest.raises(ValueError, match=pattern):
        check_layout(ParallelConfig(**parallel), world_size, ModelConfig(**OK_MODEL), data, accumulate)


def test_global_batch_divisible_by_dp_passes() -> None:
    # tp ranks load the same batch: only dp (not the world size) must divide the global batch
    data = DataConfig(**{**OK_DATA, "global_batch_size": 6})
    dims = check_layout(ParallelConfig(tp=4), 8, ModelConfig(**OK_MODEL), data, accumulate_grad_batches=3)
    assert dims.dp == 2


def test_accumulate_grad_batches_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"trainer\.accumulate_grad_batches=0 must be >= 1"):
        check_layout(ParallelConfig(), 1, ModelConfig(**OK_MODEL), DataConfig(**OK_DATA), accumulate_grad_batches=0)


def test_seq_len_longer_than_max_seq_len() -> None:
    data = DataConfig(**{**OK_DATA, "seq_len": 256})
    with pytest.raises(ValueError, match=r"data\.seq_len=256 is longer than model\.max_seq_len=128"):
        check_layout(ParallelConfig(), 1, ModelConfig(**OK_MODEL), data)


def test_seq_len_must_divide_by_tp_under_sequence_parallel() -> None:
    data = DataConfig(**{**OK_DATA, "seq_len": 66})
    with pytest.raises(ValueError, match=r"data\.seq_len=66 is not divisible by parallel\.tp=4 \(sequence parallel"):
        check_layout(ParallelConfig(tp=4, sequence_parallel=True), 4, ModelConfig(**OK_MODEL), data)
    # without sequence parallel every tp rank holds the whole sequence: no constraint
    dims = check_layout(ParallelConfig(tp=4, sequence_parallel=False), 4, ModelConfig(**OK_MODEL), data)
    assert dims.tp == 4


@pytest.mark.parametrize(
    "world_size, parallel, pattern",
    [
        (2, dict(pp=2, pp_schedule="1f2b"), r"parallel\.pp_schedule='1f2b' is not one of \['gpipe', '1f1b', "),
        (4, dict(cp=4, cp_backend="native"), r"parallel\.cp_backend=native \(torch's context_parallel\) is not wired in"),
        (1, dict(cp_backend="ulysses"), r"parallel\.cp_backend='ulysses' is not one of \['ring', 'allgather', 'native'\]"),
        (1, dict(timeout_s=0.0), r"parallel\.timeout_s=0\.0 must be > 0"),
    ],
)
def test_unavailable_or_invalid_parallel_options(world_size: int, parallel: dict, pattern: str) -> None:
    # the layouts resolve (product = world size); the option itself is what is rejected
    ParallelDims.from_config(ParallelConfig(**parallel), world_size)
    with pytest.raises(ValueError, match=pattern):
        check_layout(ParallelConfig(**parallel), world_size)


def test_every_problem_is_reported_at_once() -> None:
    model = ModelConfig(**{**OK_MODEL, "n_heads": 6, "dim": 48, "n_kv_heads": 6, "max_seq_len": 64})
    data = DataConfig(seq_len=98, global_batch_size=7)
    with pytest.raises(ValueError) as error:
        check_layout(ParallelConfig(tp=4, pp=2, pp_schedule="zbv"), 16, model=model, data=data, accumulate_grad_batches=1)
    problems = problems_of(error)
    expected = [
        r"^pp_schedule=zbv places exactly 2 stages per rank \(a V\), but stages_per_rank=1",
        r"^model\.n_heads=6 is not divisible by parallel\.tp=4",
        r"^model\.n_kv_heads=6 is not divisible by parallel\.tp=4",
        r"^data\.seq_len=98 is longer than model\.max_seq_len=64",
        r"^data\.seq_len=98 is not divisible by parallel\.tp=4 \(sequence parallel shards the sequence over tp\); nearest valid: \[96, 100\]",
        r"^data\.global_batch_size=7 is not divisible by the data-parallel size 2 .* = 2; nearest valid: \[6, 8\]",
    ]
    assert len(problems) == len(expected), problems
    for pattern in expected:
        assert any(re.search(pattern, problem) for problem in problems), (pattern, problems)


def test_layout_error_is_reported_together_with_model_errors() -> None:
    # a layout that does not resolve still lets the model checks run (and skips the batch check)
    model = ModelConfig(**{**OK_MODEL, "vocab_size": 511})
    with pytest.raises(ValueError) as error:
        check_layout(ParallelConfig(dp_shard=3, tp=2), 8, model=model, data=DataConfig(**OK_DATA))
    problems = problems_of(error)
    assert len(problems) == 2, problems
    assert re.search(r"= 6 ranks, but the world size is 8", problems[0])
    assert re.search(r"model\.vocab_size=511 is not divisible by parallel\.tp=2; valid tp values: \[1\]", problems[1])


# ----------------------------------------------------------------------------- pipeline parallel

PP_MODEL = dict(n_layers=4, dim=64, n_heads=4, vocab_size=512, max_seq_len=128)


@pytest.mark.parametrize(
    "parallel, model, batch, accumulate, pattern",
    [
        (dict(pp=4, pp_schedule="1f1b", microbatches=2), {}, 8, 1,
         r"pp_schedule=1f1b needs at least as many microbatches as stages: microbatches=2 < pp 4 × stages_per_rank 1 = 4"),
        (dict(pp=2, pp_schedule="gpipe", microbatches=3), {}, 8, 1,
         r"per-rank batch of 8 sequences .* not divisible by parallel\.microbatches=3; valid microbatches: \[1, 2, 4, 8\]"),
        (dict(pp=2, pp_schedule="gpipe", microbatches=3), {}, 16, 4,
         r"per-rank batch of 4 sequences \(global_batch_size=16 / dp 1 / accumulate_grad_batches 4\)"),
        (dict(pp=4, pp_schedule="interleaved_1f1b", stages_per_rank=2), {}, 8, 1,
         r"pp 4 × stages_per_rank 2 = 8 stages, more than model\.n_layers=4"),
        (dict(pp=2, pp_schedule="1f1b", stages_per_rank=2), {}, 8, 1,
         r"pp_schedule=1f1b runs one stage per rank, but stages_per_rank=2"),
        (dict(pp=2, pp_schedule="interleaved_1f1b", stages_per_rank=1), {}, 8, 1,
         r"pp_schedule=interleaved_1f1b runs several stages per rank, but stages_per_rank=1"),
        (dict(pp=2, pp_schedule="dualpipev", stages_per_rank=3), dict(n_layers=6), 12, 1,
         r"pp_schedule=dualpipev places exactly 2 stages per rank \(a V\), but stages_per_rank=3"),
        (dict(pp=2, pp_schedule="1f1b", pp_layers=[[0, 1], [3]]), {}, 8, 1,
         r"parallel\.pp_layers must list blocks 0\.\.3 once each, in order"),
        (dict(pp=2, pp_schedule="1f1b", pp_layers=[[0, 1, 2, 3]]), {}, 8, 1,
         r"parallel\.pp_layers has 1 stages, but pp × stages_per_rank = 2"),
        (dict(pp=2, pp_schedule="1f1b", tp=2, loss_parallel=True), {}, 8, 1,
         r"loss_parallel=true is not supported with pp > 1"),
    ],
)
def test_bad_pipeline_layouts(parallel: dict, model: dict, batch: int, accumulate: int, pattern: str) -> None:
    config = ParallelConfig(dp_shard=1, **parallel)
    world = config.pp * config.tp
    with pytest.raises(ValueError, match=pattern):
        check_layout(config, world, ModelConfig(**{**PP_MODEL, **model}), DataConfig(seq_len=32, global_batch_size=batch), accumulate)


@pytest.mark.parametrize(
    "parallel, layers",
    [
        (dict(pp=2, pp_schedule="gpipe"), 4),
        (dict(pp=4, pp_schedule="1f1b"), 6),
        (dict(pp=2, pp_schedule="zbv", stages_per_rank=2), 4),
        (dict(pp=2, pp_schedule="interleaved_1f1b", stages_per_rank=2, pp_layers=[[0], [1], [2], [3]]), 4),
    ],
)
def test_good_pipeline_layouts(parallel: dict, layers: int) -> None:
    config = ParallelConfig(dp_shard=1, **parallel)
    dims = check_layout(config, config.pp, ModelConfig(**{**PP_MODEL, "n_layers": layers}), DataConfig(seq_len=32, global_batch_size=8))
    assert dims.pp == config.pp


@pytest.mark.parametrize(
    "parallel, seq_len, pattern",
    [
        (dict(cp=2, sequence_parallel=False), 30, r"seq_len=30 is not divisible by 2·cp=4 \(context parallel cuts each sequence into 2·cp chunks\); nearest valid: \[28, 32\]"),
        (dict(cp=2, tp=2), 24, r"seq_len=24 is not divisible by 2·cp=4 × parallel\.tp=2 = 8 .*nearest valid: \[24, 32\]|seq_len=24"),
        (dict(cp=2, tp=2), 20, r"seq_len=20 is not divisible by 2·cp=4 × parallel\.tp=2 = 8 \(context parallel .*; sequence parallel .*\); nearest valid: \[16, 24\]"),
    ],
)
def test_seq_len_must_split_into_cp_chunks(parallel: dict, seq_len: int, pattern: str) -> None:
    config = ParallelConfig(dp_shard=1, **parallel)
    world = config.cp * config.tp
    data = DataConfig(seq_len=seq_len, global_batch_size=8)
    if seq_len % (2 * config.cp * (config.tp if config.sequence_parallel else 1)) == 0:
        assert check_layout(config, world, ModelConfig(**OK_MODEL), data).cp == config.cp
    else:
        with pytest.raises(ValueError, match=pattern):
            check_layout(config, world, ModelConfig(**OK_MODEL), data)
