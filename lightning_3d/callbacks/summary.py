"""A short end-of-run summary: throughput, final losses, where the outputs are."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override


class RunSummary(Callback):
    def __init__(self, tokens_per_step: int, run_dir: Path) -> None:
        self.tokens_per_step = tokens_per_step
        self.run_dir = Path(run_dir)
        self._start = 0.0
        self._start_step = 0
        self.first_train_loss: float | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._start_step = trainer.global_step

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.first_train_loss is None and "train_loss" in trainer.callback_metrics:
            self.first_train_loss = float(trainer.callback_metrics["train_loss"])

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._start
        steps = trainer.global_step - self._start_step
        metrics = trainer.callback_metrics
        lines = [
            f"steps: {steps} in {seconds:.1f} s, {steps * self.tokens_per_step / max(seconds, 1e-9):,.0f} tokens/s",
            f"train_loss: first {self.first_train_loss:.4f}, last {float(metrics['train_loss']):.4f}"
            if self.first_train_loss is not None and "train_loss" in metrics
            else "train_loss: not logged",
        ]
        if "val_loss" in metrics:
            val_loss = float(metrics["val_loss"])
            lines.append(f"val_loss: {val_loss:.4f}  val_ppl: {math.exp(min(val_loss, 80.0)):.2f}")
        lines.append(f"outputs: {self.run_dir.resolve()} (metrics.csv, .hydra/)")
        rank_zero_info("\n".join(["", "== run summary ==", *lines]))
