"""Pipeline schedules, measured: idle (bubble) fraction and activation memory per stage.

    python -m lightning_3d.bench.pipeline                       # pp=4, 8 microbatches
    python -m lightning_3d.bench.pipeline --pp 4 --microbatches 16

1. Idle fraction: each schedule's compute-action table, exactly as torch builds it, is
   replayed on a unit-time model (forward 1, full backward 2, input-grad 1, weight-grad 1,
   an overlapped forward+backward 3); every action waits for the actions it depends on
   (the previous stage's forward, the next stage's input-grad). Idle fraction =
   1 − busy time / (ranks × makespan), next to the textbook value.
2. Activation memory: a real run of the reference model on ``pp`` CPU processes (gloo),
   one step with GPipe and one with 1F1B; a saved-tensors hook counts the bytes autograd
   holds for backward, and the peak per stage is reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.pipelining._schedule_visualizer import get_schedule_ops
from torch.distributed.pipelining.schedules import (
    BACKWARD_INPUT,
    BACKWARD_WEIGHT,
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    _Action,
)

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.memory import SavedTensorBytes
from lightning_3d.config import ModelConfig, ParallelConfig
from lightning_3d.models.llama import Transformer, init_parameter
from lightning_3d.parallel.materialize import materialize
from lightning_3d.parallel.pipeline_parallel import (
    SCHEDULES,
    PipelineLoss,
    build_schedules,
    cut_stage,
    is_single_stage,
    split_blocks,
    stages_of_rank,
)
from lightning_3d.plans import llama_plan

DURATION = {FORWARD: 1.0, FULL_BACKWARD: 2.0, BACKWARD_INPUT: 1.0, BACKWARD_WEIGHT: 1.0}


def _compute_parts(action: _Action) -> list[_Action]:
    parts = action.sub_actions if action.computation_type == OVERLAP_F_B else (action,)
    return [part for part in parts if part.computation_type in DURATION]


def _single_stage_table(schedule: str, pp: int, microbatches: int) -> list[list[_Action]]:
    """GPipe and 1F1B run from code, not from a table: their order, as torch's runtime follows it.

    (torch's visualizer rebuilds a 1F1B table whose last rank is off by one microbatch.)
    """
    table = []
    for stage in range(pp):
        forwards = [_Action(stage, FORWARD, mb) for mb in range(microbatches)]
        backwards = [_Action(stage, FULL_BACKWARD, mb) for mb in range(microbatches)]
        if schedule == "gpipe":
            table.append(forwards + backwards)
            continue
        warmup = min(microbatches, pp - stage)  # the last stage warms up with 1, the first with pp
        order = forwards[:warmup]
        for mb in range(microbatches):
            order.append(backwards[mb])
            if warmup + mb < microbatches:
                order.append(forwards[warmup + mb])
        table.append(order)
    return table


def action_table(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> list[list[_Action]]:
    if is_single_stage(schedule):
        return _single_stage_table(schedule, pp, microbatches)
    ops = get_schedule_ops(SCHEDULES[schedule], pp, microbatches, stages_per_rank)
    return [[action for action in actions if action is not None] for actions in ops]


def idle_fraction(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> float:
    """Replay the schedule's action table on the unit-time model (see the module docstring)."""
    table = action_table(schedule, pp, microbatches, stages_per_rank)
    last_stage = pp * stages_per_rank - 1
    finished: dict[tuple[str, int, int], float] = {}  # ("F" | "G" (input grad) | "W", stage, microbatch)
    position, free, busy = [0] * pp, [0.0] * pp, [0.0] * pp

    def dependencies(part: _Action) -> list[tuple[str, int, int]]:
        stage, mb = part.stage_index, part.microbatch_index
        if part.computation_type == FORWARD:
            return [("F", stage - 1, mb)] if stage > 0 else []
        if part.computation_type == BACKWARD_WEIGHT:
            return [("G", stage, mb)]
        return [("F", stage, mb)] + ([("G", stage + 1, mb)] if stage < last_stage else [])

    progress = True
    while progress:
        progress = False
        for rank in range(pp):
            while position[rank] < len(table[rank]):
                parts = _compute_parts(table[rank][position[rank]])
                needed = [dep for part in parts for dep in dependencies(part)]
                if any(dep not in finished for dep in needed):
                    break
                time = max([free[rank], *(finished[dep] for dep in needed)])
                for part in parts:
                    time += DURATION[part.computation_type]
                    key = part.computation_type
                    if key == FORWARD:
                        finished[("F", part.stage_index, part.microbatch_index)] = time
                    else:  # a full backward gives both the input grad and the weight grad
                        if key in (FULL_BACKWARD, BACKWARD_INPUT):
                            finished[("G", part.stage_index, part.microbatch_index)] = time
                        if key in (FULL_BACKWARD, BACKWARD_WEIGHT):
                            finished[("W", part.stage_index, part.microbatch_index)] = time
                    busy[rank] += DURATION[key]
                free[rank] = time
                position[rank] += 1
                progress = True
    if any(position[rank] < len(table[rank]) for rank in range(pp)):
        raise RuntimeError(f"{schedule}: the action table does not complete under the dependency model")
    makespan = max(free)
    return 1.0 - sum(busy) / (pp * makespan)


def textbook_idle(schedule: str, pp: int, microbatches: int, stages_per_rank: int) -> str:
    if schedule in ("gpipe", "1f1b"):
        return f"{(pp - 1) / (microbatches + pp - 1):.3f}"
    if schedule in ("interleaved_1f1b", "looped_bfs"):
        return f"{(pp - 1) / (stages_per_rank * microbatches + pp - 1):.3f}"
    return "—"  # zero-bubble schedules: see docs/benchmarks.md


def bubble_table(pp: int, microbatches: int) -> str:
    rows = ["| schedule | stages/rank | idle fraction (action table) | textbook |", "|---|---|---|---|"]
    for schedule in SCHEDULES:
        per_rank = 1 if is_single_stage(schedule) else 2
        measured = idle_fraction(schedule, pp, microbatches, per_rank)
        rows.append(f"| {schedule} | {per_rank} | {measured:.3f} | {textbook_idle(schedule, pp, microbatches, per_rank)} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- activation memory


def _memory_worker(out: Path, microbatches: int) -> None:
    dist.init_process_group("gloo")
    rank, pp = dist.get_rank(), dist.get_world_size()
    config = ModelConfig(n_layers=2 * pp, dim=128, n_heads=4, vocab_size=512, ffn_dim=256, max_seq_len=256)
    parallel = ParallelConfig(pp=pp)
    plan = llama_plan(config, parallel)
    with torch.device("meta"):
        model = Transformer(config)
    blocks = split_blocks(config.n_layers, pp, 0.0, 0.0)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        (index,) = stages_of_rank(rank, pp, 1, schedule)
        stage = cut_stage(model, plan, blocks[index], is_first=index == 0, is_last=index == pp - 1)
        materialize(stage, "model", torch.device("cpu"), lambda n, t, g: init_parameter(config, n.removeprefix("model."), t, g), 0)
        train, _ = build_schedules([(index, stage)], pp, schedule, microbatches, torch.device("cpu"), dist.group.WORLD, PipelineLoss())
        tokens = torch.randint(0, 256, (microbatches * 2, 128), generator=torch.Generator().manual_seed(0))
        counter = SavedTensorBytes()
        with counter:
            train.step(*((tokens,) if index == 0 else ()), target=tokens if index == pp - 1 else None)
        peaks[schedule] = counter.peak
    gathered = [None] * pp
    dist.all_gather_object(gathered, peaks)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()


def memory_table(pp: int, microbatches: int) -> str:
    peaks = run_workers("lightning_3d.bench.pipeline", pp, "--microbatches", str(microbatches))
    rows = [
        "| stage | GPipe peak saved MB | 1F1B peak saved MB | GPipe / 1F1B | textbook m / min(m, p−s) |",
        "|---|---|---|---|---|",
    ]
    for stage, peak in enumerate(peaks):
        textbook = microbatches / min(microbatches, pp - stage)
        rows.append(
            f"| {stage} | {peak['gpipe'] / 2**20:.2f} | {peak['1f1b'] / 2**20:.2f} | "
            f"{peak['gpipe'] / peak['1f1b']:.2f} | {textbook:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _memory_worker(args.worker, args.microbatches)
        return
    print(f"## Idle fraction, pp={args.pp}, {args.microbatches} microbatches\n\n{bubble_table(args.pp, args.microbatches)}\n")
    print(f"## Activation memory per stage, pp={args.pp}, {args.microbatches} microbatches of 2 × 128 tokens\n")
    print(memory_table(args.pp, args.microbatches))


if __name__ == "__main__":
    main()
