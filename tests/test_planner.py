"""The layout planner: its predictions against real gloo runs, its agreement with the project's
own checks and counts, its API and CLI, and every kind of bad input it refuses (exit code 2)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_parity import _torchrun

import lightning_3d
from lightning_3d.bench.planner_proof import ACTIVATION_TOLERANCE, STATE_TOLERANCE, base_overrides, request_for
from lightning_3d.comm import expected_step_volume, on_labels
from lightning_3d.config import Config, DataConfig, ModelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.flops import flops_per_token
from lightning_3d.planner import ClusterConfig, Layout, ModelShape, plan
from lightning_3d.planner.api import make_request, model_shape, rank_layouts
from lightning_3d.planner.communication import step_volume
from lightning_3d.planner.memory import Precision, model_states, rank_memory
from lightning_3d.validation import check_layout

WORKER = Path(__file__).with_name("planner_worker.py")
DEBUG = ModelConfig(n_layers=4, dim=64, n_heads=4, n_kv_heads=4, vocab_size=512, ffn_dim=128, max_seq_len=128)
FP32 = Precision.of("32-true")
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")

# the debug recipe on 4 processes: tensor, pipeline, context parallel and a zero-bubble schedule
MEASURED = {
    "dp_shard2_tp2": Layout(1, 2, 1, 2, 1),
    "tp2_pp2_1f1b": Layout(1, 1, 1, 2, 2, microbatches=2, reshard_after_forward=False),
    "ddp2_cp2_ac_full": Layout(2, 1, 2, 1, 1, activation_checkpoint="full"),
    "dp_shard2_pp2_zbv": Layout(1, 2, 1, 1, 2, pp_schedule="zbv", stages_per_rank=2, microbatches=4, reshard_after_forward=False),
}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[str, dict]:
    out_dir = tmp_path_factory.mktemp("planner")
    cases = {name: base_overrides("recipe=debug", 2) + layout.overrides() for name, layout in MEASURED.items()}
    _torchrun(4, cases, out_dir, worker=WORKER)
    return {name: torch.load(out_dir / f"{name}.pt", weights_only=True) for name in cases}


@pytest.mark.parametrize("name", list(MEASURED))
def test_predicted_memory_and_traffic_match_a_real_run(name, measured):
    request = request_for("debug", steps=2)
    layout = MEASURED[name]
    result = measured[name]
    assert "failed" not in result, result.get("traceback", result)
    for rank, probe in enumerate(result["ranks"]):
        pp_rank, fsdp_index = probe["pp_rank"], probe["fsdp_index"]
        params, grads, optimizer = model_states(request.shape, layout, request.precision, pp_rank, fsdp_index)
        states = probe["states"]
        assert params == pytest.approx(states["params"], rel=STATE_TOLERANCE), f"rank {rank}"
        assert grads == pytest.approx(states["grads"], rel=STATE_TOLERANCE), f"rank {rank}"
        assert optimizer == pytest.approx(states["optimizer"], rel=STATE_TOLERANCE), f"rank {rank}"
        memory = rank_memory(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, pp_rank, fsdp_index)
        assert memory.saved_for_backward == pytest.approx(probe["saved_peak"], rel=ACTIVATION_TOLERANCE), f"rank {rank}"
        volumes = step_volume(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, pp_rank)
        predicted = {f"{dim}/{kind}": volume.as_dict() for (dim, kind), volume in on_labels(volumes, probe["labels"]).items()}
        assert predicted == probe["comm"], f"rank {rank}"


def test_the_measured_runs_differ_where_the_model_says_they_do(measured):
    """The probe is not blind: checkpointing every block leaves a fraction of the activations."""
    saved = {name: max(probe["saved_peak"] for probe in result["ranks"]) for name, result in measured.items()}
    assert saved["ddp2_cp2_ac_full"] < 0.25 * saved["dp_shard2_tp2"]


# ----------------------------------------------------------------------------- agreement with the project's own counts


@pytest.mark.parametrize(
    "layout",
    [Layout(1, 2, 1, 1, 1), Layout(1, 2, 1, 1, 1, reshard_after_forward=False), Layout(2, 1, 1, 1, 1), Layout(2, 2, 1, 1, 1),
     Layout(1, 1, 1, 2, 1), Layout(1, 1, 1, 2, 1, sequence_parallel=False), Layout(1, 1, 2, 1, 1), Layout(1, 2, 2, 1, 1),
     Layout(1, 1, 1, 1, 2, microbatches=4, reshard_after_forward=False),
     Layout(1, 1, 1, 1, 2, pp_schedule="interleaved_1f1b", stages_per_rank=2, microbatches=4, reshard_after_forward=False)],
    ids=lambda layout: f"{layout.degrees} {layout.pipeline}",
)
def test_traffic_equals_lightning_3d_comm_where_it_has_a_formula(layout):
    config = Config(model=DEBUG, data=DataConfig(seq_len=32, global_batch_size=8), parallel=layout.parallel_config())
    for pp_rank in range(layout.pp):
        expected = expected_step_volume(config, layout.dims(), pp_rank=pp_rank)
        assert step_volume(ModelShape.of_config(DEBUG), layout, FP32, 32, 8, pp_rank) == expected


@pytest.mark.parametrize("name", ["debug", "tiny", "llama3_8b", "llama3_70b", "llama3_1b"])
def test_flops_per_token_are_lightning_3d_flops(name):
    shape = model_shape(name)
    assert shape.flops_per_token(4096) == flops_per_token(shape.model_config(), 4096)


def test_every_layout_offered_passes_the_strategys_checks():
    request = request_for("tiny")
    ranking = rank_layouts(request)
    assert len({plan.layout.degrees for plan in ranking.plans}) == 33  # of the 35 ways to split 8 ranks (tp 8, pp 8 refused)
    config = ModelConfig(n_layers=4, dim=128, n_heads=8, n_kv_heads=4, vocab_size=512, ffn_dim=384, max_seq_len=256)
    for plan_ in ranking.plans:
        layout = plan_.layout
        dims = check_layout(layout.parallel_config(), 8, config, DataConfig(seq_len=128, global_batch_size=16))
        assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp) == (layout.pp, layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp)
    assert set(ranking.refused) == {"tp=8", "pp=8"}


def test_model_states_by_hand_for_fsdp_over_eight_ranks():
    # the debug model: 919,808 bytes of fp32 parameters, 39 tensors; 8 FSDP shards of every dim 0
    params, grads, optimizer = model_states(ModelShape.of_config(DEBUG), Layout(1, 8, 1, 1, 1), FP32)
    assert params == grads == 919_808 // 8
    assert optimizer == 2 * params + 39 * 4


# ----------------------------------------------------------------------------- the API


H100_NODE = ClusterConfig(gpus=8, gpus_per_node=8, gpu="H100")


def test_plan_returns_the_best_layouts_ranked_by_predicted_step_time():
    plans = lightning_3d.plan(model="llama3_8b", cluster=H100_NODE, seq_len=8192, global_batch_size=32, top=5)
    assert len(plans) == 5
    assert [p.rank for p in plans] == [1, 2, 3, 4, 5]
    assert all(p.fits for p in plans)
    assert [p.step_s for p in plans] == sorted(p.step_s for p in plans)
    best = plans[0]
    assert best.memory.total <= best.capacity_bytes
    assert 0 < best.mfu < 1 and best.tokens_per_s == pytest.approx(32 * 8192 / best.step_s)
    assert {t.view for t in best.traffic} >= {"world"}
    # its overrides make a layout the strategy accepts for that model and batch
    overrides = dict(o.split("=", 1) for o in best.overrides())
    assert int(overrides["parallel.tp"]) * int(overrides["parallel.pp"]) * int(overrides["parallel.cp"]) * int(
        overrides["parallel.dp_shard"]) * int(overrides["parallel.dp_replicate"]) == 8
    check_layout(best.layout.parallel_config(), 8, model_shape("llama3_8b").model_config(), DataConfig(seq_len=8192, global_batch_size=32))


def test_layouts_that_do_not_fit_come_last_and_say_by_how_much():
    request = make_request("llama3_8b", H100_NODE, 8192, 32)
    plans = rank_layouts(request).plans
    fits = [p.fits for p in plans]
    assert True in fits and False in fits
    assert fits == sorted(fits, reverse=True)  # every fitting layout before any other
    unfit = [p for p in plans if not p.fits]
    assert all(p.over_bytes == p.memory.total - p.capacity_bytes > 0 for p in unfit)
    assert [p.over_bytes for p in unfit] == sorted(p.over_bytes for p in unfit)


def test_activation_checkpointing_trades_memory_for_time():
    request = make_request("llama3_8b", H100_NODE, 8192, 32)
    by_mode = {p.layout.activation_checkpoint: p for p in rank_layouts(request).plans if p.layout.degrees == "dp_shard=8" and p.layout.reshard_after_forward}
    assert by_mode["full"].memory.activations < by_mode["selective"].memory.activations < by_mode["none"].memory.activations
    assert by_mode["full"].compute_s > by_mode["selective"].compute_s > by_mode["none"].compute_s


def test_a_hugging_face_config_json_is_planned_from_its_shapes(tmp_path):
    # a non-Llama decoder: only config.json is read (no weights), with its own head_dim
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
        "tie_word_embeddings": True, "max_position_embeddings": 40960,
    }))
    plans = plan(model=tmp_path, cluster=H100_NODE, seq_len=4096, global_batch_size=16, top=3)
    shape = ModelShape.of_hf_folder(tmp_path)
    assert (shape.head_dim, shape.kv_heads, shape.tie_embeddings, shape.source) == (128, 8, True, "hf")
    assert all(not p.layout.sequence_parallel and not p.layout.loss_parallel for p in plans)
    assert shape.num_parameters == pytest.approx(0.596e9, rel=0.01)  # Qwen3-0.6B's 0.6B


def test_nothing_fits_says_what_would():
    with pytest.raises(ConfigError, match=r"cluster\.gpus=\d+ \(more devices\)"):
        plan(model="llama3_70b", cluster=H100_NODE, seq_len=8192, global_batch_size=64)


def test_importing_the_cli_module_keeps_lightning_3d_plan_callable():
    import lightning_3d.plan  # noqa: F401  binds the package attribute to the module

    plans = lightning_3d.plan(model="debug", cluster=ClusterConfig(gpus=4, gpus_per_node=4, gpu="CPU"), seq_len=32, global_batch_size=8, top=2)
    assert len(plans) == 2


def test_cli_prints_the_ranked_table_and_the_command(capsys):
    from lightning_3d.plan import main

    main(["recipe=debug", "cluster.gpus=4", "cluster.gpus_per_node=4", "cluster.gpu=CPU", "--top", "3"])
    out = capsys.readouterr().out
    assert "layouts the strategy accepts" in out
    for part in ("parameters", "gradients", "optimizer states", "activations", "pipeline buffers", "communication buffers", "logits"):
        assert part in out
    runs = [line for line in out.splitlines() if line.strip().startswith("run: python -m lightning_3d.train")]
    assert len(runs) == 3
    assert "recipe=debug trainer.accelerator=cpu trainer.devices=4 trainer.num_nodes=1 parallel.dp_replicate=" in runs[0]


def test_measure_runs_the_shown_layouts_and_ranks_them_by_measured_time():
    request = make_request("debug", ClusterConfig(gpus=2, gpus_per_node=2, gpu="CPU"), 32, 8)
    ranking = rank_layouts(request)
    from lightning_3d.planner.measure import measure

    measured = measure(ranking, ranking.plans[:2], ["recipe=debug"], steps=4, warmup=1)
    assert {p.layout for p in measured} == {p.layout for p in ranking.plans[:2]}
    times = [p.measured_step_s for p in measured]
    assert all(t is not None and t > 0 for t in times), times
    assert times == sorted(times) and [p.rank for p in measured] == [1, 2]


# ----------------------------------------------------------------------------- bad input, through the CLI


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS}
    return subprocess.run([sys.executable, "-m", "lightning_3d.plan", *args], capture_output=True, text=True, env=env, timeout=600)


BAD_INPUT = {
    "unknown_gpu": (
        ["recipe=debug", "cluster.gpus=8", "cluster.gpu=V100"],
        ["cluster.gpu='V100' is not a known device", "cluster.gpu_memory_gib"],
    ),
    "gpus_not_divisible_by_gpus_per_node": (
        ["recipe=debug", "cluster.gpus=12", "cluster.gpus_per_node=8", "cluster.gpu=H100"],
        ["cluster.gpus=12 is not divisible by cluster.gpus_per_node=8", "[8, 16]"],
    ),
    # 4 tokens: cp ≤ 2 and tp ≤ 2, so 16 devices need dp × microbatches ≥ 4
    "batch_no_layout_divides": (
        ["recipe=debug", "data.seq_len=4", "cluster.gpus=16", "cluster.gpus_per_node=8", "cluster.gpu=H100", "data.global_batch_size=3"],
        ["data.global_batch_size=3 divides no layout of 16 devices", "nearest valid batches: [4, 8]"],
    ),
    "fits_in_no_layout": (
        ["recipe=llama3_70b_64gpu", "cluster.gpus=8", "cluster.gpus_per_node=8", "cluster.gpu=H100"],
        ["no layout of", "fits 8 × H100", "GiB over", "what would fit: cluster.gpus="],
    ),
}


def _error_message(stderr: str) -> str:
    last = stderr.strip().splitlines()
    return "\n".join(last[next(i for i, line in enumerate(last) if line.startswith("error: ")) :])


def test_bad_input_through_the_command_exits_2_with_one_message():
    args, phrases = BAD_INPUT["unknown_gpu"]
    result = _plan_cli(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    message = _error_message(result.stderr)
    for phrase in phrases:
        assert phrase in message, message


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_error_and_exit_code_2(case, capsys):
    # the command's main() in this process (a launch costs seconds of imports); any exception
    # but the exit with code 2 fails the test, as a traceback would
    args, phrases = BAD_INPUT[case]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module("lightning_3d.plan").main(list(args))
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2, stderr[-3000:]
    message = _error_message(stderr)
    for phrase in phrases:
        assert phrase in message, message
