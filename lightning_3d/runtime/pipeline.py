"""PipelineRunner: under pipeline parallel, a step runs the whole schedule.

Training runs forward and backward of every microbatch inside the step (Lightning's own
backward and zero-grad are switched off, so the first batch of each optimizer step zeroes
the gradients here); validation and test run a forward-only schedule. Each microbatch's
loss is a token sum scaled so that the gradients add up to those of the global
token-weighted mean (see :class:`PipelineLoss`).

Two ways in:

- the module's step calls its model as usual (``self.model(input_ids=..., labels=...)``):
  the model is a :class:`PipelinedModel` whose call runs the schedule and returns an
  output whose ``loss`` is the global loss — the user's ``training_step`` stays unchanged;
- a module that defines ``pipeline_batch(batch) -> (inputs, labels)`` and
  ``record_loss(stage, loss, tokens)`` has the strategy run the schedule in its place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.compat import is_accumulating, skip_lightning_backward
from lightning_3d.config import ParallelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.loss import count_tokens, sum_over
from lightning_3d.parallel.materialize import canonical_name, join_name
from lightning_3d.parallel.model_call import ShiftedLabels
from lightning_3d.parallel.pipeline_parallel import (
    PipelineLoss,
    build_schedules,
    num_microbatches,
)
from lightning_3d.parallel.tied import TIED_COPY
from lightning_3d.plans.base import ParallelPlan
from lightning_3d.plans.hf import count_shifted_tokens


@dataclass
class PipelineOutput(Mapping):
    """What calling a pipelined model returns: the global loss (backward already done in training).

    Logits are not returned: they live on the last stage only, one microbatch at a time.
    Reads like a transformers output: ``out.loss``, ``out["loss"]``, ``out[0]``.
    """

    loss: Tensor
    logits: None = None

    def __getitem__(self, key: Any) -> Any:
        return self.loss if key in (0, "loss") else getattr(self, key) if isinstance(key, str) else (self.loss,)[key]

    def __iter__(self):
        return iter(("loss",))

    def __len__(self) -> int:
        return 1


class PipelinedModel(nn.ModuleList):
    """Stands in for the model under pipeline parallel: holds this rank's stages (so names stay
    ``<root>.<stage>.<unsplit name>``); calling it runs the schedule on the step's batch."""

    runner: Optional["PipelineRunner"] = None

    def forward(self, input_ids: Optional[Tensor] = None, *args: Any, labels: Optional[Tensor] = None, **kwargs: Any) -> PipelineOutput:
        if self.runner is None:
            raise RuntimeError("the pipelined model is called before the strategy set it up")
        shift_labels = kwargs.pop("shift_labels", None)  # labels the caller shifted already
        return self.runner.call(input_ids, shift_labels if shift_labels is not None else labels, args, kwargs, shift_labels is not None)


# model-call arguments that change nothing under pipeline parallel when left at these values
_NEUTRAL_KWARGS = {"use_cache": (False, None), "return_dict": (True, None), "output_attentions": (False, None), "output_hidden_states": (False, None)}


class PipelineRunner:
    """The training and forward-only schedules over this rank's stages.

    Args:
        stages: (stage index, stage module) of every stage this rank holds.
        parallel: the layout (pp, stages_per_rank, schedule, microbatches).
        meshes: the strategy's mesh views (``pp`` and ``loss`` are used).
        device: this rank's device.
        plan: the model's plan (its loss and label convention).
        tied_group: the group summing the gradients of weights tied across the first and last
            stage (None: no such weight, or both ends on this rank).
        tied: (first-stage parameter, last-stage parameter) pairs held by this rank.
    """

    def __init__(
        self,
        stages: list[tuple[int, nn.Module]],
        parallel: ParallelConfig,
        meshes: dict[str, DeviceMesh],
        device: torch.device,
        plan: Optional[ParallelPlan] = None,
        tied: Optional[list[list[nn.Parameter]]] = None,
        tied_group: Optional[dist.ProcessGroup] = None,
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
        self.last_stage = stages[indices.index(num_stages - 1)][1] if self.holds_last_stage else None
        self.meshes = meshes
        self.device = device
        self.plan = plan or ParallelPlan(root="", blocks="")
        self.tied, self.tied_group = tied or [], tied_group
        # set by the strategy under context parallel for a model that shifts labels inside
        self.shifted_labels: Optional[ShiftedLabels] = None
        self._step: Optional[tuple[pl.LightningModule, str, int]] = None
        self._calls = 0
        # the strategy's StepGuard.defer: takes a training step's local token-loss sum and count
        self.defer: Optional[Callable[[Tensor, Tensor], None]] = None

    def attach(self, trainer: "pl.Trainer") -> None:
        """The schedule runs backward inside training_step: Lightning's closure must not
        zero the gradients after it and backward again (switched off as Lightning's SWA does)."""
        skip_lightning_backward(trainer, True)

    # ------------------------------------------------------------------ the module's step calls its model
    def begin(self, module: "pl.LightningModule", stage: str, batch_idx: int) -> None:
        self._step, self._calls = (module, stage, batch_idx), 0

    def end(self) -> None:
        """After the module's step: the model must have been called exactly once (it ran the schedule)."""
        module, stage, _ = self._step
        self._step = None
        if self._calls == 0 and stage == "train":
            raise ConfigError(
                f"pipeline parallel: {type(module).__name__}.training_step did not call the model. Under pp the "
                "model call runs the whole schedule (forward and backward of every microbatch) and returns the "
                "loss: call `self.<model>(input_ids=..., labels=...)` once per step and return its `.loss`"
            )

    def call(
        self, input_ids: Optional[Tensor], labels: Optional[Tensor], args: tuple, kwargs: dict[str, Any], preshifted: bool = False
    ) -> PipelineOutput:
        if self._step is None:
            raise ConfigError(
                "pipeline parallel: the model was called outside training_step / validation_step / test_step; "
                "under pp a model call runs the schedule of one step"
            )
        module, stage, batch_idx = self._step
        name = type(module).__name__
        unexpected = {key: value for key, value in kwargs.items() if value is not None and value not in _NEUTRAL_KWARGS.get(key, ())}
        mask = unexpected.pop("attention_mask", None)
        if mask is not None and not bool((mask == 1).all()):
            unexpected["attention_mask"] = "with padding"
        if input_ids is None or labels is None or args or unexpected:
            got = sorted(set(unexpected) | ({"positional arguments"} if args else set()))
            raise ConfigError(
                f"pipeline parallel: {name} called its model with input_ids={'given' if input_ids is not None else None}, "
                f"labels={'given' if labels is not None else None}{f' and {got}' if got else ''}. Under pp the model call "
                "runs the whole schedule and computes the model's own loss on the last stage: call "
                "`self.<model>(input_ids=..., labels=...)` and use `.loss`; a loss computed outside the model call "
                "cannot be pipelined (define `pipeline_batch` / `record_loss` for that, see docs/pipeline.md)"
            )
        if self._calls:
            raise ConfigError(f"pipeline parallel: {name} called its model twice in one step; under pp it runs once per step")
        self._calls += 1
        return PipelineOutput(self._run(module, input_ids, labels, stage, batch_idx, preshifted)[0])

    # ------------------------------------------------------------------ the strategy runs the schedule itself
    def step(self, module: "pl.LightningModule", batch: Any, batch_idx: int, stage: str) -> Tensor:
        """Run the schedule on this rank's batch; return the global token-weighted mean loss
        (the same on every rank) after handing it to ``module.record_loss``."""
        inputs, labels = module.pipeline_batch(batch)
        if stage == "train" and getattr(module, "train_loss_after_step", False) and self.defer is not None:
            return self._run_deferred(module, inputs, labels, batch_idx)
        global_loss, tokens = self._run(module, inputs, labels, stage, batch_idx)
        module.record_loss(stage, global_loss, tokens)
        return global_loss

    def _zero_grad_at_step_start(self, module: "pl.LightningModule", batch_idx: int) -> int:
        """Zero the gradients on the first batch of an optimizer step; return the accumulation."""
        trainer = module.trainer
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:
            for optimizer in trainer.optimizers:
                module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
        return accumulate

    def _run_deferred(self, module: "pl.LightningModule", inputs: Tensor, labels: Tensor, batch_idx: int) -> Tensor:
        """A training schedule with no collective outside the stages' own: the microbatch losses are
        token sums × (loss-mesh size ÷ accumulation), the same scale as a deferred loss outside PP;
        this rank's sum and count go to the step's check (``defer``), which normalizes the gradients."""
        accumulate = self._zero_grad_at_step_start(module, batch_idx)
        self.loss.scale = self.meshes["loss"].size() / accumulate
        losses: list[Tensor] = []
        self.train_schedule.step(
            *((inputs,) if self.holds_first_stage else ()),
            target=labels if self.holds_last_stage else None,
            losses=losses,
            return_outputs=False,
        )
        if self.tied and not is_accumulating(module.trainer):
            self._sum_tied_grads()
        local_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.holds_last_stage:
            local_sum += torch.stack(losses).detach().double().sum() / self.loss.scale
        self.defer(local_sum, count_tokens(labels) if self.holds_last_stage else torch.zeros((), device=self.device))
        return local_sum.float()

    def _run(
        self, module: "pl.LightningModule", inputs: Tensor, labels: Tensor, stage: str, batch_idx: int, preshifted: bool = False
    ) -> tuple[Tensor, Tensor]:
        loss_mesh = self.meshes["loss"]
        shifted = preshifted or self.shifted_labels is not None
        if not preshifted and self.shifted_labels is not None:
            # the cut labels' twin, shifted before the cut (the next token may be on another rank)
            labels = self.shifted_labels.shifted(labels)
        local_tokens = count_shifted_tokens(labels, shifted) if self.plan.shifts_labels else count_tokens(labels)
        tokens = sum_over(local_tokens, loss_mesh)
        trainer = module.trainer
        accumulate = self._zero_grad_at_step_start(module, batch_idx) if stage == "train" else 1
        self.loss.scale = loss_mesh.size() / (tokens.clamp(min=1) * accumulate).float()
        if self.plan.pipeline_loss is not None and self.last_stage is not None:
            own_loss, last = self.plan.pipeline_loss, self.last_stage
            self.loss.summed = lambda logits, target: own_loss(last, logits, target, shifted)
        losses: list[Tensor] = []
        run = self.train_schedule.step if stage == "train" else self.eval_schedule.eval
        run(
            *((inputs,) if self.holds_first_stage else ()),
            target=labels if self.holds_last_stage else None,
            losses=losses,
            return_outputs=False,  # only the losses are needed, not the merged logits
        )
        if stage == "train" and self.tied and not is_accumulating(trainer):
            self._sum_tied_grads()  # once the step's gradients are complete
        # this rank's token-loss sum / global tokens, on the last stage only; then summed over
        # the loss mesh (→ the global mean) and over the pp mesh (→ on every stage)
        mean = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.holds_last_stage:
            mean += torch.stack(losses).detach().double().sum() * accumulate / loss_mesh.size()
        sum_over(sum_over(mean, loss_mesh), self.meshes["pp"])
        return mean.float(), tokens

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        """A weight tied between the first and the last stage (embedding and head) is one copy per
        end: each copy gets the sum of both gradients, so the copies stay equal (as Megatron does)."""
        for params in self.tied:
            grads = [param.grad for param in params if param.grad is not None]
            local = [grad.to_local() if hasattr(grad, "to_local") else grad for grad in grads]
            if not local:
                continue
            total = torch.stack(local).sum(0) if len(local) > 1 else local[0].clone()
            if self.tied_group is not None:
                dist.all_reduce(total, group=self.tied_group)
            for grad in local:
                grad.copy_(total)


def tied_stage_weights(stages: list[tuple[int, nn.Module]], root: str, aliases: dict[str, str]) -> list[list[nn.Parameter]]:
    """This rank's copies of weights tied across stages, grouped by the tied weight; the copies
    that stand for an alias are marked so that gradient norms count the weight once."""
    groups: dict[str, list[nn.Parameter]] = {}
    originals = set(aliases.values())
    for _, part in stages:
        for name, param in part.named_parameters():
            full = join_name(root, canonical_name(name))
            if full in aliases:
                setattr(param, TIED_COPY, True)
                groups.setdefault(aliases[full], []).append(param)
            elif full in originals:
                groups.setdefault(full, []).append(param)
    return list(groups.values())


def tied_stage_group(mesh: DeviceMesh, first_pp: int, last_pp: int) -> Optional[dist.ProcessGroup]:
    """The pairs of ranks (first-stage rank, last-stage rank) with the same other coordinates; every
    rank must call this. None when both ends are on the same pp rank."""
    if first_pp == last_pp:
        return None
    pairs = zip(mesh.mesh[first_pp].flatten().tolist(), mesh.mesh[last_pp].flatten().tolist())
    group, _ = dist.new_subgroups_by_enumeration([list(pair) for pair in pairs])
    return group
