"""The Hydra CLI end to end: Lightning's own launcher, outputs, and fast config errors."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

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


def _processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return found


def test_cli_bad_config_fails_before_any_worker_with_every_problem(tmp_path):
    run_dir = tmp_path / "run"
    # the timeout only guards against a hang; a bad config exits before any process starts
    result = _run(
        ["recipe=debug", "trainer.devices=4", "parallel.tp=3", "training.on_nonfinite=ignore", f"hydra.run.dir={run_dir}"],
        tmp_path,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "tp=3" in result.stderr and "world size 4" in result.stderr, result.stderr[-2000:]
    assert "valid tp values: [1, 2, 4]" in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert "training.on_nonfinite='ignore'" in last_line  # every problem, the last one last on screen
    assert _processes_mentioning(str(run_dir)) == []  # no worker left behind


def test_cli_bad_checkpoint_options_exit_2_without_traceback(tmp_path):
    # one launch (each costs seconds of imports): every problem is listed, one per line, at the end
    bad = {
        f"resume={tmp_path / 'missing'}": f"resume={tmp_path / 'missing'}: no such checkpoint folder",
        "checkpoint.keep_last=0": "checkpoint.keep_last=0 must be >= 1",
        f"model.init_from={tmp_path / 'missing.safetensors'}": f"model.init_from={tmp_path / 'missing.safetensors'}: no such file or folder",
    }
    result = _run(["recipe=debug", "checkpoint.every_n_steps=2", *bad, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last_lines = result.stderr.strip().splitlines()[-len(bad) :]
    for message in bad.values():
        assert sum(message in line for line in last_lines) == 1, (message, last_lines)


def test_cli_unknown_key_names_it_and_the_valid_ones(tmp_path):
    result = _run(["recipe=debug", "parallel.tpp=2", "trainig.max_skipped=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown config key 'parallel.tpp' (did you mean parallel.tp?); valid keys at parallel: dp_replicate," in result.stderr
    assert "unknown config key 'trainig.max_skipped' (did you mean training?)" in result.stderr
    assert "recipe" in result.stderr.strip().splitlines()[-1]  # the top level lists the groups too


def test_cli_data_fault_in_the_workers_is_one_line_naming_the_file(tmp_path):
    # ids up to 999 with vocab_size 512: only found when the workers read the tokens
    corpus = tmp_path / "corpus.bin"
    np.arange(40_000, dtype=np.uint16).__mod__(1000).astype(np.uint16).tofile(corpus)
    result = _run(
        ["recipe=debug", "trainer.devices=2", "data.source=files", f"data.paths=[{corpus}]", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    # the startup sample finds the first id past the vocabulary
    assert lines[-1] == f"error (rank 0): {corpus} holds token id 512 at token offset 512 (byte 1024), not below vocab_size=512"
    assert sum("holds token id 512" in line for line in lines) == 1  # said once, not by every rank


def test_console_script_composes(tmp_path):
    result = subprocess.run(["lightning-3d-train", "--cfg", "job", "recipe=debug"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "n_layers: 4" in result.stdout and "seq_len: 32" in result.stdout


def test_wheel_carries_every_module_and_config_file(tmp_path):
    # built from a copy, so the checkout gets no build/ folder
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "lightning_3d", source / "lightning_3d", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(root / "conf", source / "conf")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    names = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist())
    configs = {f"lightning_3d/_conf/{path.relative_to(root / 'conf').as_posix()}" for path in (root / "conf").rglob("*.yaml")}
    assert "lightning_3d/_conf/recipe/debug.yaml" in configs
    assert configs <= names, sorted(configs - names)
    # every module of the package, in every subpackage (pyproject lists the packages by hand)
    modules = {path.relative_to(root).as_posix() for path in (root / "lightning_3d").rglob("*.py")}
    assert "lightning_3d/runtime/step_guard.py" in modules
    assert modules <= names, sorted(modules - names)
