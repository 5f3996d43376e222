"""What a parallelized module keeps: its layout, mesh, stages and pipeline runner.

Kept on the LightningModule itself, so that ``trainer.validate`` / ``test`` / ``predict``
after ``fit``, or a new Trainer around the same module, reuse it instead of parallelizing
an already sharded model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.model_call import ShiftedLabels
from lightning_3d.plans.base import ParallelPlan
from lightning_3d.runtime.pipeline import PipelineRunner

_ATTRIBUTE = "_lightning_3d_parallelized"


@dataclass
class Parallelized:
    dims: ParallelDims
    mesh: DeviceMesh
    meshes: dict[str, DeviceMesh]
    root: str = ""  # the plan root, once parallelized
    stages: list[tuple[int, nn.Module]] = field(default_factory=list)
    pipeline: Optional[PipelineRunner] = None
    plan: Optional[ParallelPlan] = None  # None for a module that parallelized itself
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
