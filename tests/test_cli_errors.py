"""How the CLI ends a failed run: the project's own errors in one line, any other error with its
traceback, and whatever the loggers still buffer written to disk before the process exits."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_3d import train
from lightning_3d.errors import ConfigError
from lightning_3d.nonfinite import NonFiniteError

# the CLI with the user's training_step raising a plain ValueError at one step
USER_CODE = '''
import sys

from lightning_3d.module import CausalLM
from lightning_3d.train import cli

FAIL_AT = int(sys.argv[1])
_training_step = CausalLM.training_step


def training_step(self, batch, batch_idx):
    if self.trainer.global_step == FAIL_AT:
        raise ValueError(f"user code broke at step {FAIL_AT}")
    return _training_step(self, batch, batch_idx)


CausalLM.training_step = training_step

if __name__ == "__main__":
    cli(sys.argv[2:])
'''


def test_plain_value_error_in_user_code_keeps_its_traceback_and_the_rows_logged_before(tmp_path: Path) -> None:
    script = tmp_path / "user_code.py"
    script.write_text(USER_CODE)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), "3", "recipe=debug", "trainer.devices=1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback (most recent call last)" in result.stderr, result.stderr[-3000:]
    assert "in training_step" in result.stderr  # the frame of the user's code that raised
    assert result.stderr.strip().splitlines()[-1] == "error (rank 0): ValueError: user code broke at step 3"
    with open(run_dir / "metrics.csv") as handle:
        steps = sorted({int(row["step"]) for row in csv.DictReader(handle) if row["train_loss"]})
    assert steps == [0, 1, 2]


def _trainer(tmp_path: Path) -> L.Trainer:
    logger = CSVLogger(tmp_path, name="", version="")  # keeps rows in memory until it saves (every 100 steps)
    return L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False, enable_model_summary=False)


def _exit_code(trainer: L.Trainer, error: BaseException, monkeypatch: pytest.MonkeyPatch) -> int:
    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    with pytest.raises(SystemExit) as ended:
        train.exit_after_failure(trainer, error)
    return ended.value.code


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_exit_after_failure_writes_the_buffered_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    trainer = _trainer(tmp_path)
    for step in range(3):
        trainer.logger.log_metrics({"train_loss": 5.0 - step}, step=step)
    assert _exit_code(trainer, _raised(RuntimeError("mat1 and mat2 shapes cannot be multiplied")), monkeypatch) == 1
    with open(tmp_path / "metrics.csv") as handle:
        assert [int(row["step"]) for row in csv.DictReader(handle)] == [0, 1, 2]
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "error (rank 0): RuntimeError: mat1 and mat2 shapes cannot be multiplied"


@pytest.mark.parametrize(
    "error, short",
    [
        (ValueError("not the project's: keep the traceback"), False),
        (ConfigError("data file x.bin is empty (0 bytes)"), True),
        (NonFiniteError("step 3: non-finite loss on rank 1"), True),
    ],
)
def test_only_the_projects_own_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, error: BaseException, short: bool) -> None:
    assert _exit_code(_trainer(tmp_path), _raised(error), monkeypatch) == 1
    err = capsys.readouterr().err
    assert ("Traceback" not in err) is short, err
    expected = str(error) if short else f"{type(error).__name__}: {error}"
    assert err.strip().splitlines()[-1] == f"error (rank 0): {expected}"


@pytest.mark.parametrize(
    "error, short",
    [
        (ConfigError("trainer.devices=0 must be a positive number of processes per node"), True),
        (ValueError("some library rejected a value"), False),
    ],
)
def test_build_time_errors_exit_2_and_keep_a_traceback_unless_they_are_the_projects(capsys, error: BaseException, short: bool) -> None:
    with pytest.raises(SystemExit) as ended:
        train.exit_after_config_error(_raised(error))
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert ("Traceback" not in err) is short, err
    assert err.strip().splitlines()[-1] == f"error: {error}"

