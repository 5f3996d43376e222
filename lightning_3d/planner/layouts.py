"""Layouts: the degrees of the five mesh dims and the knobs that go with them, enumerated and
checked by the project's own validation (so a layout offered is one the strategy accepts)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Optional

from lightning_3d.config import DataConfig, ParallelConfig, PerfConfig
from lightning_3d.dims import MESH_DIMS, ParallelDims, divisors
from lightning_3d.parallel.pipeline_parallel import (
    NEEDS_MICROBATCHES_PER_STAGE,
    V_SHAPED,
    is_single_stage,
)
from lightning_3d.planner.shapes import ModelShape
from lightning_3d.validation import layout_problems, perf_problems

DEGREES = ("dp_replicate", "dp_shard", "cp", "tp", "pp")  # the order a layout is written in
AC_MODES = ("none", "selective", "full")
AC_EVERY = 2  # selective: every second block, the project's default
# schedules offered, with the virtual stages per rank each is planned with. GPipe and looped BFS
# are left out: they have 1F1B's and interleaved 1F1B's bubble with more microbatches in flight
PIPELINE_SCHEDULES: tuple[tuple[str, int], ...] = (
    ("1f1b", 1),
    ("interleaved_1f1b", 2),
    ("interleaved_zero_bubble", 2),
    ("zbv", 2),
    ("dualpipev", 2),
)
MICROBATCH_SIZES = (1, 2, 4)  # sequences per microbatch the planner tries, besides the fewest microbatches


@dataclass(frozen=True)
class Layout:
    """One way to run the job: the five degrees and every knob the planner chooses."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    pp_schedule: str = "1f1b"
    stages_per_rank: int = 1
    microbatches: int = 1  # per optimizer step on each rank (1 without pipeline parallel)
    activation_checkpoint: str = "none"
    ac_every: int = AC_EVERY
    reshard_after_forward: bool = True
    loss_parallel: bool = False
    sequence_parallel: bool = True

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        return self.dims().dp

    @property
    def fsdp(self) -> int:
        return self.dims().fsdp

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def sp(self) -> int:
        """How many pieces sequence parallel cuts the residual stream into (1 without it)."""
        return self.tp if self.sequence_parallel and self.tp > 1 else 1

    def dims(self) -> ParallelDims:
        return ParallelDims(self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp, self.world_size)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(
            dp_replicate=self.dp_replicate,
            dp_shard=self.dp_shard,
            cp=self.cp,
            tp=self.tp,
            pp=self.pp,
            sequence_parallel=self.sequence_parallel,
            loss_parallel=self.loss_parallel,
            reshard_after_forward=self.reshard_after_forward,
            pp_schedule=self.pp_schedule,
            microbatches=self.microbatches if self.pp > 1 else None,
            stages_per_rank=self.stages_per_rank,
        )

    def perf_config(self) -> PerfConfig:
        return PerfConfig(activation_checkpoint=self.activation_checkpoint, ac_every=self.ac_every)

    @property
    def degrees(self) -> str:
        shown = [f"{name}={getattr(self, name)}" for name in DEGREES if getattr(self, name) > 1]
        return " × ".join(shown) or "1 rank"

    @property
    def pipeline(self) -> str:
        if self.pp == 1:
            return "-"
        virtual = f"×{self.stages_per_rank}" if self.stages_per_rank > 1 else ""
        return f"{self.pp_schedule}{virtual} m={self.microbatches}"

    @property
    def checkpointing(self) -> str:
        return f"selective/{self.ac_every}" if self.activation_checkpoint == "selective" else self.activation_checkpoint

    def overrides(self) -> list[str]:
        """The ``python -m lightning_3d.train`` overrides that run this layout."""
        out = [f"parallel.{name}={getattr(self, name)}" for name in DEGREES]
        if self.pp > 1:
            out += [
                f"parallel.pp_schedule={self.pp_schedule}",
                f"parallel.stages_per_rank={self.stages_per_rank}",
                f"parallel.microbatches={self.microbatches}",
            ]
        if self.tp > 1:
            out.append(f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}")
            out.append(f"parallel.loss_parallel={str(self.loss_parallel).lower()}")
        if self.fsdp > 1:
            out.append(f"parallel.reshard_after_forward={str(self.reshard_after_forward).lower()}")
        out.append(f"perf.activation_checkpoint={self.activation_checkpoint}")
        if self.activation_checkpoint == "selective":
            out.append(f"perf.ac_every={self.ac_every}")
        return out


def degree_choices(world_size: int) -> Iterator[dict[str, int]]:
    """Every assignment of degrees to the five mesh dims whose product is the world size."""
    options = divisors(world_size)
    for values in itertools.product(options, repeat=len(MESH_DIMS) - 1):
        rest = world_size
        for value in values:
            if rest % value:
                break
            rest //= value
        else:
            yield dict(zip(("pp", "dp_replicate", "cp", "tp"), values), dp_shard=rest)


def _microbatch_choices(per_rank_batch: int, num_stages: int, schedule: str) -> list[int]:
    """Microbatch counts that divide the per-rank batch: the fewest the schedule takes, and those
    that give microbatches of 1, 2 and 4 sequences."""
    floor = num_stages if schedule in NEEDS_MICROBATCHES_PER_STAGE else 1
    valid = [m for m in divisors(per_rank_batch) if m >= floor]
    sized = [per_rank_batch // size for size in MICROBATCH_SIZES if per_rank_batch % size == 0]
    return sorted({m for m in valid[:1] + sized if m in valid})


def knob_choices(base: Layout, global_batch_size: int, shape: ModelShape) -> Iterator[Layout]:
    """The knobs the planner tries on a set of degrees (before validation)."""
    pipelines: list[tuple[str, int, int]] = [("1f1b", 1, 1)]
    if base.pp > 1:
        per_rank = global_batch_size // base.dp if base.dp and global_batch_size % base.dp == 0 else 0
        pipelines = []
        for schedule, per in PIPELINE_SCHEDULES:
            if base.pp * per > shape.n_layers or per_rank == 0:
                continue
            for m in _microbatch_choices(per_rank, base.pp * per, schedule):
                pipelines.append((schedule, per, m))
        pipelines = pipelines or [("1f1b", 1, 1)]  # the validation then says why none fits
    sequence_parallel = shape.sequence_parallel
    loss_parallel = [False, True] if base.tp > 1 and base.pp == 1 and shape.source == "reference" else [False]
    # without pipeline parallel FSDP2 may keep parameters gathered from forward to backward
    # (ZeRO-2 style); under pp the strategy keeps them gathered for the step (its default)
    reshard = [True, False] if base.fsdp > 1 and base.pp == 1 else [base.pp == 1]
    for (schedule, per, m), ac, lp, rs in itertools.product(pipelines, AC_MODES, loss_parallel, reshard):
        yield replace(
            base,
            pp_schedule=schedule,
            stages_per_rank=per,
            microbatches=m,
            activation_checkpoint=ac,
            loss_parallel=lp,
            reshard_after_forward=rs,
            sequence_parallel=sequence_parallel,
        )


def layout_check(layout: Layout, shape: ModelShape, seq_len: int, global_batch_size: int) -> list[str]:
    """Why the strategy would refuse this layout (empty when it runs): the pre-flight's own checks,
    and the weight shapes the tensor-parallel plan splits."""
    data = DataConfig(seq_len=seq_len, global_batch_size=global_batch_size)
    _, problems = layout_problems(layout.parallel_config(), layout.world_size, shape.model_config(), data)
    problems += perf_problems(layout.perf_config(), layout.dims(), "cpu")
    if layout.tp > 1 and shape.ffn_dim % layout.tp:
        problems.append(f"ffn dim {shape.ffn_dim} is not divisible by parallel.tp={layout.tp}")
    if shape.source == "hf" and layout.loss_parallel:
        problems.append("a transformers model's derived plan has no loss parallel")
    return problems


def enumerate_layouts(
    world_size: int, shape: ModelShape, seq_len: int, global_batch_size: int, only: Optional[dict[str, int]] = None
) -> tuple[list[Layout], dict[str, list[str]]]:
    """Every layout the strategy accepts for this model, world and batch, and why the sets of
    degrees that gave none were refused (degrees → the problems of their first try).

    ``only``: fix some degrees (e.g. ``{"tp": 8}``).
    """
    accepted: list[Layout] = []
    refused: dict[str, list[str]] = {}
    for degrees in degree_choices(world_size):
        if only and any(degrees[name] != value for name, value in only.items()):
            continue
        base = Layout(**degrees)
        found, first_problems = False, None
        checked: dict[Layout, list[str]] = {}  # the checks do not depend on checkpointing
        for layout in knob_choices(base, global_batch_size, shape):
            key = replace(layout, activation_checkpoint="none")
            if key not in checked:
                checked[key] = layout_check(key, shape, seq_len, global_batch_size)
            problems = checked[key]
            if problems:
                first_problems = first_problems or problems
                continue
            accepted.append(layout)
            found = True
        if not found:
            refused[base.degrees] = first_problems or [f"no pipeline schedule fits {shape.n_layers} layers and this batch"]
    return accepted, refused


def is_v_shaped(layout: Layout) -> bool:
    return layout.pp_schedule in V_SHAPED


def runs_one_stage(layout: Layout) -> bool:
    return layout.pp == 1 or is_single_stage(layout.pp_schedule)
