"""What a parallelized module keeps: its layout, mesh, stages and pipeline runner.

Kept on the LightningModule itself, so that ``trainer.validate`` / ``test`` / ``predict``
after ``fit``, or a new Trainer around the same module, reuse it instead of parallelizing
an already sharded model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.config import ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.model_call import ModelCallHook, ShiftedLabels
from lightning_3d.parallel.pipeline_parallel import stages_of_rank
from lightning_3d.plans.base import ParallelPlan
from lightning_3d.runtime.pipeline import PipelinedModel, PipelineRunner, tied_stage_group, tied_stage_weights

_ATTRIBUTE = "_lightning_3d_parallelized"


@dataclass
class Parallelized:
    dims: ParallelDims
    mesh: DeviceMesh
    meshes: dict[str, DeviceMesh]
    root: str = ""  # the plan root, once parallelized
    stages: list[tuple[int, nn.Module]] = field(default_factory=list)
    pipeline: Optional[PipelineRunner] = None
    shifted_labels: Optional[ShiftedLabels] = None  # context parallel on a model that shifts labels inside

    def attach(self, module: nn.Module) -> None:
        setattr(module, _ATTRIBUTE, self)


def parallelized(module: Optional[nn.Module], dims: ParallelDims) -> Optional[Parallelized]:
    """The record of ``module`` if it is already parallelized; an error if under another layout."""
    state = getattr(module, _ATTRIBUTE, None)
    if state is not None and state.dims != dims:
        raise ConfigError(
            f"{type(module).__name__} was already parallelized as {state.dims}; this strategy asks for {dims}. "
            "A parallelized module keeps its layout: build a new module for another layout "
            "(and load a checkpoint into it to continue)"
        )
    return state


def wire_model_call(
    module: nn.Module, state: Parallelized, plan: ParallelPlan, parallel: ParallelConfig, device: torch.device,
    aliases: dict[str, str], hook: bool,
) -> None:
    """What runs when the module's step calls its model, once the model is parallelized.

    Under pipeline parallel: the schedule (a :class:`PipelineRunner`, with the group that sums
    the gradients of weights tied across the first and last stage). Otherwise, for a
    transformers model (``hook``): the pre-hook that weights its loss by the global token
    count and, under context parallel, passes chunk positions and labels shifted before the cut.
    """
    dims = state.dims
    if dims.cp > 1 and plan.shifts_labels:
        state.shifted_labels = ShiftedLabels(state.meshes["cp"].get_local_rank(), dims.cp)
    if dims.pp > 1:
        num_stages = dims.pp * parallel.stages_per_rank
        ends = [rank for rank in range(dims.pp) if {0, num_stages - 1} & set(stages_of_rank(rank, dims.pp, parallel.stages_per_rank, parallel.pp_schedule))]
        group = tied_stage_group(state.mesh, ends[0], ends[-1]) if aliases else None
        tied = tied_stage_weights(state.stages, plan.root, aliases)
        state.pipeline = PipelineRunner(state.stages, parallel, state.meshes, device, plan, tied, group)
        state.pipeline.shifted_labels = state.shifted_labels
        root = module.get_submodule(plan.root)
        if isinstance(root, PipelinedModel):  # the module's own step calls it
            root.runner = state.pipeline
    elif hook:
        call_hook = ModelCallHook(state.meshes["loss"], state.meshes["cp"].get_local_rank(), dims.cp, state.shifted_labels)
        module.get_submodule(plan.root).register_forward_pre_hook(call_hook, with_kwargs=True, prepend=True)
