"""Lightning's per-batch SIGTERM broadcast, measured: what dropping it saves per step.

    python -m lightning_3d.bench.sigterm [--steps 40] [--warmup 4]

One launch of 8 CPU processes (gloo, ``OMP_NUM_THREADS=1``): the ``tiny`` recipe on the layout
the picotron comparison calls like for like (``bench.picotron.LIKE_FOR_LIKE``: DDP-style
dp_replicate=2 × tp=2 × pp=2, 1F1B, no sequence parallel, no clipping).

Our strategy drops Lightning's broadcast of rank 0's SIGTERM flag before every training batch
(:mod:`lightning_3d.runtime.stop_signal`). Here every odd batch runs Lightning's own broadcast
again at its start (a world collective and a host sync), the even ones do not, so both kinds of
step run under the same machine load. Prints rank 0's median step time of each kind and
``RATIO without_vs_with_sigterm_broadcast`` = steps/s without ÷ steps/s with (the median of
the ratios of neighbouring step pairs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
from typing_extensions import override

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import StepTimer, bench_overrides, compose_config, median, steady_step_times
from lightning_3d.bench.picotron import LIKE_FOR_LIKE, PROCESSES
from lightning_3d.compat import lightning_sigterm_broadcast

MODULE = "lightning_3d.bench.sigterm"


class BroadcastOnOddBatches(L.Callback):
    """Lightning's SIGTERM broadcast at the start of every odd training batch."""

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % 2 == 1:
            lightning_sigterm_broadcast(trainer)


def _worker(out: Path, steps: int, warmup: int) -> None:
    import torch.distributed as dist

    from lightning_3d.train import build, shutdown_distributed

    # the warmup is even, so step i of the timed ones has batch index warmup + i
    warmup += warmup % 2
    config = compose_config(out.parent / "run", bench_overrides(warmup + steps + 1) + LIKE_FOR_LIKE)
    timer = StepTimer()  # first, so a batch's time starts before the broadcast
    trainer, model, datamodule = build(config, callbacks=[timer, BroadcastOnOddBatches()])
    trainer.fit(model, datamodule=datamodule)
    times = steady_step_times(timer.starts, warmup)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"without": times[0::2], "with": times[1::2]}))
    shutdown_distributed()


def run(steps: int, warmup: int) -> dict[str, Any]:
    result = run_workers(MODULE, PROCESSES, f"--steps={steps}", f"--warmup={warmup}")
    pairs = list(zip(result["without"], result["with"]))
    result["ratio"] = median(with_s / without_s for without_s, with_s in pairs)
    result["without_s"], result["with_s"] = median(result["without"]), median(result["with"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="timed steps (half of them with the broadcast)")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out at the start")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.steps, args.warmup)
        return
    result = run(args.steps, args.warmup)
    print(f"rank 0 median step: {result['without_s'] * 1e3:.1f} ms without the broadcast, "
          f"{result['with_s'] * 1e3:.1f} ms with it ({len(result['without'])} + {len(result['with'])} steps)")
    print(f"RATIO without_vs_with_sigterm_broadcast {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
