"""Every 3D layout of the ``tiny`` model on 8 CPU processes: step time, tokens/s, loss, memory.

    python -m lightning_3d.bench.layouts [--steps 10] [--warmup 4] [--passes 1] [--four-d]

8 ranks fit exactly three dims of 2, so the layouts are the 10 ways to pick three of
dp_replicate, dp_shard, cp, tp, pp (a 4D layout needs 16 ranks: ``--four-d`` runs
dp_shard=2 × cp=2 × tp=2 × pp=2 on 16 processes). A layout the pre-flight check refuses
for the ``tiny`` recipe is listed with the reason instead of run.

All layouts run one after the other in one launch (one process group, one Trainer each,
through ``build()``), ``--passes`` times. Per layout: the median step time after ``warmup``
steps, tokens/s (global and per process), the global loss of every step, and per rank the
peak RSS during the layout (``ru_maxrss``, its high-water mark reset before each layout)
and the bytes of the rank's local shards of parameters, gradients and AdamW states.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import (
    LocalStateProbe,
    StepTimer,
    bench_overrides,
    compose_config,
    current_rss_bytes,
    median,
    release_memory,
    reset_peak_rss,
    steady_step_times,
)
from lightning_3d.callbacks.performance import peak_memory_bytes

MODULE = "lightning_3d.bench.layouts"
DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
FOUR_D = {"dp_shard": 2, "cp": 2, "tp": 2, "pp": 2}


def three_d_layouts() -> list[dict[str, int]]:
    """Every choice of three dims of 2 (the rest 1): the layouts that fill exactly 8 ranks."""
    return [{dim: 2 for dim in chosen} for chosen in itertools.combinations(DIMS, 3)]


def layout_name(layout: dict[str, int]) -> str:
    return " × ".join(f"{dim}={layout[dim]}" for dim in DIMS if layout.get(dim, 1) > 1)


def _slug(layout: dict[str, int]) -> str:
    # a run folder name: Hydra override values cannot hold '='
    return "_".join(f"{dim}{layout[dim]}" for dim in DIMS if layout.get(dim, 1) > 1)


def layout_overrides(layout: dict[str, int], steps: int) -> list[str]:
    return bench_overrides(steps) + [f"parallel.{dim}={layout.get(dim, 1)}" for dim in DIMS]


def refusal(layout: dict[str, int], steps: int) -> str | None:
    """Why the pre-flight check refuses this layout for the ``tiny`` recipe (None: it is valid)."""
    from lightning_3d.train import preflight

    try:
        preflight(compose_config(Path("unused"), layout_overrides(layout, steps), devices=math.prod(layout.values())))
    except ValueError as error:
        return str(error).replace("\n", " ")
    return None


def _measure_layout(out_dir: Path, layout: dict[str, int], steps: int, warmup: int) -> dict[str, Any]:
    from lightning_3d.train import build

    release_memory()
    baseline = current_rss_bytes()
    reset_ok = reset_peak_rss()
    config = compose_config(out_dir / _slug(layout), layout_overrides(layout, steps))
    timer, state = StepTimer(), LocalStateProbe()
    trainer, model, datamodule = build(config, callbacks=[timer, state])
    trainer.fit(model, datamodule=datamodule)
    memory = {"peak_rss": peak_memory_bytes(torch.device("cpu")), "rss_at_start": baseline, **state.bytes}
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, memory)
    return {
        "layout": layout_name(layout),
        "step_times": steady_step_times(timer.starts, warmup),
        "tokens_per_step": config.data.global_batch_size * config.data.seq_len,
        "losses": timer.losses,
        "memory_per_rank": per_rank,
        "peak_rss_reset": reset_ok,
    }


def _worker(out: Path, layouts: list[dict[str, int]], steps: int, warmup: int, passes: int) -> None:
    """Every layout, ``passes`` times (every other pass in reverse order, so that a slow spell of
    the machine does not fall on the same layouts); step times pooled, the rest from the first pass."""
    from lightning_3d.train import shutdown_distributed

    rows: dict[str, dict[str, Any]] = {}
    for index in range(passes):
        for layout in layouts if index % 2 == 0 else layouts[::-1]:
            row = _measure_layout(out.parent / f"pass_{index}", layout, steps, warmup)
            if row["layout"] in rows:
                rows[row["layout"]]["step_times"] += row["step_times"]
            else:
                rows[row["layout"]] = row
    for row in rows.values():
        row["step_s"] = median(row["step_times"])
        row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
        row["tokens_per_s_per_process"] = row["tokens_per_s"] / dist.get_world_size()
    if dist.get_rank() == 0:
        out.write_text(json.dumps([rows[layout_name(layout)] for layout in layouts]))
    shutdown_distributed()


def run(steps: int, warmup: int, passes: int = 1, four_d: bool = False) -> dict[str, Any]:
    """Check every layout, run the valid ones (8 processes; 16 for ``four_d``); rows + refusals."""
    layouts = three_d_layouts() + ([FOUR_D] if four_d else [])
    refused = {layout_name(layout): reason for layout in layouts if (reason := refusal(layout, steps))}
    valid = [layout for layout in layouts if layout_name(layout) not in refused]
    rows = []
    for world in sorted({math.prod(layout.values()) for layout in valid}):
        batch = [layout for layout in valid if math.prod(layout.values()) == world]
        options = {"layouts": json.dumps(batch), "steps": steps, "warmup": warmup, "passes": passes}
        rows += run_workers(MODULE, world, *(f"--{name}={value}" for name, value in options.items()))
    return {"rows": rows, "refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--passes", type=int, default=1, help="run every layout this many times, pooling the step times")
    parser.add_argument("--four-d", action="store_true", help="also run the 4D layout on 16 processes")
    parser.add_argument("--layouts", type=json.loads, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.layouts, args.steps, args.warmup, args.passes)
        return
    result = run(args.steps, args.warmup, args.passes, args.four_d)
    for row in result["rows"]:
        peak = max(rank["peak_rss"] for rank in row["memory_per_rank"]) / 2**20
        print(f"{row['layout']}: {row['step_s'] * 1e3:.0f} ms/step, {row['tokens_per_s']:.0f} tokens/s, "
              f"last loss {row['losses'][-1]:.4f}, peak RSS {peak:.0f} MiB")
    for name, reason in result["refused"].items():
        print(f"{name}: refused: {reason}")


if __name__ == "__main__":
    main()
