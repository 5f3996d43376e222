"""The benchmark suite's entry point: importable without side effects, and its command line answers."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_3d.config import Config


@pytest.mark.parametrize("name", ["suite", "overhead", "vs_lightning", "layouts", "measure", "turns", "levers", "picotron", "sigterm"])
def test_bench_modules_import_without_running(name: str) -> None:
    module = importlib.import_module(f"lightning_3d.bench.{name}")
    assert module.__doc__


def test_bench_help_names_the_quick_mode(capsys: pytest.CaptureFixture[str]) -> None:
    # what `python -m lightning_3d.bench --help` runs, in this process (a launch costs seconds of imports)
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module("lightning_3d.bench.__main__").main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m lightning_3d.bench") and "--quick" in out and "RATIO" in out


# ----------------------------------------------------------------------------- side by side with picotron


def _tiny_config(tmp_path: Path) -> Config:
    from lightning_3d.bench.measure import bench_overrides, compose_config

    return compose_config(tmp_path / "run", bench_overrides(29), devices=8)


def test_picotron_config_matches_the_tiny_recipes_layout_and_batch(tmp_path: Path) -> None:
    from lightning_3d.bench.picotron import picotron_config, tokens_per_step

    config = _tiny_config(tmp_path)
    written = picotron_config(config, tmp_path / "model", tmp_path / "data", tmp_path / "ckpt", total_steps=28)
    distributed, training = written["distributed"], written["training"]
    assert (distributed["dp_size"], distributed["tp_size"], distributed["pp_size"], distributed["cp_size"]) == (2, 2, 2, 1)
    assert distributed["pp_engine"] == "1f1b" and distributed["use_cpu"] is True
    # 8 sequences per data-parallel rank, run as 2 pipeline microbatches of 4, as ours
    assert (training["micro_batch_size"], training["gradient_accumulation_steps"]) == (4, 2)
    assert tokens_per_step(written) == config.data.global_batch_size * config.data.seq_len == 16 * 128
    assert training["total_train_steps"] == 28 and written["checkpoint"]["save_frequency"] > 28
    assert written["model"]["name"] == str(tmp_path / "model") and written["dataset"]["name"] == str(tmp_path / "data")
    assert written["environment"]["FLASH_ATTEN"] == "0" and written["environment"]["OMP_NUM_THREADS"] == "1"


def test_picotron_batch_refuses_a_batch_it_cannot_split() -> None:
    from lightning_3d.bench.picotron import picotron_batch
    from lightning_3d.errors import ConfigError

    assert picotron_batch(16, dp=2, microbatches=2) == (4, 2)
    with pytest.raises(ConfigError, match="global_batch_size=10 is not divisible by dp 2 × 2 pipeline microbatches = 4"):
        picotron_batch(10, dp=2, microbatches=2)


def test_picotron_log_lines_give_each_steps_time_and_loss() -> None:
    from lightning_3d.bench.picotron import parse_log

    def line(step: int, loss: float, tokens_per_s: str, step_ms: str) -> str:
        return (f"[rank 2] Step: {step:<5d} | Loss: {loss:6.4f} | Global batch size:   2.05K | Tokens/s: {tokens_per_s:>7s} | "
                f"Tokens/s/GPU:  265.20 | Tokens:   2.05K | MFU:  0.00% | {step_ms}Memory usage:   0.00GB")

    sample = "\n".join([
        "init dataloader time: 1.20s",
        "Number of parameters: 919.17K",
        line(1, 6.4001, "2.12K", "Step time: 965.293ms | "),
        "UserWarning: 'pin_memory' argument is set as true but no accelerator is found",
        line(2, 6.3841, "4.25K", "Step time: 482.440ms | "),
        line(3, 6.3997, "2.05K", ""),  # an unpatched log line: the time comes from Tokens/s
    ])
    rows = parse_log(sample, step_tokens=2048)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert [row["loss"] for row in rows] == [6.4001, 6.3841, 6.3997]
    assert rows[0]["step_s"] == pytest.approx(0.965293) and rows[1]["step_s"] == pytest.approx(0.48244)
    assert rows[2]["step_s"] == pytest.approx(2048 / 2050)


def test_picotron_model_folder_loads_with_transformers_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from lightning_3d.bench.picotron import write_model_folder, write_text_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = _tiny_config(tmp_path).model
    write_model_folder(model, tmp_path / "model")
    hf = AutoConfig.from_pretrained(tmp_path / "model")
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads) == (4, 128, 8, 4)
    assert (hf.vocab_size, hf.intermediate_size, hf.rope_parameters["rope_theta"]) == (512, 384, 10000.0)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer("t5 t511 t0")["input_ids"] == [5, 511, 0]
    with safe_open(tmp_path / "model" / "hf_model_safetensors" / "model.safetensors", framework="pt") as weights:
        assert weights.get_slice("model.layers.3.self_attn.k_proj.weight").get_shape() == [64, 128]
        assert weights.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [128, 384]
        assert len(list(weights.keys())) == 2 + 4 * 9
    write_text_dataset(tmp_path / "data", vocab_size=512, seq_len=128, sequences=3, seed=0)
    lines = (tmp_path / "data" / "train.txt").read_text().splitlines()
    assert len(lines) == 3 and all(len(tokenizer(text)["input_ids"]) == 128 for text in lines)


def test_picotron_patch_refuses_a_folder_that_is_not_the_checkout_it_was_made_for(tmp_path: Path) -> None:
    from lightning_3d.bench.picotron import apply_patch
    from lightning_3d.errors import ConfigError

    with pytest.raises(ConfigError, match="not a picotron checkout"):
        apply_patch(tmp_path)
    (tmp_path / "picotron").mkdir()
    (tmp_path / "train.py").write_text("print('another trainer')\n")
    with pytest.raises(ConfigError, match="does not apply .* made against picotron commit 59714b1"):
        apply_patch(tmp_path)


def test_picotron_ratio_is_our_tokens_per_second_over_picotrons() -> None:
    from lightning_3d.bench.picotron import summarize

    result = summarize({"picotron": [[0.5, 0.5], [0.5]], "ours_like_for_like": [[0.4], [0.4, 0.4]], "ours_tiny_recipe": [[1.0, 1.0]]})
    assert result["ratios"] == {"vs_picotron_like_for_like": pytest.approx(1.25), "vs_picotron_tiny_recipe": pytest.approx(0.5)}
    assert result["round_step_s"]["picotron"] == [0.5, 0.5]


# ----------------------------------------------------------------------------- the one-GPU benchmark

LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")
GPU_BENCH_LINES = ("RATIO", "TOKENS_PER_S", "MFU", "STEP_S", "PEAK_MEMORY_GIB", "STARTUP_S", "LOSSES")


def _figures(stdout: str) -> dict[tuple[str, str], list[float]]:
    """The benchmark's ``NAME side value...`` lines, by (NAME, side)."""
    figures = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in GPU_BENCH_LINES:
            figures[(parts[0], parts[1])] = [float(value) for value in parts[2:]]
    return figures


def test_gpu_benchmark_smoke_runs_both_sides_on_cpu() -> None:
    """The GPU benchmark's whole code path on CPU: both sides train the same model on the same
    batches (the same losses, falling) and every figure it prints is a finite positive number."""
    import math
    import os

    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "lightning_3d.bench.gpu", "--smoke"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = _figures(run.stdout)
    (ratio,) = figures[("RATIO", "gpu_vs_lightning_model_parallel")]
    assert math.isfinite(ratio) and ratio > 0
    for name in ("TOKENS_PER_S", "MFU", "STEP_S", "PEAK_MEMORY_GIB"):
        for side in ("ours", "lightning"):
            (value,) = figures[(name, side)]
            assert math.isfinite(value) and value > 0, (name, side, value)
    (monitor_mfu,) = figures[("MFU", "ours_monitor")]  # our PerformanceMonitor's own MFU, with the same peak
    assert math.isfinite(monitor_mfu) and monitor_mfu > 0
    ours, theirs = figures[("LOSSES", "ours")], figures[("LOSSES", "lightning")]
    assert len(ours) == len(theirs) == 2 + 3 + 1  # warm-up, timed, and the step that closes the window
    assert all(math.isfinite(loss) for loss in ours + theirs)
    assert ours[-1] < ours[0] - 0.1  # it learned
    # same initial weights and batches, bf16 autocast on both sides: equal up to rounding
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 2e-3, (ours, theirs)


def test_gpu_benchmark_checks_its_input_before_training() -> None:
    from lightning_3d.bench.gpu import resolve_peak, run
    from lightning_3d.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--warmup=0 and --steps=3 must both be >= 1"):
        run(smoke=True, warmup=0, steps=3, overrides=[])
    with pytest.raises(ConfigError, match=r"no peak FLOP/s known for 'NVIDIA B300' at precision bf16-mixed"):
        resolve_peak("NVIDIA B300", "bf16-mixed", None)
    assert resolve_peak("NVIDIA H100 80GB HBM3", "bf16-mixed", None) == 989e12
    assert resolve_peak("NVIDIA H100 80GB HBM3", "bf16-mixed", 5e14) == 5e14


def test_gpu_benchmark_config_is_the_1b_recipe_and_passes_preflight_on_a_gpu(tmp_path) -> None:
    """The GPU run's config, composed and checked here against an H200 (the run itself needs one)."""
    from lightning_3d.bench.gpu import GPU_OVERRIDES
    from lightning_3d.bench.measure import compose_config
    from lightning_3d.train import preflight
    from lightning_3d.validation import Hardware

    config = compose_config(tmp_path, [*GPU_OVERRIDES, "trainer.max_steps=36"], devices=1)
    assert (config.model.n_layers, config.model.dim, config.model.vocab_size) == (16, 2048, 128256)
    assert (config.trainer.accelerator, config.trainer.precision) == ("gpu", "bf16-mixed")
    assert (config.perf.compile, config.perf.compile_backend, config.perf.activation_checkpoint) == (True, "inductor", "selective")
    assert (config.data.source, config.data.seq_len, config.data.global_batch_size) == ("stdlib", 2048, 8)
    dims = preflight(config, Hardware(1, True, "NVIDIA H200", (9, 0)))
    assert dims.world_size == 1


def test_build_runs_the_same_job_under_another_lightning_strategy(tmp_path: Path) -> None:
    # the overhead benchmark's --lightning-strategy: Lightning's own strategy, everything else as ours
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from lightning_3d.bench.measure import bench_overrides, compose_config
    from lightning_3d.strategy import ModelParallel4DStrategy
    from lightning_3d.train import build

    config = compose_config(tmp_path / "run", bench_overrides(2) + ["parallel.tp=1", "parallel.pp=1"], devices=1)
    ours, _, _ = build(config)
    theirs, model, _ = build(config, strategy="auto")
    assert isinstance(ours.strategy, ModelParallel4DStrategy)
    assert isinstance(theirs.strategy, SingleDeviceStrategy)
    assert [type(c).__name__ for c in theirs.callbacks] == [type(c).__name__ for c in ours.callbacks]
    assert theirs.gradient_clip_val == ours.gradient_clip_val and type(model).__name__ == "CausalLM"
