"""CausalLM: the LightningModule that trains the reference decoder."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torchmetrics.aggregation import MeanMetric
from typing_extensions import override

from lightning_3d.config import ModelConfig, OptimConfig, ParallelConfig
from lightning_3d.loss import count_tokens, cross_entropy_sum, token_weighted_loss
from lightning_3d.models.llama import PretrainedWeights, Transformer, init_parameter
from lightning_3d.optim import ShardLocalAdamW
from lightning_3d.plans import ParallelPlan, llama_plan

# The logged losses are already global (identical on every rank); syncing them is not needed.
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CausalLM(L.LightningModule):
    """Next-token prediction with the reference Llama decoder.

    Batches are dicts with ``input_ids`` and ``labels`` (``-100`` = ignored), optionally
    ``positions``. The logged ``train_loss`` / ``val_loss`` are token-weighted means over
    the global batch, identical on every rank.
    """

    def __init__(self, model: ModelConfig, optim: Optional[OptimConfig] = None) -> None:
        super().__init__()
        model.validate()
        self.model_config = model
        self.optim_config = optim or OptimConfig()
        self.save_hyperparameters({"model": asdict(model), "optim": asdict(self.optim_config)})
        self.model: Optional[Transformer] = None
        # losses arrive already global (the same on every rank): no metric sync needed
        self.train_loss = MeanMetric(sync_on_compute=False)
        self.val_loss = MeanMetric(sync_on_compute=False)
        # checked now, before any process group: a file that does not fit fails fast
        self.pretrained = PretrainedWeights(model) if model.init_from else None

    @override
    def configure_model(self) -> None:
        if self.model is None:
            self.model = Transformer(self.model_config)

    def parallel_plan(self, parallel: ParallelConfig) -> ParallelPlan:
        return llama_plan(self.model_config, parallel, root="model")

    def init_parameter(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        name = name.removeprefix("model.")
        if self.pretrained is not None:
            full.copy_(self.pretrained.tensor(name))
        else:
            init_parameter(self.model_config, name, full, generator)

    def _loss_mesh(self) -> Optional[DeviceMesh]:
        # the loss is reduced over dp × cp; other strategies have no such view: local loss
        return getattr(self.trainer.strategy, "meshes", {}).get("loss")

    def _losses(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        logits = self.model(batch["input_ids"], batch.get("positions"))
        return token_weighted_loss(logits, batch["labels"], self._loss_mesh())

    # Under ModelParallel4DStrategy the training loss is a token sum normalized once per optimizer
    # step (``token_sum_loss``); the strategy then hands over the step's global mean through
    # ``record_loss`` — also under pipeline parallel, where it runs the schedule itself.
    train_loss_after_step = True

    def record_loss(self, stage: str, global_loss: Tensor, tokens: Tensor) -> None:
        """Collect a global loss (a batch's, or for training under our strategy an optimizer step's)."""
        metric = self.train_loss if stage == "train" else self.val_loss
        metric.update(global_loss, weight=tokens)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # one logged value per optimizer step: the token-weighted mean over its micro-batches
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self.log("train_loss", self.train_loss.compute(), prog_bar=True, sync_dist=False)
            # each self.log costs about a millisecond of Lightning bookkeeping; the token count
            # is for the logger only, which writes on logging steps
            if self.trainer._logger_connector.should_update_logs:
                self.log("train_tokens", self.train_loss.weight, sync_dist=False)
            self.train_loss.reset()

    def pipeline_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(first-stage input, last-stage target) of a batch, for pipeline parallel."""
        return batch["input_ids"], batch["labels"]

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        token_sum_loss = getattr(self.trainer.strategy, "token_sum_loss", None)
        if token_sum_loss is None:  # another strategy: the global loss now (one all-reduce per batch)
            loss, global_loss, tokens = self._losses(batch)
            self.record_loss("train", global_loss, tokens)
            return loss
        logits = self.model(batch["input_ids"], batch.get("positions"))
        return token_sum_loss(cross_entropy_sum(logits, batch["labels"]), count_tokens(batch["labels"]))

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, global_loss, tokens = self._losses(batch)
        self.record_loss("val", global_loss, tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", val_loss, prog_bar=True, sync_dist=False)
        self.log("val_ppl", val_loss.exp(), sync_dist=False)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_optimizer_config(self.parameters(), self.optim_config, self.trainer.max_steps)


def adamw_optimizer_config(params: Iterable[torch.nn.Parameter], optim: OptimConfig, max_steps: int) -> dict[str, Any]:
    """``configure_optimizers``' answer: :func:`adamw_with_schedule`, the schedule stepped every
    optimizer step; its learning rates are logged as ``lr-AdamW/pg1`` / ``pg2``."""
    optimizer, scheduler = adamw_with_schedule(params, optim, max_steps)
    # named, so the logged key stays torch's optimizer's name, not ShardLocalAdamW's
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr-AdamW"}}


def adamw_with_schedule(
    params: Iterable[torch.nn.Parameter], optim: OptimConfig, max_steps: int, shard_local: bool = True
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with no weight decay on norm gains (1-D parameters), and its per-step LR schedule:
    linear warmup, then cosine decay over ``optim.decay_steps`` (default ``max_steps``).

    ``shard_local``: :class:`~lightning_3d.optim.ShardLocalAdamW` (the same update on the local
    shards of DTensor parameters) when a parameter is a DTensor; else torch's ``AdamW``."""
    params = list(params)
    if shard_local and any(isinstance(p, DTensor) for p in params):
        # one dispatch per op for all tensors (torch's default on CPU loops over the parameters)
        optimizer_class, foreach = ShardLocalAdamW, True
    else:
        # a foreach list must not mix DTensors and plain tensors: a mixed model keeps torch's default
        optimizer_class, foreach = torch.optim.AdamW, True if len({isinstance(p, DTensor) for p in params}) == 1 else None
    optimizer = optimizer_class(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        foreach=foreach,
    )
    decay_steps = optim.decay_steps or max(1, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, optim.warmup_steps, decay_steps, optim.min_lr_ratio)
    )
    return optimizer, scheduler
