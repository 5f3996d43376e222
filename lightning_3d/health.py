"""Naming the rank that broke a job: heartbeats and failure reports in the rendezvous store.

A failed collective only tells a rank that *some* peer went away ("Connection closed by
peer", a timeout). So every rank keeps a heartbeat counter in the TCP store the job
rendezvoused on (a thread bumps it every second, even while the main thread waits in a
collective), and a rank whose training fails writes a one-line report there. Once any
report is there, every rank's heartbeat thread waits a few heartbeats and names:

- ranks whose heartbeat stopped without a report: dead or frozen (killed, OOM, SIGSTOP);
- ranks that reported an error of their own (not a communication failure);
- ranks still alive that have not failed yet (stuck somewhere, or still waiting).

A failing rank prints that diagnosis. The store client is a connection of its own with a
short timeout, so a dead or frozen store host cannot hang the diagnosis; a rank that hosts
the store waits for the others' diagnoses before it exits.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

HEARTBEAT_INTERVAL_S = 1.0
# heartbeats a rank may miss before it counts as dead or frozen
MISSED_BEATS = 3
_STORE_TIMEOUT = timedelta(seconds=10)
# substrings of the errors gloo / NCCL / the store raise when a peer is gone or late
_COMMUNICATION_ERRORS = (
    "connection closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "nccl",
    "socket",
)


def is_communication_failure(error: BaseException) -> bool:
    """Whether ``error`` says a peer went away or is late, rather than this rank failing on its own."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(marker in text for marker in _COMMUNICATION_ERRORS)


def summary(error: BaseException) -> str:
    """``Type: first line`` of an exception, cut to a readable length."""
    lines = str(error).strip().splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first[:300]}"


def _format_ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"


class Heartbeat:
    """This rank's heartbeat in the store, and the diagnosis once any rank of the job fails.

    The diagnosis runs in the heartbeat thread, started by the first failure report anyone
    writes: so a rank whose main thread is still blocked in a collective has its diagnosis
    ready when that collective finally fails, even if the store is gone by then.

    Args:
        rank, world_size: of the default process group.
        host, port: the rendezvous store (``MASTER_ADDR`` / ``MASTER_PORT``).
        namespace: keeps keys of different jobs or restarts apart.
    """

    def __init__(self, rank: int, world_size: int, host: str, port: int, namespace: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.address = f"{host}:{port}"
        # without torchrun's agent, rank 0's process hosts the store: it must outlive the diagnoses
        self.hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        client = dist.TCPStore(host, port, world_size, is_master=False, timeout=_STORE_TIMEOUT, wait_for_workers=False)
        self._store = dist.PrefixStore(f"lightning_3d/health/{namespace}/", client)
        self._beats = 0
        self.step = 0  # completed optimizer steps, set by the strategy
        self._report: Optional[str] = None
        self._report_ready = threading.Event()
        self._silent: list[int] = []
        self._stop = threading.Event()
        # keys left by an earlier run in the same processes
        for key in (f"failed/{rank}", f"done/{rank}", "job_failed"):
            self._store.delete_key(key)
        self._beat()  # the key exists before anyone can look for it
        self._thread = threading.Thread(target=self._run, name="lightning_3d-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls, rank: int, world_size: int) -> Optional["Heartbeat"]:
        """A heartbeat on the job's store, or None on one process or without ``MASTER_ADDR``/``MASTER_PORT``."""
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if world_size < 2 or not host or not port:
            return None
        namespace = f"{port}/restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return cls(rank, world_size, host, int(port), namespace)

    def _beat(self) -> None:
        self._beats += 1
        self._store.set(f"beat/{self.rank}", f"{self._beats} {self.step}")

    def _run(self) -> None:
        before: Optional[dict[int, str]] = None  # heartbeats when the first failure was seen
        ticks = 0
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self._beat()
                if self._report_ready.is_set():
                    continue
                if before is None:
                    if self._store.check(["job_failed"]):
                        before = self._read("beat")
                    continue
                ticks += 1
                if ticks >= MISSED_BEATS:
                    self._report = self._diagnose(before)
                    self._report_ready.set()
                    self._store.set(f"done/{self.rank}", "1")
            except Exception as error:  # the store host is gone
                if not self._report_ready.is_set():
                    self._report = (
                        f"the rendezvous store at {self.address} is unreachable ({summary(error)}); the rank that "
                        "hosts it (rank 0 unless torchrun hosts it) is probably dead or frozen"
                    )
                    self._report_ready.set()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * HEARTBEAT_INTERVAL_S)

    def report_failure(self, error: BaseException) -> None:
        """Tell every rank this one failed; their heartbeat threads start diagnosing."""
        kind = "communication" if is_communication_failure(error) else "error"
        try:
            self._store.set(f"failed/{self.rank}", f"{kind}|{self.step}|{summary(error)}")
            self._store.set("job_failed", str(self.rank))
        except Exception:
            pass  # the store host is gone; the heartbeat thread says so

    def wait_for_diagnosis(self) -> str:
        """The diagnosis (a few heartbeats after the first failure of the job)."""
        self._report_ready.wait((MISSED_BEATS + 3) * HEARTBEAT_INTERVAL_S)
        return self._report or "no diagnosis: the heartbeat thread did not finish one"

    def linger(self) -> None:
        """On the rank that hosts the store: wait (a few seconds at most) until every other rank
        still alive has its diagnosis, since they read the store to make it."""
        if not self.hosts_store:
            return
        deadline = time.monotonic() + 3 * MISSED_BEATS * HEARTBEAT_INTERVAL_S
        waiting = [r for r in range(self.world_size) if r != self.rank and r not in self._silent]
        while waiting and time.monotonic() < deadline:
            try:
                # a rank that failed on its own error makes no diagnosis; one that finished it is done
                own_errors = {r for r, report in self._read("failed").items() if report.startswith("error|")}
                waiting = [r for r in waiting if r not in own_errors and not self._store.check([f"done/{r}"])]
            except Exception:
                return
            time.sleep(0.2)

    def _read(self, prefix: str) -> dict[int, str]:
        values = {}
        for rank in range(self.world_size):
            key = f"{prefix}/{rank}"
            if self._store.check([key]):
                values[rank] = self._store.get(key).decode()
        return values

    def _diagnose(self, before: dict[int, str]) -> str:
        """Which ranks stopped, failed on their own, or are still alive."""
        after = self._read("beat")
        reports = self._read("failed")
        others = [rank for rank in range(self.world_size) if rank != self.rank]
        self._silent = [r for r in others if r not in reports and (r not in after or before.get(r) == after[r])]
        own_errors = {r: report.split("|", 2) for r, report in reports.items() if r != self.rank and report.startswith("error|")}
        waiting = [r for r in others if r not in reports and r not in self._silent]
        parts = []
        if self._silent:
            parts.append(
                f"{_format_ranks(self._silent)} stopped responding (no heartbeat for {MISSED_BEATS * HEARTBEAT_INTERVAL_S:.0f} s "
                "and no error reported): dead or frozen"
            )
        for rank, (_, step, message) in sorted(own_errors.items()):
            parts.append(f"rank {rank} failed at step {step}: {message}")
        if waiting:
            parts.append(f"{_format_ranks(waiting)} still alive without an error (stuck, or waiting on the same peer)")
        if not parts:
            parts.append("every other rank reported a communication failure too; no culprit found")
        return "; ".join(parts)


# TORCH_NCCL_ASYNC_ERROR_HANDLING (ProcessGroupNCCL's ErrorHandlingMode, per torch's docs): 0 no
# handling (a hung collective hangs on), 1 abort the communicators and end the process, 2 abort the
# communicators only, 3 end the process without aborting them (torch's default; torchrun's agent puts
# 1 in its workers' environment when the variable is unset). 1 and 3 end the process from the
# watchdog thread, so no Python exception is raised and no exception hook runs.
NCCL_ABORT_COMMUNICATORS_ONLY = "2"


def nccl_debug_env(dump_dir: str) -> dict[str, str]:
    """NCCL watchdog and flight-recorder settings: a timed-out collective raises in the main thread
    and leaves a per-rank dump.

    On a timeout (``parallel.timeout_s``) the watchdog aborts this rank's communicators but keeps
    the process (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``): the collective the main thread waits on,
    or its next one, raises a ``DistBackendError`` ("NCCL communicator was aborted …"), so
    Lightning's exception hooks run, the strategy writes its failure report and names the rank that
    broke the job, and the CLI exits with code 1. The flight recorder keeps the last collectives
    of every rank in a ring buffer; on a watchdog timeout each rank writes it to
    ``<dump_dir>/nccl_trace_rank_<rank>`` (read it with ``torchfrtrace`` /
    ``python -m torch.distributed.flight_recorder.fr_trace``). The monitoring thread still ends a
    rank whose watchdog itself hangs (an abort that never returns).
    """
    return {
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": os.path.join(dump_dir, "nccl_trace_rank_"),
        "TORCH_NCCL_ENABLE_MONITORING": "1",  # end a rank whose watchdog itself hangs
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": NCCL_ABORT_COMMUNICATORS_ONLY,  # raise in the main thread, not exit
    }
