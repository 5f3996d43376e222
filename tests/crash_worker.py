"""The training CLI, with one rank SIGKILLed while it writes a checkpoint (fault injection for tests).

usage: torchrun ... tests/crash_worker.py KILL_RANK KILL_STEP [hydra overrides...]
Rank KILL_RANK dies right after writing its shards of step-KILL_STEP, before DCP's
metadata exists — in the first attempt only: after torchrun restarts the workers
(``--max-restarts``), nobody dies.
"""

from __future__ import annotations

import os
import signal
import sys

from torch.distributed.checkpoint import FileSystemWriter

from lightning_3d.train import cli

KILL_RANK, KILL_STEP = int(sys.argv[1]), int(sys.argv[2])
_write_data = FileSystemWriter.write_data


def write_data_then_die(self, plan, planner):
    future = _write_data(self, plan, planner)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and int(os.environ["RANK"]) == KILL_RANK and str(self.path).endswith(f"step-{KILL_STEP}"):
        future.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return future


FileSystemWriter.write_data = write_data_then_die

if __name__ == "__main__":
    cli(sys.argv[3:])
