"""Start the ranks of one test group as forks of a process that has imported the stack once.

usage: python tests/fork_launch.py NPROC WORKER [worker args...]

Under torchrun every rank imports torch, Lightning (with torchmetrics, and transformers where
it is installed) and lightning_3d on its own: about 5 s of CPU each, so an 8-rank group spends
~28 s of a 2-core machine before its first case. Here the launcher imports once and forks
NPROC ranks. Each sets the environment torchrun gives its workers (so Lightning sees a
torchelastic launch, as under torchrun) and runs WORKER as ``__main__``. Everything from
``init_process_group`` on is the real thing: separate processes, gloo, rank 0 hosting the
TCPStore at MASTER_PORT, as with any launcher that has no agent store.

As torchrun does, the launcher stops the other ranks when one fails and exits with the first
failure's code. The tests that check launching itself (multi-node, restarts, a lost rank, the
CLI) still use torchrun or Lightning's launcher.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

GRACE_SECONDS = 10  # after a rank fails, how long the others get to exit on SIGTERM before SIGKILL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What torchrun --standalone sets for a worker, minus its agent store."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
        "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world_size), "ROLE_NAME": "default",
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_RUN_ID": f"fork-launch-{os.getpid()}", "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False",
    }


def run_rank(rank: int, world_size: int, port: int, worker: Path, args: list[str]) -> None:
    """The forked child: become rank ``rank`` and run the worker script; never returns."""
    code = 1
    try:
        os.environ.update(rank_environment(rank, world_size, port))
        sys.argv = [str(worker), *args]
        sys.path[0] = str(worker.parent)  # as `python WORKER` would have it
        runpy.run_path(str(worker), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)  # what the interpreter prints for sys.exit("message")
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # noqa: BLE001 - a rank's failure is reported, never swallowed
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what a normal interpreter exit runs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never back into the parent's loop


def wait_for(children: dict[int, int]) -> int:
    """Wait for every rank; after the first failure, stop the rest. Returns the exit code."""
    failure, deadline = 0, None
    while children:
        if deadline is not None and time.monotonic() > deadline:
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.05)
            continue
        rank = children.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failure == 0:
            failure = code if code > 0 else 128 - code  # killed by a signal: the shell's convention
            print(f"fork_launch: rank {rank} exited with {code}; stopping the other ranks", file=sys.stderr, flush=True)
            for other in children:
                os.kill(other, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_SECONDS
    return failure


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    world_size, worker, args = int(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3:]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts any thread: forks copy one thread only
    import lightning  # noqa: F401 - imported once here, shared by every rank
    import torch.distributed  # noqa: F401

    import lightning_3d.train  # noqa: F401

    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()  # nothing buffered may be written twice by the children
    children = {}
    for rank in range(world_size):
        pid = os.fork()
        if pid == 0:
            run_rank(rank, world_size, port, worker, args)
        children[pid] = rank
    sys.exit(wait_for(children))


if __name__ == "__main__":
    main()
