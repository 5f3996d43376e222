"""The benchmark suite: every comparison and every 3D layout, as a table, a JSON file and a plot.

    python -m lightning_3d.bench --quick          # 4-8 minutes on 2 shared CPU cores
    python -m lightning_3d.bench                  # more steps and rounds
    python -m lightning_3d.bench --four-d --out /tmp/bench

1. ``overhead_vs_plain_torch`` (:mod:`lightning_3d.bench.overhead`): our strategy at world size
   1 against a hand-written PyTorch loop, alternating step by step in one process.
2. ``vs_lightning_model_parallel`` (:mod:`lightning_3d.bench.vs_lightning`): dp_shard=2 × tp=2
   against Lightning's ``ModelParallelStrategy`` with a hand-parallelized module, on 4
   processes: two Trainers in one process group taking turns step by step; then again with our
   blocks grouped into FSDP2 units of at least 25 MiB (``perf.dp_unit_min_mb=25``:
   ``vs_lightning_model_parallel_units_25mb``).
3. Every 3D layout of the ``tiny`` model on 8 processes (:mod:`lightning_3d.bench.layouts`).

Each comparison prints ``RATIO <name> <value>``: ours ÷ the baseline in steps/s, the median
of the ratios of steps run next to each other. Results go to ``--out`` (default
``docs/bench/``): ``suite.json`` and ``suite.png``; the tables are printed. Every worker runs
with ``OMP_NUM_THREADS=1``; several processes share the machine's cores, so CPU figures
measure overheads, not GPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("docs/bench")
TARGETS = {"overhead_vs_plain_torch": 0.98, "vs_lightning_model_parallel": 1.02, "vs_lightning_model_parallel_units_25mb": 1.02}
GROUPED_UNITS = ["perf.dp_unit_min_mb=25"]
# what each comparison sets side by side, and the key of the baseline's step time in its result
COMPARISONS = {
    "overhead_vs_plain_torch": ("1 process, vs a plain PyTorch loop", "plain_step_s"),
    "vs_lightning_model_parallel": ("dp_shard=2 × tp=2 on 4 processes, vs Lightning's ModelParallelStrategy", "lightning_step_s"),
    "vs_lightning_model_parallel_units_25mb": ("the same, ours with `perf.dp_unit_min_mb=25`", "lightning_step_s"),
}


@dataclass(frozen=True)
class Effort:
    """How many steps and alternations each part runs."""

    overhead_steps: int
    overhead_rounds: int
    lightning_steps: int
    lightning_rounds: int
    layout_steps: int
    layout_passes: int
    warmup: int


QUICK = Effort(
    overhead_steps=16, overhead_rounds=2, lightning_steps=12, lightning_rounds=3, layout_steps=9, layout_passes=1, warmup=3
)
FULL = Effort(
    overhead_steps=40, overhead_rounds=3, lightning_steps=30, lightning_rounds=4, layout_steps=30, layout_passes=2, warmup=5
)


def machine() -> dict[str, Any]:
    import lightning
    import torch

    meminfo = Path("/proc/meminfo")
    memory_kib = int(meminfo.read_text().split("MemTotal:")[1].split()[0]) if meminfo.exists() else 0
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "backend": "gloo",
    }


def run_suite(effort: Effort, four_d: bool = False) -> dict[str, Any]:
    """Run every part (each launches its own worker processes); return every result."""
    from lightning_3d.bench import layouts, overhead, vs_lightning

    parts = {
        "overhead_vs_plain_torch": lambda: overhead.run(effort.overhead_steps, effort.overhead_rounds, effort.warmup),
        "vs_lightning_model_parallel": lambda: vs_lightning.run(effort.lightning_steps, effort.lightning_rounds, effort.warmup),
        "vs_lightning_model_parallel_units_25mb": lambda: vs_lightning.run(
            effort.lightning_steps, effort.lightning_rounds, effort.warmup, GROUPED_UNITS
        ),
        "layouts": lambda: layouts.run(effort.layout_steps, effort.warmup, effort.layout_passes, four_d),
    }
    results: dict[str, Any] = {"machine": machine(), "effort": effort.__dict__, "wall_s": {}}
    for name, run in parts.items():
        started = time.perf_counter()
        results[name] = run()
        results["wall_s"][name] = round(time.perf_counter() - started, 1)
    return results


# ----------------------------------------------------------------------------- report


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _max_loss_gap(losses: dict[str, list[float]]) -> float:
    ours, baseline = losses.values()
    return max(abs(a - b) for a, b in zip(ours, baseline))


def ratio_lines(results: dict[str, Any]) -> list[str]:
    return [f"RATIO {name} {results[name]['ratio']:.3f}" for name in TARGETS]


def comparison_table(results: dict[str, Any]) -> str:
    rows = [
        "| comparison | ours ms/step | baseline ms/step | ours − baseline ms/step | RATIO (ours ÷ baseline, steps/s) "
        "| target | spread of the per-step ratios | losses, max abs difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (what, baseline_key) in COMPARISONS.items():
        result = results[name]
        ratios, losses = result["step_ratios"], result["losses"]
        rows.append(
            f"| {name} ({what}) | {result['ours_step_s'] * 1e3:.1f} | {result[baseline_key] * 1e3:.1f} | "
            f"{result['extra_s_per_step'] * 1e3:+.1f} | {result['ratio']:.3f} | ≥ {TARGETS[name]} | "
            f"{len(ratios)} step pairs, quartiles {_quartiles(ratios)} | "
            f"{_max_loss_gap(losses):.1e} over {len(losses['ours'])} steps |"
        )
    return "\n".join(rows)


def _quartiles(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 4]:.2f}–{ordered[(3 * len(ordered)) // 4]:.2f}"


def layout_table(layouts: dict[str, Any]) -> str:
    rows = [
        "| layout | processes | ms/step (median) | tokens/s | tokens/s per process | loss first → last | "
        "peak RSS MiB, max over ranks | peak RSS growth in the layout MiB, max | params+grads+AdamW MiB, max over ranks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in layouts["rows"]:
        memory = row["memory_per_rank"]
        state = [rank["params"] + rank["grads"] + rank["optimizer"] for rank in memory]
        growth = max(rank["peak_rss"] - rank["rss_at_start"] for rank in memory)
        rows.append(
            f"| {row['layout']} | {len(memory)} | {row['step_s'] * 1e3:.0f} | {row['tokens_per_s']:.0f} | "
            f"{row['tokens_per_s_per_process']:.0f} | {row['losses'][0]:.4f} → {row['losses'][-1]:.4f} | "
            f"{_mib(max(rank['peak_rss'] for rank in memory))} | {_mib(growth)} | {_mib(max(state))} |"
        )
    for name, reason in layouts["refused"].items():
        rows.append(f"| {name} | refused: {reason} | | | | | | | |")
    return "\n".join(rows)


def per_rank_table(layouts: dict[str, Any]) -> str:
    """Peak RSS and local state bytes of every rank, MiB."""
    rows = ["| layout | peak RSS MiB per rank | params+grads+AdamW MiB per rank |", "|---|---|---|"]
    for row in layouts["rows"]:
        memory = row["memory_per_rank"]
        rss = " / ".join(f"{rank['peak_rss'] / 2**20:.0f}" for rank in memory)
        state = " / ".join(_mib(rank["params"] + rank["grads"] + rank["optimizer"]) for rank in memory)
        rows.append(f"| {row['layout']} | {rss} | {state} |")
    return "\n".join(rows)


def loss_table(layouts: dict[str, Any]) -> str:
    steps = max(len(row["losses"]) for row in layouts["rows"])
    rows = ["| layout | " + " | ".join(str(step) for step in range(steps)) + " |", "|---|" + "---|" * steps]
    for row in layouts["rows"]:
        rows.append(f"| {row['layout']} | " + " | ".join(f"{loss:.4f}" for loss in row["losses"]) + " |")
    return "\n".join(rows)


def markdown(results: dict[str, Any]) -> str:
    layouts = results["layouts"]
    return "\n\n".join(
        [
            comparison_table(results),
            layout_table(layouts),
            "Memory per rank, ranks 0 to n−1:\n\n" + per_rank_table(layouts),
            "Global train loss per step:\n\n" + loss_table(layouts),
            "\n".join(ratio_lines(results)),
        ]
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Two panels: the loss per step of each layout, and each layout's tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["layouts"]["rows"]
    names = [f"{row['layout']} ({len(row['memory_per_rank'])} proc.)".replace("dp_replicate", "dp_rep") for row in rows]
    figure, (losses, speed) = plt.subplots(1, 2, figsize=(14, 5.5))
    markers = "os^vD<>ph*xP"
    for index, (name, row) in enumerate(zip(names, rows)):
        # the layouts compute the same losses: shrinking markers keep every one visible
        losses.plot(row["losses"], marker=markers[index % len(markers)], markersize=11 - 0.7 * index, fillstyle="none",
                    linewidth=1, label=name)
    spread = max(max(step) - min(step) for step in zip(*(row["losses"] for row in rows)))
    losses.set(xlabel="step", ylabel="global train loss",
               title=f"Loss per step, tiny model; largest gap between layouts {spread:.1e}")
    losses.legend(fontsize=7)
    speed.barh(names, [row["tokens_per_s"] for row in rows], color="tab:blue")
    speed.invert_yaxis()
    speed.tick_params(axis="y", labelsize=8)
    speed.set(xlabel="tokens/s, whole job (median step)", title="Throughput per layout (processes share 2 CPU cores)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "suite.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_3d.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (4-8 minutes on 2 shared cores)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--four-d", action="store_true", help="also run dp_shard=2 × cp=2 × tp=2 × pp=2 on 16 processes")
    args = parser.parse_args(argv)
    results = run_suite(QUICK if args.quick else FULL, args.four_d)
    results["command"] = " ".join(["python -m lightning_3d.bench", *(argv if argv is not None else sys.argv[1:])])
    write_outputs(results, args.out)
    print(markdown(results))
    print(f"\nwrote {args.out / 'suite.json'} and {args.out / 'suite.png'}")
