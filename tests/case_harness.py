"""The main loop of a torchrun test worker: run each case on every rank, record what happened.

``python worker.py OUT_DIR CASES_JSON``: every rank runs each case; rank 0 saves its result
(or the error that stopped it) as ``OUT_DIR/<case>.pt``; all ranks meet after each case.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def run_cases(run_case: Callable[[str, dict[str, Any], Path], dict[str, Any]]) -> None:
    out_dir = Path(sys.argv[1])
    cases = json.loads(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    barrier_group = None
    for name, case in cases.items():
        try:
            result = run_case(name, case, out_dir / name)
        except Exception as error:  # recorded, so the test shows what failed
            result = {"failed": f"{type(error).__name__}: {error}", "type": type(error).__name__, "traceback": traceback.format_exc()}
            print(f"rank {rank} case {name} failed:\n{result['traceback']}", file=sys.stderr, flush=True)
        if rank == 0:
            torch.save(result, out_dir / f"{name}.pt")
        if dist.is_initialized():
            # a group of the harness's own: the strategy shortens the default group's timeout
            barrier_group = barrier_group or dist.new_group(timeout=timedelta(seconds=300))
            dist.barrier(group=barrier_group)
    if dist.is_initialized():
        dist.destroy_process_group()
