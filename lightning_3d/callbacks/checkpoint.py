"""Periodic sharded checkpoints as ``step-<N>`` folders, through Lightning's ModelCheckpoint."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from typing_extensions import override

from lightning_3d.checkpoint import STEP_PREFIX
from lightning_3d.errors import ConfigError


class StepCheckpoint(ModelCheckpoint):
    """Save every ``every_n_steps`` optimizer steps and at ``max_steps``; keep the newest ``keep_last``.

    It is Lightning's ModelCheckpoint ranking checkpoints by step, so the newest ``keep_last``
    survive; the strategy writes each one as a DCP folder and deletes an old one only after
    the new one is complete (also when saving asynchronously). Saving a step that already has
    a folder (left by an interrupted run) replaces it rather than adding a ``-v1`` copy.
    """

    FILE_EXTENSION = ""  # a checkpoint is a folder

    def __init__(self, dirpath: str, every_n_steps: int, keep_last: int = 3) -> None:
        self.check_options(every_n_steps, keep_last)
        super().__init__(
            dirpath=dirpath,
            filename=STEP_PREFIX + "{step}",
            auto_insert_metric_name=False,
            monitor="step",
            mode="max",
            save_top_k=keep_last,
            every_n_train_steps=every_n_steps,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )

    @staticmethod
    def check_options(every_n_steps: Optional[int], keep_last: int) -> None:
        if keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={keep_last} must be >= 1 (the newest checkpoint is always kept)")
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"checkpoint.every_n_steps={every_n_steps} must be >= 1 (or null for no checkpoints)")

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # the final state too, when max_steps is not a multiple of every_n_steps
        if trainer.global_step == trainer.max_steps and not self._should_skip_saving_checkpoint(trainer):
            self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
