"""A user's own module (not CausalLM) under the strategy: buffers and dropout.

- Buffers built by the model's code in ``configure_model()`` (one persistent, one not) must
  come out of materialization with the values an eager build gives, on every layout.
- Activation checkpointing must recompute dropout with the forward's random numbers:
  every mode gives the same losses and weights as no checkpointing.

Trainer runs go through torchrun (tests/buffers_ac_worker.py), one launch per world size.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conventions_models import TinyNet, TinyRegressor
from test_parity import FORK_LAUNCH
from torch import nn

from lightning_3d.config import ModelConfig, ParallelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.activation_checkpoint import apply_activation_checkpointing
from lightning_3d.parallel.compile import apply_compile
from lightning_3d.parallel.materialize import canonical_name, materialize, meta_parameters
from lightning_3d.parallel.pipeline_parallel import cut_stage
from lightning_3d.plans import ParallelPlan, llama_plan

WORKER = Path(__file__).with_name("buffers_ac_worker.py")
DROPOUT = {"dropout": 0.1}
ONE_RANK = {
    "plain": {},
    "dropout_none": {"module": DROPOUT},
    **{f"dropout_{mode}": {"module": DROPOUT, "strategy": {"activation_checkpoint": mode}} for mode in ("full", "selective", "op")},
}
TWO_RANKS = {
    "dp_shard2": {"strategy": {"dp_shard": 2}},
    "dp_shard2_ac_full": {"strategy": {"dp_shard": 2, "activation_checkpoint": "full"}},
    "tp2": {"strategy": {"dp_shard": 1, "tp": 2}},
}


def _torchrun(nproc: int, cases: dict, out_dir: Path) -> dict:
    command = [sys.executable, str(FORK_LAUNCH), str(nproc), str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out_dir / "worker.log", "w") as log:
        code = subprocess.run([*command, str(out_dir), json.dumps(cases)], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600).returncode
    if code != 0:
        pytest.fail(f"torchrun ({nproc} processes) failed:\n{(out_dir / 'worker.log').read_text()[-4000:]}")
    return {case: torch.load(out_dir / f"{case}.pt", weights_only=True) for case in cases}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    return _torchrun(1, ONE_RANK, tmp_path_factory.mktemp("one_rank"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _torchrun(2, TWO_RANKS, tmp_path_factory.mktemp("two_ranks"))


def eager_buffers() -> dict[str, torch.Tensor]:
    return dict(TinyNet().named_buffers())


def assert_eager_buffers(buffers: dict[str, torch.Tensor]) -> None:
    expected = eager_buffers()
    assert buffers.keys() == expected.keys()
    for name, buffer in buffers.items():
        assert torch.equal(buffer, expected[name]), f"{name}: {buffer} != {expected[name]}"


# ---------------------------------------------------------------- materialize, no process group
def _meta_net() -> TinyNet:
    with meta_parameters():
        return TinyNet()


def _materialized(part: nn.Module) -> nn.Module:
    materialize(part, "model", torch.device("cpu"), TinyRegressor().init_parameter, seed=0)
    return part


def _stages(net: nn.Module, plan: ParallelPlan) -> list[nn.Module]:
    # two pipeline stages, each a deep copy of the meta model: blocks [0] and [1, 2]
    return [cut_stage(net, plan, [0], is_first=True, is_last=False), cut_stage(net, plan, [1, 2], is_first=False, is_last=True)]


def test_materialize_keeps_buffers_plain_and_wrapped():
    plan = TinyRegressor().parallel_plan(ParallelConfig())
    assert_eager_buffers({canonical_name(n): b for n, b in _materialized(_meta_net()).named_buffers()})
    wrapped = _meta_net()
    apply_activation_checkpointing(wrapped, plan, "op", 2)
    apply_compile(wrapped, plan, "inductor")  # wraps only; nothing compiles before a forward
    _materialized(wrapped)
    assert any("_orig_mod" in name for name, _ in wrapped.named_buffers())
    assert_eager_buffers({canonical_name(n): b for n, b in wrapped.named_buffers()})
    # the non-persistent buffer stays out of the state dict
    assert {name for name in wrapped.state_dict() if "shift" in name} == set()


def test_materialize_keeps_buffers_of_pipeline_stages():
    plan = TinyRegressor().parallel_plan(ParallelConfig())
    buffers = {}
    for stage in _stages(_meta_net(), plan):
        buffers.update({canonical_name(n): b for n, b in _materialized(stage).named_buffers()})
    assert_eager_buffers(buffers)


def test_buffer_left_on_meta_is_named():
    net = _meta_net()
    net.blocks["1"].register_buffer("mask", torch.ones(4, device="meta"))
    with pytest.raises(ConfigError, match=r"1 of 7 buffers.*'model\.blocks\.1\.mask'"):
        _materialized(net)


def test_plans_declare_random_free_blocks():
    assert ParallelPlan(root="model", blocks="blocks").random_free_blocks is False  # safe default
    assert llama_plan(ModelConfig(), ParallelConfig()).random_free_blocks is True  # reference model: no dropout


# ---------------------------------------------------------------- trainer runs
@pytest.mark.parametrize("case", ["plain"])
def test_buffers_after_fit_one_process(case, one_rank):
    result = one_rank[case]
    assert all(math.isfinite(loss) for loss in result["losses"][0]), result["losses"]
    assert_eager_buffers(result["buffers"][0])


@pytest.mark.parametrize("case", list(TWO_RANKS))
def test_buffers_after_fit_two_processes(case, two_ranks):
    result = two_ranks[case]
    for rank, (losses, buffers) in enumerate(zip(result["losses"], result["buffers"])):
        assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses), f"rank {rank}: {losses}"
        assert_eager_buffers(buffers)


@pytest.mark.parametrize("mode", ["full", "selective", "op"])
def test_activation_checkpoint_keeps_dropout_exact(mode, one_rank):
    result, expected = one_rank[f"dropout_{mode}"], one_rank["dropout_none"]
    losses, expected_losses = torch.tensor(result["losses"][0]), torch.tensor(expected["losses"][0])
    assert len(losses) == 4
    torch.testing.assert_close(losses, expected_losses, rtol=1e-6, atol=0.0)
    assert result["weights"].keys() == expected["weights"].keys()
    for name, weight in result["weights"].items():
        torch.testing.assert_close(weight, expected["weights"][name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def test_dropout_changes_the_run(one_rank):
    # guards the parity above: the dropout masks do reach the loss
    assert one_rank["dropout_none"]["losses"][0] != one_rank["plain"]["losses"][0]
