"""The benchmark suite's entry point: importable without side effects, and its command line answers."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("name", ["suite", "overhead", "vs_lightning", "layouts", "measure", "turns", "levers"])
def test_bench_modules_import_without_running(name: str) -> None:
    module = importlib.import_module(f"lightning_3d.bench.{name}")
    assert module.__doc__


def test_bench_help_names_the_quick_mode() -> None:
    result = subprocess.run([sys.executable, "-m", "lightning_3d.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--quick" in result.stdout and "RATIO" in result.stdout
