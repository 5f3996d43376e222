"""FaultMonitor: start the process groups so that a lost rank is found, named and never waited on forever.

- Startup: the default group is created with ``parallel.init_timeout_s`` (under
  ``torchrun --max-restarts`` on a store private to the restart); on NCCL the watchdog and
  flight-recorder settings are put in the environment first.
- After the first step, the groups the step's collectives run on (the mesh dims and the
  default group) get the short ``parallel.timeout_s``: from then on a long wait there means
  a lost rank. Everything outside the step — checkpoint I/O, barriers, broadcasts — runs on
  a group of its own (:attr:`io_group`) that keeps ``init_timeout_s``, so a large save or a
  slow rank between steps is not taken for a failure.
- A heartbeat in the rendezvous store names the rank that broke the job (:mod:`lightning_3d.health`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_3d.compat import _init_dist_connection, set_group_timeout
from lightning_3d.config import ParallelConfig
from lightning_3d.health import Heartbeat, is_communication_failure, nccl_debug_env
from lightning_3d.nonfinite import NonFiniteError

NCCL_ERROR_MODE = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


class FaultMonitor:
    """Args:
    parallel: its ``init_timeout_s`` and ``timeout_s`` are used.
    """

    def __init__(self, parallel: ParallelConfig) -> None:
        self.init_timeout = timedelta(seconds=parallel.init_timeout_s)
        self.step_timeout = timedelta(seconds=parallel.timeout_s)
        self.io_group: Optional[dist.ProcessGroup] = None
        self.step_groups: set[dist.ProcessGroup] = set()  # what the training step's collectives run on
        self.async_group: Optional[dist.ProcessGroup] = None  # background checkpoint saves
        self.failure_report: Optional[str] = None  # which ranks broke the job, after a communication failure
        self.failed = False
        self._heartbeat: Optional[Heartbeat] = None
        self._steady = False

    def connect(
        self,
        environment: ClusterEnvironment,
        backend: str,
        device: torch.device,
        rank: int,
        world_size: int,
        dump_dir: str,
        async_save: bool = False,
    ) -> None:
        """Create the default process group, the I/O group (and with ``async_save`` the background
        save's group: its collectives run while training runs its own) and the heartbeat."""
        if backend == "nccl":
            # a hung collective then leaves a flight-recorder dump per rank (explicit settings win)
            for name, value in nccl_debug_env(dump_dir).items():
                os.environ.setdefault(name, value)
            if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get(NCCL_ERROR_MODE) == "1":
                # torchrun's agent writes its own default (1: abort and end the process) when unset;
                # a user's own 1 cannot be told from it, so under torchrun 1 becomes 2 as well
                os.environ[NCCL_ERROR_MODE] = nccl_debug_env(dump_dir)[NCCL_ERROR_MODE]
        if dist.is_initialized():  # an earlier run in this process may have left the step timeout on it
            set_group_timeout(dist.group.WORLD, self.init_timeout)
        _init_dist_connection(
            environment,
            backend,
            timeout=self.init_timeout,
            device_id=device if device.type != "cpu" else None,
            **self._restarted_worker_store(world_size),
        )
        self.io_group = dist.new_group(timeout=self.init_timeout)
        if async_save:
            self.async_group = dist.new_group(backend="gloo", timeout=self.init_timeout)
        self._heartbeat = Heartbeat.from_environment(rank, world_size)

    def _restarted_worker_store(self, world_size: int) -> dict[str, Any]:
        """Under ``torchrun --max-restarts``, a store private to this restart.

        The agent keeps one store for all restarts of its workers and the default group's
        keys are the same each time, so a restarted rank can read a peer's address from the
        attempt that died and fail to connect. Prefixing the keys with the restart count
        (set by torchrun) keeps each attempt to its own.
        """
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return {}
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=self.init_timeout
        )
        return {"store": dist.PrefixStore(f"lightning_3d/restart-{restart}", store)}

    def watch(self, mesh_groups: list[dist.ProcessGroup]) -> None:
        """The groups the training step's collectives run on: the mesh's and the default group."""
        self.step_groups = {group for group in [*mesh_groups, dist.group.WORLD] if group is not self.io_group}

    def step_done(self, steps_done: int) -> None:
        """After each optimizer step: the heartbeat's step; after the first, the short timeout
        on the step groups."""
        if self._heartbeat is not None:
            self._heartbeat.step = steps_done
        if not self._steady and dist.is_initialized():
            self._steady = True
            self._set_timeout(self.step_timeout)

    def pause(self) -> None:
        """Validation, test or predict begins: its waits (a slow metric, a callback on one rank)
        are not a training step's, so the step groups get the startup timeout back until the
        next training step is done (a rank still busy at the end of validation delays it)."""
        if self._steady:
            self._set_timeout(self.init_timeout)
            self._steady = False

    def _set_timeout(self, timeout: timedelta) -> None:
        for group in self.step_groups:
            set_group_timeout(group, timeout)

    def on_exception(self, rank: int, exception: BaseException) -> None:
        """Tell the other ranks this one failed and, after a failed collective, name the rank that broke the job."""
        self.failed = True
        if self._heartbeat is None or isinstance(exception, (NonFiniteError, SIGTERMException, KeyboardInterrupt)):
            return  # every rank raised the same error together, or the run was stopped from outside
        self._heartbeat.report_failure(exception)
        if is_communication_failure(exception):
            self.failure_report = self._heartbeat.wait_for_diagnosis()
            exception.add_note(f"lightning_3d (rank {rank}): {self.failure_report}")
        self._heartbeat.linger()

    def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
