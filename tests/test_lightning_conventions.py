"""Lightning conventions hold for a user's own LightningModule (not CausalLM) under every layout.

One group of 4 ranks (real gloo process groups) runs every case of tests/conventions_worker.py.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conventions_worker import ToyLit, loader
from test_parity import _torchrun

from lightning_3d.errors import ConfigError
from lightning_3d.strategy import ModelParallel4DStrategy

WORKER = Path(__file__).with_name("conventions_worker.py")

CASES = {
    # self.log(..., sync_dist=True) sums over the ranks that hold distinct data: dp × cp
    "log_dp_shard4": {"kind": "logging", "layout": {"dp_shard": 4}},
    "log_dp_shard2_tp2": {"kind": "logging", "layout": {"dp_shard": 2, "tp": 2}},
    "log_dp_shard2_pp2": {"kind": "logging", "layout": {"dp_shard": 2, "pp": 2, "pp_schedule": "1f1b", "microbatches": 2}},
    # validate / test / predict after fit, and a new Trainer on the same parallelized module
    "after_fit_dp_shard2_tp2": {"kind": "after_fit", "layout": {"dp_shard": 2, "tp": 2}},
    "after_fit_dp_shard2_pp2": {"kind": "after_fit", "layout": {"dp_shard": 2, "pp": 2, "pp_schedule": "1f1b", "microbatches": 2}},
    # a save that keeps rank 0 busy 3 s, with parallel.timeout_s=1 after the first step
    "slow_save_dp_shard4": {"kind": "slow_save", "layout": {"dp_shard": 4}},
    # a validation in which rank 0 is busy 3 s, with parallel.timeout_s=1 after the first step
    "slow_validation_dp_shard2_tp2": {"kind": "slow_validation", "layout": {"dp_shard": 2, "tp": 2}},
    # layout checks run from the module itself (it has no model_config)
    "bad_tp_shape": {"kind": "bad_module", "layout": {"dp_shard": 1, "tp": 4}, "module": {"hidden": 30}},
    "bad_pp_blocks": {"kind": "bad_module", "layout": {"dp_shard": 1, "pp": 4, "pp_schedule": "1f1b", "microbatches": 4}, "module": {"n_blocks": 3}},
    # an embedding tied to the head, cut into the first and last pipeline stage
    "tied_dp_shard2_pp2": {"kind": "tied", "layout": {"dp_shard": 2, "pp": 2, "pp_schedule": "1f1b", "microbatches": 2}},
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("conventions")
    _torchrun(4, CASES, out_dir, worker=WORKER)
    return {name: torch.load(out_dir / f"{name}.pt", weights_only=False) for name in CASES}


def _ok(result: dict) -> dict:
    assert "failed" not in result, result.get("traceback")
    return result


@pytest.mark.parametrize("case, dp_cp", [("log_dp_shard4", 4), ("log_dp_shard2_tp2", 2), ("log_dp_shard2_pp2", 2)])
def test_sync_dist_sums_over_ranks_with_distinct_data(results, case, dp_cp):
    # Lightning's DDP on 2 processes logs 2.0 for a 1.0 summed with sync_dist; tp and pp copies are not counted
    logged = _ok(results[case])["logged"]
    assert logged["ones"] == dp_cp


def test_pipeline_logs_what_the_last_stage_logged(results):
    # each rank logs 10 × its stage + 1: rank 0 (stage 0) writes the last stage's sum over dp=2, 2 × 11
    result = _ok(results["log_dp_shard2_pp2"])
    assert result["logged"]["stage_value"] == 22.0
    # torchmetrics syncs by the same rule: 3 steps × dp 2 × 11 from the last stage
    assert result["logged"]["count"] == 3 * 2 * 11.0
    # all_gather: the dp ranks of the last stage (global ranks 2 and 3 in mesh pp × dp_shard)
    assert result["gathered"] == [2.0, 3.0]


@pytest.mark.parametrize("case, count, gathered", [("log_dp_shard4", 3 * 4, [0.0, 1.0, 2.0, 3.0]), ("log_dp_shard2_tp2", 3 * 2, [0.0, 2.0])])
def test_metrics_and_all_gather_count_each_data_shard_once(results, case, count, gathered):
    result = _ok(results[case])
    assert result["logged"]["count"] == count
    assert result["gathered"] == gathered


@pytest.mark.parametrize("case", ["after_fit_dp_shard2_tp2", "after_fit_dp_shard2_pp2"])
def test_validate_test_and_a_new_trainer_after_fit(results, case):
    result = _ok(results[case])
    assert result["fit_steps"] == 3 and result["resumed_steps"] == 5
    assert len(result["val_losses"]) >= 2 and len(result["test_losses"]) == 2
    assert all(0 < loss < 10 for loss in result["val_losses"] + result["test_losses"])
    # validation and test see the same 2 batches with the same weights
    assert result["test_losses"] == pytest.approx(result["val_losses"][-2:], rel=1e-6)


def test_predict_after_fit(results):
    assert _ok(results["after_fit_dp_shard2_tp2"])["predict"] == [torch.Size([4, 8])]
    error = _ok(results["after_fit_dp_shard2_pp2"])["predict_error"]
    assert "predict is not supported with pipeline parallel (pp=2)" in error


def test_checkpoint_io_keeps_the_startup_timeout(results):
    result = _ok(results["slow_save_dp_shard4"])
    assert result["complete"] and result["saved_after_s"] >= 3.0


def test_validation_keeps_the_startup_timeout(results):
    result = _ok(results["slow_validation_dp_shard2_tp2"])
    assert result["steps"] == 3 and result["val_ones"] == 2.0


@pytest.mark.parametrize(
    "case, expected",
    [
        ("bad_tp_shape", "model.blocks.0.up (ColwiseParallel on Linear weight (30, 16)): dim 0 of size 30 is not divisible by parallel.tp=4"),
        ("bad_pp_blocks", "pp 4 × stages_per_rank 1 = 4 stages, more than the 3 blocks in model.blocks"),
    ],
)
def test_layout_checks_run_from_the_module(results, case, expected):
    result = _ok(results[case])
    assert result["type"] == "ConfigError" and expected in result["error"], result["error"]


def test_tied_weight_copies_stay_equal_across_pipeline_stages(results):
    # the first stage's embedding and the last stage's head are one weight: each copy gets the sum
    # of both gradients, so after 3 AdamW steps they are still bit-for-bit the same tensor
    result = _ok(results["tied_dp_shard2_pp2"])
    assert torch.equal(result["embed"], result["head"])
    assert result["embed"].std() > 0.1  # drawn (std 0.2), not left empty


def test_manual_optimization_is_refused_under_pipeline_parallel(tmp_path):
    class Manual(ToyLit):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=ModelParallel4DStrategy(pp=2), max_steps=1, logger=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="manual optimization .* pipeline parallel"):
        trainer.fit(Manual(), loader())
