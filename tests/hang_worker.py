"""The training CLI, with one rank killed or frozen after a given step (fault injection for tests).

usage: python tests/hang_worker.py RANK STEP kill|freeze STAMP_FILE [hydra overrides...]
After step STEP, rank RANK writes the time to STAMP_FILE, then SIGKILLs itself (``kill``:
a crashed node) or SIGSTOPs itself (``freeze``: a rank that is alive but never answers).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

from lightning_3d.runtime import FaultMonitor
from lightning_3d.train import cli

RANK, STEP, ACTION, STAMP_FILE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
_step_done = FaultMonitor.step_done


def step_done_then_fail(self: FaultMonitor, steps_done: int) -> None:
    _step_done(self, steps_done)
    if dist.get_rank() == RANK and steps_done == STEP:
        STAMP_FILE.write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL if ACTION == "kill" else signal.SIGSTOP)


FaultMonitor.step_done = step_done_then_fail

if __name__ == "__main__":
    cli(sys.argv[5:])
