"""Pipeline parallel: cut the model into stages, place them on ranks, run a schedule.

- ``pp × stages_per_rank`` stages. Blocks are spread so the heaviest stage is as light as
  possible, counting the embedding and the head as extra weight on the first and last
  stage; an explicit per-stage list of blocks may be given instead.
- Placement: "loop" (rank r holds stages r, r+pp, r+2·pp, ...) for every schedule but the
  V-shaped ones (ZBV, DualPipeV), where rank r holds stages r and 2·pp−1−r.
- Each rank deep-copies the meta-device model per stage it holds and drops what the
  stage does not run, so no rank ever allocates the whole model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    get_schedule_class,
)

from lightning_3d.compat import (
    FORWARD,
    RECV_F,
    RESHARD,
    SEND_F,
    UNSHARD,
    _Action,
    _PipelineSchedule,
    _PipelineScheduleRuntime,
    split_pipeline_actions,
)
from lightning_3d.errors import ConfigError
from lightning_3d.loss import cross_entropy_sum
from lightning_3d.plans.base import ParallelPlan

# config name → torch.distributed.pipelining schedule name
SCHEDULES = {
    "gpipe": "GPipe",
    "1f1b": "1F1B",
    "interleaved_1f1b": "Interleaved1F1B",
    "looped_bfs": "LoopedBFS",
    "interleaved_zero_bubble": "InterleavedZeroBubble",
    "zbv": "ZBVZeroBubble",
    "dualpipev": "DualPipeV",
}
V_SHAPED = ("zbv", "dualpipev")
# schedules that fill the pipeline before draining it need no more microbatches than they get
NEEDS_MICROBATCHES_PER_STAGE = ("1f1b", "interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev")


def is_single_stage(schedule: str) -> bool:
    return issubclass(get_schedule_class(SCHEDULES[schedule]), PipelineScheduleSingle)


def num_microbatches(microbatches: int | None, num_stages: int) -> int:
    return microbatches if microbatches is not None else num_stages


def stages_of_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_blocks(num_blocks: int, num_stages: int, first_weight: float, last_weight: float) -> list[list[int]]:
    """Contiguous split of blocks 0..n-1 into stages, minimizing the heaviest stage.

    Each block weighs 1; the first stage also carries ``first_weight`` (embedding) and the
    last ``last_weight`` (head). Every stage gets at least one block.
    """
    if num_stages > num_blocks:
        raise ConfigError(f"{num_stages} pipeline stages need at least {num_stages} blocks, the model has {num_blocks}")
    extra = [0.0] * num_stages
    extra[0] += first_weight
    extra[-1] += last_weight
    # best[s][i]: lightest possible heaviest stage when blocks [0, i) fill stages [0, s)
    inf = float("inf")
    best = [[inf] * (num_blocks + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_blocks + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, num_blocks - (num_stages - s) + 1):
            for j in range(s - 1, i):
                cost = max(best[s - 1][j], (i - j) + extra[s - 1])
                if cost < best[s][i]:
                    best[s][i], cut[s][i] = cost, j
    bounds, i = [], num_blocks
    for s in range(num_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [list(range(start, end)) for start, end in reversed(bounds)]


def check_explicit_split(stage_blocks: Sequence[Sequence[int]], num_blocks: int, num_stages: int) -> list[str]:
    """Problems with a user-given per-stage block list (empty when it is usable)."""
    problems = []
    if len(stage_blocks) != num_stages:
        problems.append(f"parallel.pp_layers has {len(stage_blocks)} stages, but pp × stages_per_rank = {num_stages}")
    if any(len(blocks) == 0 for blocks in stage_blocks):
        problems.append("parallel.pp_layers has an empty stage; every stage needs at least one block")
    flat = [block for blocks in stage_blocks for block in blocks]
    if flat != list(range(num_blocks)):
        problems.append(f"parallel.pp_layers must list blocks 0..{num_blocks - 1} once each, in order; got {list(map(list, stage_blocks))}")
    return problems


def _set_module(root: nn.Module, name: str, value: nn.Module | None) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(root.get_submodule(owner) if owner else root, attr, value)


class StageBlocks(nn.ModuleList):
    """The blocks a pipeline stage keeps, under their indices in the unsplit model.

    Iteration, ``len`` and slicing (``layers[: config.num_hidden_layers]``) behave as for
    the stage's own blocks in order; parameter names keep the original index
    (``layers.5.mlp...``), so checkpoints and initial weights match the unsplit model.
    """

    def __init__(self, blocks: dict[str, nn.Module] | None = None) -> None:
        super().__init__()
        for name, block in (blocks or {}).items():
            self.add_module(name, block)

    def __getitem__(self, index: int | slice) -> nn.Module | nn.ModuleList:
        blocks = list(self._modules.values())
        return nn.ModuleList(blocks[index]) if isinstance(index, slice) else blocks[index]


def cut_stage(model: nn.Module, plan: ParallelPlan, blocks: Sequence[int], is_first: bool, is_last: bool) -> nn.Module:
    """A copy of ``model`` that keeps only ``blocks`` and, on the ends, the first/last-stage modules."""
    stage = copy.deepcopy(model)
    container = stage.get_submodule(plan.blocks)
    keep = {str(block) for block in blocks}
    if isinstance(container, nn.ModuleDict):
        for name in list(container.keys()):
            if name not in keep:
                del container[name]
    elif isinstance(container, nn.ModuleList):
        _set_module(stage, plan.blocks, StageBlocks({name: block for name, block in container._modules.items() if name in keep}))
    else:
        raise TypeError(
            f"pipeline parallel needs the blocks `{plan.blocks}` in an nn.ModuleList or nn.ModuleDict, got {type(container).__name__}"
        )
    for name in ([] if is_first else plan.first_stage) + ([] if is_last else plan.last_stage):
        _set_module(stage, name, None)
    if plan.prepare_stage is not None:
        plan.prepare_stage(stage, is_first, is_last)
    return stage


class PipelineLoss:
    """Per-microbatch loss: summed token cross entropy × ``scale``.

    ``scale`` is set before each step to (loss-mesh size) / (global tokens × accumulation), so
    that the microbatch gradients add up to the gradient of the global token-weighted mean
    after data-parallel averaging — the same rule as ``token_weighted_loss``.
    """

    def __init__(self) -> None:
        self.scale = 1.0
        # (logits, labels) -> token-loss sum; the model's own loss when its plan names one
        self.summed: Callable[[Tensor, Tensor], Tensor] = cross_entropy_sum

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.summed(logits, labels) * self.scale


# actions a forward-only pass keeps from a lowered (compute + communication) schedule
_FORWARD_ACTIONS = (FORWARD, SEND_F, RECV_F, UNSHARD, RESHARD)


def _forward_only(schedule: _PipelineScheduleRuntime) -> None:
    """Reduce a runtime schedule's lowered action table to its forward pass.

    torch 2.13's ``eval()`` only switches the loss off: the V-shaped schedules still run
    their backward actions and fail. Keeping the forward computations (also those inside
    DualPipeV's overlapped forward/backward pairs) with their sends, receives and FSDP
    unshard/reshard, in the same order, leaves a pass without deadlock: only the backward
    dependencies are gone. torch's validator insists on backward actions, so the table is
    set directly.
    """
    forwards: dict[int, list[_Action]] = {}
    for rank, actions in schedule.pipeline_order_with_comms.items():
        forwards[rank] = []
        for action in actions:
            forwards[rank] += [part for part in split_pipeline_actions(action) if part.computation_type in _FORWARD_ACTIONS]
    schedule.pipeline_order_with_comms = forwards


def build_schedules(
    stages: list[tuple[int, nn.Module]],
    num_stages: int,
    schedule: str,
    microbatches: int,
    device: torch.device,
    group: torch.distributed.ProcessGroup,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> tuple[_PipelineSchedule, _PipelineSchedule]:
    """(training schedule, forward-only schedule for validation) over the same stages."""
    pipeline_stages = [PipelineStage(part, index, num_stages, device, group=group) for index, part in stages]
    schedule_class = get_schedule_class(SCHEDULES[schedule])

    def make() -> _PipelineSchedule:
        # losses are sums already scaled for the whole step: the schedule must not rescale grads
        if is_single_stage(schedule):
            return schedule_class(pipeline_stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
        return schedule_class(pipeline_stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)

    train = make()
    if schedule not in V_SHAPED:
        return train, train
    evaluation = make()
    _forward_only(evaluation)
    return train, evaluation
