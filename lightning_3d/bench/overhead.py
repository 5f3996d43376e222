"""Our strategy on one process against a hand-written PyTorch loop: what the Lightning + strategy layer costs.

    python -m lightning_3d.bench.overhead [--steps 20] [--rounds 2] [--warmup 3] [--threads 1] [--lightning-strategy auto]

Both sides run in one process on ``--threads`` torch threads, alternating step by step
(ours, plain, ours, plain, ...), ``rounds`` times ``steps`` steps:

- ours: ``build()`` of the ``tiny`` recipe at world size 1 (``Trainer(strategy=ModelParallel4DStrategy(),
  devices=1, accelerator="cpu")``);
- plain: the same ``Transformer`` with the same initial weights, the same batches (the
  datamodule's loader), AdamW with the same groups and LR schedule, gradient clipping at 1.0,
  in hand-written steps, each run from a callback at the start of one of our steps.

Alternating step by step keeps the comparison fair on a machine whose load changes by the
second. Prints ``RATIO overhead_vs_plain_torch`` = our steps/s ÷ plain steps/s, the median of
the per-step ratios after ``warmup`` steps.

``--lightning-strategy auto`` runs the same ``build()`` (module, callbacks, logger, data) under
Lightning's own strategy for one CPU process instead of ours, and prints
``RATIO lightning_strategy_vs_plain_torch``: what Lightning's loop costs by itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from typing_extensions import override

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import (
    StepTimer,
    add_turn_ratios,
    bench_overrides,
    compose_config,
    initialized_model,
)
from lightning_3d.config import Config
from lightning_3d.data import TextDataModule
from lightning_3d.module import adamw_with_schedule

MODULE = "lightning_3d.bench.overhead"


class PlainTorchLoop:
    """A hand-written training loop on the same model, data and optimizer, one step per call."""

    def __init__(self, config: Config, steps: int) -> None:
        self.model = initialized_model(config)
        self.optimizer, self.schedule = adamw_with_schedule(self.model.parameters(), config.optim, steps)
        datamodule = TextDataModule(config.data, vocab_size=config.model.vocab_size, seed=config.seed)
        self.batches = iter(datamodule.train_dataloader())
        self.clip = config.trainer.gradient_clip_val or float("inf")
        self.times: list[float] = []
        self.losses: list[float] = []

    @torch.enable_grad()
    def step(self) -> None:
        started = time.perf_counter()
        batch = next(self.batches)
        logits = self.model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.schedule.step()
        self.losses.append(loss.item())
        self.times.append(time.perf_counter() - started)


class Interleave(StepTimer):
    """Runs one plain step at the start of each of our steps, so the two alternate step by step.

    Our step k lasts from this hook in step k to this hook in step k + 1, less the plain
    step run in between: data loading, logging and every other callback count.
    """

    def __init__(self, plain: PlainTorchLoop) -> None:
        super().__init__()
        self.plain = plain

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.plain.step()

    def our_times(self) -> list[float]:
        periods = [later - earlier for earlier, later in zip(self.starts, self.starts[1:])]
        return [period - plain for period, plain in zip(periods, self.plain.times)]


def _worker(out: Path, steps: int, rounds: int, warmup: int, threads: int, lightning_strategy: Optional[str] = None) -> None:
    from lightning_3d.train import build

    result: dict[str, Any] = {"ours": [], "plain": []}
    for index in range(rounds):
        config = compose_config(out.parent / f"ours_{index}", bench_overrides(steps) + ["parallel.tp=1", "parallel.pp=1"])
        interleave = Interleave(PlainTorchLoop(config, steps))
        trainer, model, datamodule = build(config, callbacks=[interleave], strategy=lightning_strategy)
        torch.set_num_threads(threads)  # build() gives a single process every core
        trainer.fit(model, datamodule=datamodule)
        ours = interleave.our_times()
        result["ours"].append(ours[warmup:])
        result["plain"].append(interleave.plain.times[warmup : len(ours)])
        result.setdefault("losses", {"ours": interleave.losses, "plain": interleave.plain.losses})
    result["threads"] = torch.get_num_threads()
    out.write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def run(steps: int, rounds: int, warmup: int, threads: int = 1, lightning_strategy: Optional[str] = None) -> dict[str, Any]:
    """Launch the worker on one process; add the per-step and median ratios.

    One thread by default, as ``OMP_NUM_THREADS=1`` asks of every worker: with two threads on
    a shared 2-core machine a step's time swung tenfold whenever another process took a core.
    """
    options = {"steps": steps, "rounds": rounds, "warmup": warmup, "threads": threads}
    if lightning_strategy:
        options["lightning-strategy"] = lightning_strategy
    result = run_workers(MODULE, 1, *(f"--{name}={value}" for name, value in options.items()))
    return add_turn_ratios(result, "plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lightning-strategy", help="run build() under this Lightning strategy (e.g. auto) instead of ours")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.steps, args.rounds, args.warmup, args.threads, args.lightning_strategy)
        return
    result = run(args.steps, args.rounds, args.warmup, args.threads, args.lightning_strategy)
    side = f"Lightning's {args.lightning_strategy!r} strategy" if args.lightning_strategy else "ours"
    print(f"median step time: {side} {result['ours_step_s'] * 1e3:.1f} ms, plain {result['plain_step_s'] * 1e3:.1f} ms")
    name = "lightning_strategy_vs_plain_torch" if args.lightning_strategy else "overhead_vs_plain_torch"
    print(f"RATIO {name} {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
