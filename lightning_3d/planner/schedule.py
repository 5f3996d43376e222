"""A pipeline schedule's action table, read for what the planner needs: the idle (bubble)
fraction and how many microbatches each stage holds for backward at once.

Both come from the table torch builds for the schedule (``lightning_3d.bench.pipeline``):
the idle fraction from its unit-time replay, the in-flight counts by walking each rank's
actions in order (a forward adds a microbatch to its stage; the full backward, or the
weight-gradient half of a split one, releases it). Under a split backward (the zero-bubble
schedules) torch keeps the autograd graph of the input-gradient half until the step ends,
so part of a microbatch stays after its weight gradients (measured: what only the input
gradients need on a middle stage; on the last, all but what the weights' own nodes hold,
which the weight half frees; nothing on the first; see ``memory.stage_activations``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from torch.distributed.pipelining.schedules import BACKWARD_WEIGHT, FORWARD, FULL_BACKWARD

from lightning_3d.bench.pipeline import _compute_parts, action_table, idle_fraction
from lightning_3d.parallel.pipeline_parallel import stages_of_rank


def reference_microbatches(pp: int, microbatches: int, stages_per_rank: int) -> int:
    """The microbatch count the tables are built for: the schedule's own count up to one per
    stage. Beyond it a schedule's idle time and its microbatches in flight no longer change
    (checked for every schedule offered at 1-16× the stages), and torch's tables get slow to build."""
    return min(microbatches, pp * stages_per_rank)


@lru_cache(maxsize=None)
def bubble_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Idle fraction of the schedule's ranks (0 without pipeline parallel): the idle time of the
    reference table, against the busy time of ``microbatches`` (forward 1, backward 2 per stage)."""
    if pp == 1:
        return 0.0
    idle = _idle_time(schedule, pp, reference_microbatches(pp, microbatches, stages_per_rank), stages_per_rank)
    return idle / (idle + 3 * stages_per_rank * microbatches)


@lru_cache(maxsize=None)
def _idle_time(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Idle time per rank of the unit-cost replay (lightning_3d.bench.pipeline.idle_fraction)."""
    fraction = idle_fraction(schedule, pp, microbatches, stages_per_rank)
    return fraction / (1.0 - fraction) * 3 * stages_per_rank * microbatches


@lru_cache(maxsize=None)
def _table(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> tuple[tuple, ...]:
    return tuple(tuple(actions) for actions in action_table(schedule, pp, microbatches, stages_per_rank))


@lru_cache(maxsize=None)
def _snapshots(schedule: str, pp: int, microbatches: int, stages_per_rank: int, pp_rank: int) -> np.ndarray:
    """Rank ``pp_rank``'s distinct states after each action: per stage of the rank (in the
    order :func:`stages_of_rank` lists them), the microbatches it holds whole, then those whose
    weight gradients are done but whose graph stays until the step ends (split backward)."""
    actions = _table(schedule, pp, microbatches, stages_per_rank)[pp_rank]
    stages = stages_of_rank(pp_rank, pp, stages_per_rank, schedule)
    whole, kept = [0] * len(stages), [0] * len(stages)
    seen = {tuple(whole + kept)}
    for action in actions:
        for part in _compute_parts(action):
            position = stages.index(part.stage_index)
            if part.computation_type == FORWARD:
                whole[position] += 1
            elif part.computation_type == FULL_BACKWARD:
                whole[position] -= 1
            elif part.computation_type == BACKWARD_WEIGHT:
                whole[position] -= 1
                kept[position] += 1
            seen.add(tuple(whole + kept))
    return np.array(sorted(seen), dtype=np.float64)


def in_flight(schedule: str, pp: int, microbatches: int, stages_per_rank: int, pp_rank: int) -> dict[int, int]:
    """Stage → the most microbatches it holds whole for backward at once, on rank ``pp_rank``."""
    if pp == 1:
        return {0: 1}
    stages = stages_of_rank(pp_rank, pp, stages_per_rank, schedule)
    reference = reference_microbatches(pp, microbatches, stages_per_rank)
    snapshots = _snapshots(schedule, pp, reference, stages_per_rank, pp_rank)
    return {stage: int(snapshots[:, position].max()) for position, stage in enumerate(stages)}


def peak_split(
    schedule: str, pp: int, microbatches: int, stages_per_rank: int, pp_rank: int,
    per_microbatch: Mapping[int, float], kept_after_weight: Mapping[int, float] | None = None,
    part: Mapping[int, float] | None = None, part_kept: Mapping[int, float] | None = None,
) -> tuple[float, float]:
    """(the most bytes rank ``pp_rank`` holds at once, how much of it one part of each
    microbatch makes up at that peak), when a microbatch of stage s holds ``per_microbatch[s]``
    bytes until its backward and, under a split backward, still ``kept_after_weight[s]`` of them
    from its weight-gradient half to the end of the step. The part (e.g. the loss's
    log-softmax) is ``part[s]`` of ``per_microbatch[s]`` while whole and ``part_kept[s]`` of
    ``kept_after_weight[s]`` after its weight-gradient half."""
    part, part_kept = part or {}, part_kept or {}
    if pp == 1:
        return per_microbatch[0], part.get(0, 0.0)
    stages = stages_of_rank(pp_rank, pp, stages_per_rank, schedule)
    kept = kept_after_weight or {}
    weights = np.array([per_microbatch[s] for s in stages] + [kept.get(s, 0.0) for s in stages])
    shares = np.array([part.get(s, 0.0) for s in stages] + [part_kept.get(s, 0.0) for s in stages])
    reference = reference_microbatches(pp, microbatches, stages_per_rank)

    def peak(count: int) -> tuple[float, float]:
        snapshots = _snapshots(schedule, pp, count, stages_per_rank, pp_rank)
        at = int((snapshots @ weights).argmax())
        return float(snapshots[at] @ weights), float(snapshots[at] @ shares)

    if reference == microbatches or not any(kept.values()):
        return peak(reference)
    # what a split backward keeps grows with the microbatches: extrapolated from two tables
    (low, low_part), (high, high_part) = peak(reference), peak(2 * reference)
    scale = (microbatches - reference) / reference
    return low + (high - low) * scale, low_part + (high_part - low_part) * scale
