"""``--measure``: run a few steps of the best layouts on this machine and rank them by measured time.

The layouts run one after the other in one launch (one process group; ``build()`` and
``Trainer.fit`` per layout, as ``lightning_3d.bench.layouts`` does), each for ``steps`` steps;
a layout's time is the median start-to-start step time after ``warmup`` steps
(:class:`lightning_3d.bench.measure.StepTimer`). Only a world that fits this machine can be
measured: CPU processes (gloo), or as many GPUs as the machine has on one node.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from lightning_3d.errors import ConfigError
from lightning_3d.planner.api import LayoutPlan, Ranking
from lightning_3d.planner.cluster import Cluster

MODULE = "lightning_3d.planner.measure"
MAX_CPU_PROCESSES = 16


def measure_problem(cluster: Cluster) -> Optional[str]:
    """Why this machine cannot run the planned world (None: it can)."""
    if cluster.nodes > 1:
        return f"--measure runs on this machine only; the plan is for {cluster.nodes} nodes: plan for one node to measure"
    if cluster.gpu.upper() == "CPU":
        if cluster.gpus > MAX_CPU_PROCESSES:
            return f"--measure on CPU starts one process per device: {cluster.gpus} is more than {MAX_CPU_PROCESSES}"
        return None
    available = torch.cuda.device_count()
    if available < cluster.gpus:
        return f"--measure needs {cluster.gpus} GPUs on this machine; it has {available} (plan with cluster.gpu=CPU to measure on CPU)"
    return None


def training_overrides(overrides: list[str], cluster: Cluster) -> list[str]:
    """The user's overrides for ``lightning_3d.train``: the cluster's keys out, its size in."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("cluster")]
    accelerator = ["trainer.accelerator=cpu"] if cluster.gpu.upper() == "CPU" else []
    return kept + accelerator + [f"trainer.devices={cluster.gpus_per_node}", f"trainer.num_nodes={cluster.nodes}"]


def measure(ranking: Ranking, plans: list[LayoutPlan], overrides: list[str], steps: int = 6, warmup: int = 2) -> list[LayoutPlan]:
    """``plans`` with their measured step time, ranked by it (layouts that failed to run last)."""
    from lightning_3d.bench.launch import run_workers

    cluster = ranking.request.cluster
    problem = measure_problem(cluster)
    if problem:
        raise ConfigError(problem)
    base = [o for o in training_overrides(overrides, cluster) if not o.startswith(("trainer.devices=", "trainer.num_nodes="))]
    cases = [base + plan.overrides() for plan in plans]
    results = run_workers(MODULE, cluster.gpus, "--cases", json.dumps(cases), "--steps", str(steps), "--warmup", str(warmup))
    measured = [replace(plan, measured_step_s=result.get("step_s")) for plan, result in zip(plans, results)]
    failed = {index: result["failed"] for index, result in enumerate(results) if "failed" in result}
    for index, reason in failed.items():
        print(f"--measure: {plans[index].layout.degrees} did not run: {reason}")
    ordered = sorted(measured, key=lambda p: (p.measured_step_s is None, p.measured_step_s or 0.0))
    return [replace(plan, rank=index + 1) for index, plan in enumerate(ordered)]


def _run_case(out_dir: Path, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    from lightning_3d.bench.measure import StepTimer, compose_config, median, release_memory, steady_step_times
    from lightning_3d.train import build

    release_memory()
    config = compose_config(out_dir, overrides + [
        f"trainer.max_steps={steps}", "trainer.val_check_interval=null", "trainer.enable_progress_bar=false",
        "data.val_batches=1", "checkpoint.every_n_steps=null",
    ])
    timer = StepTimer()
    trainer, model, datamodule = build(config, callbacks=[timer])
    trainer.fit(model, datamodule=datamodule)
    times = steady_step_times(timer.starts, warmup)
    return {"step_s": median(times) if times else None}


def _worker(out: Path, cases: list[list[str]], steps: int, warmup: int) -> None:
    import torch.distributed as dist

    from lightning_3d.train import shutdown_distributed

    results = []
    for index, overrides in enumerate(cases):
        try:
            results.append(_run_case(out.parent / f"layout_{index}", overrides, steps, warmup))
        except (ValueError, RuntimeError) as error:  # one layout's failure does not stop the others
            results.append({"failed": str(error).splitlines()[0] if str(error) else type(error).__name__})
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    shutdown_distributed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("--cases", type=json.loads, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    _worker(args.worker, args.cases, args.steps, args.warmup)


if __name__ == "__main__":
    main()
