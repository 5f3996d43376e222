"""Per-step communication accounting (debug): calls and bytes of every collective, per mesh dim."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_3d.comm import (
    CommCounter,
    CommRecord,
    Totals,
    Volume,
    group_labels,
    per_dim,
    totals,
)


class CommAccounting(Callback):
    """Count what each training batch communicates: its forward, backward and optimizer step.

    ``steps[i]`` maps (dim, kind) → :class:`~lightning_3d.comm.Volume` for this rank's i-th
    training batch (one per optimizer step unless gradients are accumulated);
    ``last_records`` keeps the individual ops of the latest one. Per-dim totals are logged as
    rank-local ``comm/<dim>_bytes`` and ``comm/<dim>_wire_bytes``; rank 0 prints a per-dim
    table when training ends. Every op then dispatches through Python: for debugging, not speed.

    It puts itself first among the trainer's callbacks, so a batch's count ends before any
    other callback's ``on_train_batch_end`` runs (their collectives, such as
    PerformanceMonitor's peak-memory all-gather, are not the step's). Validation is not counted.
    """

    def __init__(self) -> None:
        self.steps: list[Totals] = []
        self.last_records: list[CommRecord] = []
        self._labels: dict[str, str] = {}
        self._counter: Optional[CommCounter] = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.callbacks[0] is not self:
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)
        self._labels = group_labels(getattr(trainer.strategy, "meshes", {}))

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._counter = CommCounter(self._labels)
        self._counter.__enter__()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is None:
            return
        self._stop(self._counter)
        for dim, volume in per_dim(self.steps[-1]).items():
            pl_module.log(f"comm/{dim}_bytes", float(volume.bytes), sync_dist=False)
            pl_module.log(f"comm/{dim}_wire_bytes", float(volume.wire_bytes), sync_dist=False)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:  # leave the mode, or every later op would still go through it
            self._stop(self._counter)

    def _stop(self, counter: CommCounter) -> None:
        counter.__exit__(None, None, None)
        self._counter = None
        self.last_records = counter.records
        self.steps.append(totals(counter.records))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.steps:
            return
        last = per_dim(self.steps[-1])
        total = sum(last.values(), Volume())
        rows = [*sorted(last.items()), ("total", total)]
        lines = ["", f"== communication of the last training batch (rank 0, step {trainer.global_step}) =="]
        lines.append(f"{'dim':<14}{'calls':>7}{'bytes':>14}{'wire bytes':>14}")
        lines += [f"{dim:<14}{v.count:>7}{v.bytes:>14,.0f}{v.wire_bytes:>14,.0f}" for dim, v in rows]
        rank_zero_info("\n".join(lines))
