"""SIGTERM during training, agreed on by every rank in the step's one all-reduce.

Lightning (2.5.2+) makes every rank agree on a SIGTERM by broadcasting rank 0's flag at the
start of every training batch (one world collective and one host sync per batch) and again
from inside its signal handler, so the two broadcasts pair up. A signal that reaches only
another rank is not seen by the others; that rank raises alone and the others wait for it.

Under :class:`~lightning_3d.strategy.ModelParallel4DStrategy` with more than one process:

- the signal handler only notes the request (and stops a launcher's child processes, as
  Lightning's does); it runs no collective;
- the request rides in the step check's all-reduce (:func:`~lightning_3d.nonfinite.step_health`),
  so a signal on any rank is seen by every rank after the same optimizer step;
- every rank then sets Lightning's ``received_sigterm``, and Lightning's own checks at the end
  of that batch raise ``SIGTERMException`` on all of them together;
- the per-batch broadcast is dropped.

A signal during validation is acted on after the next optimizer step. Lightning's handling
is kept for one process and outside ``fit`` (validate, test, predict).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import FrameType
from typing import Optional

import lightning.pytorch as pl
from lightning.fabric.utilities.rank_zero import rank_prefixed_message

from lightning_3d.compat import agree_on_sigterm, take_over_sigterm

log = logging.getLogger(__name__)


class StopSignal:
    """The stop request of this rank, noted by the signal handler and read by the step check."""

    def __init__(self) -> None:
        self.requested = False
        self._trainer: Optional["pl.Trainer"] = None
        self._undo: Optional[Callable[[], None]] = None

    def attach(self, trainer: "pl.Trainer") -> None:
        """Take over the trainer's SIGTERM handling (before Lightning registers its signal handlers)."""
        self.detach()
        self.requested = False
        self._trainer = trainer
        self._undo = take_over_sigterm(trainer, self._on_signal)

    def detach(self) -> None:
        """Give Lightning its own handling back (a later validate/test/predict uses it)."""
        if self._undo is not None:
            self._undo()
        self._undo = self._trainer = None

    def agreed(self, stop: bool) -> None:
        """The step check's verdict: when any rank asked to stop, every rank stops after this batch."""
        if stop and self._trainer is not None:
            agree_on_sigterm(self._trainer)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}; every rank stops after the next optimizer step", trainer.local_rank))
        if not self.requested:
            self.requested = True
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
