"""Lightning's subprocess launcher, with a child-process observer that lets rank 0 speak first.

When a child process fails, Lightning's observer SIGKILLs every process, rank 0 included,
within its 5 s polling period: often before rank 0 has said which rank broke the job or
printed the error it shares with the child. This observer waits a grace period first;
rank 0 normally exits by itself well within it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from typing_extensions import override

from lightning_3d.compat import (
    _ChildProcessObserver,
    _set_num_threads_if_needed,
    _SubprocessScriptLauncher,
)
from lightning_3d.health import HEARTBEAT_INTERVAL_S, MISSED_BEATS

if TYPE_CHECKING:
    import lightning.pytorch as pl

# a diagnosis, the store host's wait for the others' diagnoses, and the teardown
GRACE_S = 4 * MISSED_BEATS * HEARTBEAT_INTERVAL_S + 5


class _PatientObserver(_ChildProcessObserver):
    @override
    def _terminate_all(self) -> None:
        time.sleep(GRACE_S)  # the main process usually ends by itself meanwhile (this thread is a daemon)
        super()._terminate_all()


class SubprocessLauncher(_SubprocessScriptLauncher):
    """Starts the other local ranks as Lightning does; only the observer differs."""

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _PatientObserver(main_pid=os.getpid(), child_processes=self.procs).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)
