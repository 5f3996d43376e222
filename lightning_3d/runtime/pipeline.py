"""PipelineRunner: under pipeline parallel, a step runs the whole schedule.

Training runs forward and backward of every microbatch inside the step (Lightning's own
backward and zero-grad are switched off, so the first batch of each optimizer step zeroes
the gradients here); validation and test run a forward-only schedule. Each microbatch's
loss is a token sum scaled so that the gradients add up to those of the global
token-weighted mean (see :class:`PipelineLoss`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.compat import skip_lightning_backward
from lightning_3d.config import ParallelConfig
from lightning_3d.loss import count_tokens, sum_over
from lightning_3d.parallel.pipeline_parallel import (
    PipelineLoss,
    build_schedules,
    num_microbatches,
)


class PipelineRunner:
    """The training and forward-only schedules over this rank's stages.

    Args:
        stages: (stage index, stage module) of every stage this rank holds.
        parallel: the layout (pp, stages_per_rank, schedule, microbatches).
        meshes: the strategy's mesh views (``pp`` and ``loss`` are used).
        device: this rank's device.
    """

    def __init__(
        self, stages: list[tuple[int, nn.Module]], parallel: ParallelConfig, meshes: dict[str, DeviceMesh], device: torch.device
    ) -> None:
        num_stages = parallel.pp * parallel.stages_per_rank
        self.loss = PipelineLoss()
        self.train_schedule, self.eval_schedule = build_schedules(
            stages,
            num_stages,
            parallel.pp_schedule,
            num_microbatches(parallel.microbatches, num_stages),
            device,
            meshes["pp"].get_group(),
            self.loss,
        )
        indices = [index for index, _ in stages]
        self.holds_first_stage = 0 in indices
        self.holds_last_stage = num_stages - 1 in indices
        self.meshes = meshes
        self.device = device

    def attach(self, trainer: "pl.Trainer") -> None:
        """The schedule runs backward inside training_step: Lightning's closure must not
        zero the gradients after it and backward again (switched off as Lightning's SWA does)."""
        skip_lightning_backward(trainer, True)

    def step(self, module: "pl.LightningModule", batch: Any, batch_idx: int, stage: str) -> Tensor:
        """Run the schedule on this rank's batch; return the global token-weighted mean loss
        (the same on every rank) after handing it to ``module.record_loss``."""
        inputs, labels = module.pipeline_batch(batch)
        loss_mesh = self.meshes["loss"]
        tokens = sum_over(count_tokens(labels), loss_mesh)
        trainer = module.trainer
        accumulate = trainer.accumulate_grad_batches if stage == "train" else 1
        if stage == "train" and batch_idx % accumulate == 0:  # first batch of an optimizer step
            for optimizer in trainer.optimizers:
                module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
        self.loss.scale = loss_mesh.size() / (tokens.clamp(min=1) * accumulate).float()
        losses: list[Tensor] = []
        run = self.train_schedule.step if stage == "train" else self.eval_schedule.eval
        run(
            *((inputs,) if self.holds_first_stage else ()),
            target=labels if self.holds_last_stage else None,
            losses=losses,
            return_outputs=False,  # only the losses are needed, not the merged logits
        )
        # this rank's token-loss sum / global tokens, on the last stage only; then summed over
        # the loss mesh (→ the global mean) and over the pp mesh (→ on every stage)
        mean = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.holds_last_stage:
            mean += torch.stack(losses).detach().double().sum() * accumulate / loss_mesh.size()
        sum_over(sum_over(mean, loss_mesh), self.meshes["pp"])
        global_loss = mean.float()
        module.record_loss(stage, global_loss, tokens)
        return global_loss
