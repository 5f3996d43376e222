"""Errors of ModelParallel4DStrategy that must come before any process group exists.

Every fit here runs on one CPU device and is expected to stop in ``setup_environment``,
before ``init_process_group``. The autouse fixture restores what Lightning's launcher
changes in the process (environment variables, thread count) and checks that no test
leaves a process group behind.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import StrategyRegistry
from torch.utils.data import DataLoader

import lightning_3d  # noqa: F401  (registers strategy="4d")
from lightning_3d import CausalLM, ModelConfig, ModelParallel4DStrategy, ParallelConfig
from lightning_3d.config import PerfConfig

PARALLEL_FIELDS = [f.name for f in fields(ParallelConfig)]
PERF_FIELDS = [f.name for f in fields(PerfConfig)]

pytestmark = pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")


@pytest.fixture(autouse=True)
def process_state():
    environ, threads = dict(os.environ), torch.get_num_threads()
    assert not dist.is_initialized(), "a process group was left by an earlier test"
    yield
    os.environ.clear()
    os.environ.update(environ)
    torch.set_num_threads(threads)
    assert not dist.is_initialized(), "this test left a process group behind"


class NoPlanModule(L.LightningModule):
    """A plain module: no ``parallel_plan``, no ``model_config``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_on_one_cpu(strategy: ModelParallel4DStrategy, module: L.LightningModule) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader(torch.randn(4, 4), batch_size=2))


def fit_expecting_error(strategy: ModelParallel4DStrategy, module: L.LightningModule, pattern: str) -> bool:
    """Fit, expect a ValueError matching ``pattern``; return whether a process group existed after it."""
    try:
        with pytest.raises(ValueError, match=pattern):
            fit_on_one_cpu(strategy, module)
        return dist.is_initialized()
    finally:
        if dist.is_initialized():  # never let a process group leak into the next test
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- constructor


@pytest.mark.parametrize(
    "options, unknown",
    [
        (dict(tpp=2), ["tpp"]),
        (dict(tpp=2, dp=4), ["dp", "tpp"]),
        (dict(tp=2, sequence_paralel=False), ["sequence_paralel"]),
    ],
)
def test_unknown_option_is_a_type_error_listing_the_valid_ones(options: dict, unknown: list[str]) -> None:
    with pytest.raises(TypeError, match=re.escape(f"unknown option(s) {unknown}; valid: ")) as error:
        ModelParallel4DStrategy(**options)
    message = str(error.value)
    assert message.endswith(str(PARALLEL_FIELDS + PERF_FIELDS))
    for name in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "sequence_parallel", "activation_checkpoint", "compile"):
        assert repr(name) in message


def test_strategy_keywords_fill_the_parallel_and_perf_configs() -> None:
    strategy = ModelParallel4DStrategy(tp=2, activation_checkpoint="selective", ac_every=3, compile=True)
    assert (strategy.parallel.tp, strategy.parallel.dp_shard) == (2, -1)
    assert (strategy.perf.activation_checkpoint, strategy.perf.ac_every, strategy.perf.compile) == ("selective", 3, True)
    assert strategy.perf.cpu_offload is False


@pytest.mark.parametrize(
    "base, options, expected",
    [
        (None, dict(), ParallelConfig()),
        (None, dict(dp_shard=2, tp=2), ParallelConfig(dp_shard=2, tp=2)),
        (ParallelConfig(tp=4, dp_replicate=2), dict(), ParallelConfig(tp=4, dp_replicate=2)),
        (ParallelConfig(tp=4, dp_replicate=2), dict(tp=2), ParallelConfig(tp=2, dp_replicate=2)),
        (
            ParallelConfig(tp=4, sequence_parallel=False, timeout_s=60.0),
            dict(sequence_parallel=True, loss_parallel=True),
            ParallelConfig(tp=4, sequence_parallel=True, loss_parallel=True, timeout_s=60.0),
        ),
    ],
)
def test_keyword_options_override_the_parallel_config(base, options: dict, expected: ParallelConfig) -> None:
    before = repr(base)
    strategy = ModelParallel4DStrategy(base, **options)
    assert strategy.parallel == expected
    assert repr(base) == before  # the caller's config is not modified


def test_layout_is_unknown_before_setup() -> None:
    strategy = ModelParallel4DStrategy(tp=2)
    for attribute in ("dims", "device_mesh", "meshes"):
        with pytest.raises(RuntimeError, match=r"setup_environment\(\)"):
            getattr(strategy, attribute)


def test_strategy_4d_resolves_by_name() -> None:
    assert "4d" in StrategyRegistry
    trainer = L.Trainer(strategy="4d", accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert isinstance(trainer.strategy, ModelParallel4DStrategy)
    assert trainer.strategy.parallel == ParallelConfig()
    assert trainer.strategy.num_processes == 1
    assert trainer.strategy.root_device == torch.device("cpu")


# ----------------------------------------------------------------------------- errors before the process group


def _small_causal_lm() -> CausalLM:
    return CausalLM(ModelConfig(n_layers=1, dim=32, n_heads=4, vocab_size=64, max_seq_len=16))


def test_a_plain_module_trains_with_no_plan() -> None:
    # no parallel_plan, no init_parameter, weights created in __init__: the strategy derives a
    # data-parallel plan (tests/test_any_model.py runs such modules on several ranks)
    module = NoPlanModule()
    before = module.layer.weight.detach().clone()
    try:
        fit_on_one_cpu(ModelParallel4DStrategy(), module)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert module.trainer.global_step == 1
    assert not torch.equal(module.layer.weight.detach().cpu(), before)


@pytest.mark.parametrize(
    "options, make_module, patterns",
    [
        (
            dict(dp_shard=2, tp=2),
            lambda: CausalLM(ModelConfig(n_layers=1, dim=32, n_heads=4, vocab_size=64, max_seq_len=16)),
            [r"pp=1 × dp_replicate=1 × dp_shard=2 × cp=1 × tp=2 = 4 ranks, but the world size is 1"],
        ),
        (
            dict(dp_shard=2),
            _small_causal_lm,
            [r"pp=1 × dp_replicate=1 × dp_shard=2 × cp=1 × tp=1 = 2 ranks, but the world size is 1"],
        ),
        (
            dict(dp_replicate=3, dp_shard=-1),
            _small_causal_lm,
            [r"pp=1 × dp_replicate=3 × cp=1 × tp=1 = 3 does not divide the world size 1"],
        ),
        (
            dict(pp=2, dp_shard=1),
            _small_causal_lm,
            [
                r"pp=2 × dp_replicate=1 × dp_shard=1 × cp=1 × tp=1 = 2 ranks, but the world size is 1",
                r"pp 2 × stages_per_rank 1 = 2 stages, more than model\.n_layers=1",
            ],
        ),
        (
            # the module's model_config is checked too (tp=1 here, so only the model itself is wrong)
            dict(),
            lambda: _causal_lm_with_bad_config(),
            [r"model\.dim=30 is not divisible by model\.n_heads=4"],
        ),
    ],
    ids=["dp_shard2xtp2", "dp_shard2", "leftover", "pp2", "bad_model"],
)
def test_bad_layout_fails_before_the_process_group(options: dict, make_module, patterns: list[str]) -> None:
    error_pattern = r"(?s)invalid configuration:" + "".join(f"(?=.*{p})" for p in patterns)
    assert not fit_expecting_error(ModelParallel4DStrategy(**options), make_module(), error_pattern)


def _causal_lm_with_bad_config() -> CausalLM:
    """CausalLM validates its config in __init__; break it afterwards to see the strategy catch it."""
    module = CausalLM(ModelConfig(n_layers=1, dim=32, n_heads=4, vocab_size=64, max_seq_len=16))
    module.model_config.dim = 30
    return module


