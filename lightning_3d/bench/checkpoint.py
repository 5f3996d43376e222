"""Checkpoint cost for the ``tiny`` model: size, time the loop is blocked (sync vs async), load time.

    python -m lightning_3d.bench.checkpoint [--steps 12] [--every 3]

Runs the ``tiny`` recipe on its 8 CPU processes (dp_shard=2 × tp=2 × pp=2) twice, one run
with synchronous saves and one with ``checkpoint.async_save=true``, each saving every
``--every`` steps; then loads the last checkpoint on the same layout and on one process.
Reported: the checkpoint's size on disk, the median time a save blocks the training loop
(sync: the whole write; async: the copy to CPU memory) and the load time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from lightning_3d.bench.launch import run_workers
from lightning_3d.checkpoint import complete_checkpoints

MODULE = "lightning_3d.bench.checkpoint"


def _worker(out: Path, overrides: list[str]) -> None:
    import os

    from hydra import compose, initialize_config_dir

    from lightning_3d.train import (
        CONF_DIR,
        build,
        resume_path,
        shutdown_distributed,
        to_config,
    )

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer.devices={os.environ['LOCAL_WORLD_SIZE']}", *overrides])
    config = to_config(cfg)
    trainer, model, datamodule = build(config)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(config))
    strategy = trainer.strategy
    if trainer.global_rank == 0:
        out.write_text(json.dumps({"blocked_s": strategy.save_blocked_s, "load_s": strategy.load_s}))
    shutdown_distributed()


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker is not None:
        _worker(args.worker, overrides)
        return
    with tempfile.TemporaryDirectory() as tmp:
        common = ["recipe=tiny", f"trainer.max_steps={args.steps}", "trainer.val_check_interval=null", "data.val_batches=1",
                  "trainer.enable_progress_bar=false", f"checkpoint.every_n_steps={args.every}", "checkpoint.keep_last=1"]
        results = {}
        for mode in ("sync", "async"):
            ckpt = Path(tmp) / mode
            results[mode] = run_workers(MODULE, 8, *common, f"run_dir={tmp}/{mode}_run", f"checkpoint.dir={ckpt}",
                                        f"checkpoint.async_save={mode == 'async'}")
        last = complete_checkpoints(Path(tmp) / "sync")[-1]
        resume = [f"resume={last}", f"checkpoint.dir={tmp}/unused"]
        loaded_8 = run_workers(MODULE, 8, *common[:-2], *resume, f"run_dir={tmp}/load8")
        loaded_1 = run_workers(MODULE, 1, *common[:-2], *resume, "parallel.tp=1", "parallel.pp=1", f"run_dir={tmp}/load1")
        sync_blocked = statistics.median(results["sync"]["blocked_s"])
        async_blocked = statistics.median(results["async"]["blocked_s"])
        print(f"checkpoint of the tiny model (weights + AdamW states), {last.name}: {_size_mb(last):.1f} MiB, "
              f"{len(list(last.glob('*.distcp')))} shard files")
        print("| what | seconds |\n|---|---|")
        print(f"| save, sync: loop blocked (median of {len(results['sync']['blocked_s'])}) | {sync_blocked:.3f} |")
        print(f"| save, async: loop blocked (median of {len(results['async']['blocked_s'])}) | {async_blocked:.3f} |")
        print(f"| load on the same layout (8 processes) | {loaded_8['load_s']:.3f} |")
        print(f"| load on 1 process (resharded) | {loaded_1['load_s']:.3f} |")
        print(f"RATIO async_vs_sync_blocked {async_blocked / sync_blocked:.3f}")


if __name__ == "__main__":
    main()
