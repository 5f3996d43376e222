"""The Hydra CLI end to end: Lightning's own launcher, outputs, and fast config errors."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "lightning_3d.train"]


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_two_processes_with_lightning_launcher(tmp_path):
    # trainer.devices=2 on CPU: Lightning's launcher starts the second process itself
    run_dir = tmp_path / "run"
    result = _run(["recipe=debug", "trainer.devices=2", "parallel.tp=2", "trainer.max_steps=4", f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    with open(run_dir / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["train_loss"]]
    assert [int(row["step"]) for row in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    output = result.stdout + result.stderr
    assert "== run summary ==" in output and "tokens/s" in output and str(run_dir) in output
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_cli_bad_layout_fails_fast_with_the_numbers(tmp_path):
    start = time.perf_counter()
    result = _run(["recipe=debug", "trainer.devices=4", "parallel.tp=3", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert "tp=3" in result.stderr and "world size 4" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "valid tp values" in last_line or "tp=3" in last_line
    assert elapsed < 60, f"took {elapsed:.1f} s"


def test_cli_bad_checkpoint_options_exit_2_without_traceback(tmp_path):
    for args, message in [
        ([f"resume={tmp_path / 'missing'}"], "no such checkpoint folder"),
        (["checkpoint.every_n_steps=2", "checkpoint.keep_last=0"], "checkpoint.keep_last=0 must be >= 1"),
        ([f"model.init_from={tmp_path / 'missing.safetensors'}"], "no such file or folder"),
    ]:
        result = _run(["recipe=debug", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr


def test_cli_unknown_key_names_it(tmp_path):
    result = _run(["recipe=debug", "parallel.tpp=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert result.returncode != 0
    assert "tpp" in result.stderr


def test_console_script_composes(tmp_path):
    result = subprocess.run(["lightning-3d-train", "--cfg", "job", "recipe=debug"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "n_layers: 4" in result.stdout and "seq_len: 32" in result.stdout
