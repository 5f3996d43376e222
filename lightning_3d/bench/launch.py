"""Run a benchmark's worker on several CPU processes (gloo) and collect its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_workers(module: str, processes: int, *args: str) -> Any:
    """``torchrun -m module --worker OUT *args`` on ``processes`` ranks; returns OUT's JSON (rank 0 writes it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                   "-m", module, "--worker", str(out), *args]
        result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if result.returncode != 0:
            # the tail is torchrun's summary; a crashed rank's own output is further up
            log = Path(tempfile.gettempdir()) / f"{module}.failed.log"
            log.write_text(result.stderr)
            raise RuntimeError(f"{module} worker failed on {processes} processes (all output: {log}):\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())
