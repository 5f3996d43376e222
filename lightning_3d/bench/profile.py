"""Where a training step's time goes, on every rank: sampled Python stacks sorted into categories.

    pip install py-spy
    python -m lightning_3d.bench.profile [--steps 40] [--rate 40] [--cpu-only] [-- <train overrides>]

Runs ``python -m lightning_3d.train recipe=tiny`` (8 CPU processes, dp_shard=2 × tp=2 × pp=2)
under ``py-spy record --subprocesses`` and sorts every sample taken inside the training loop
(``_TrainingEpochLoop.run``: start-up, validation and teardown are left out) by the innermost
frame that falls into one of :data:`CATEGORIES`. Without ``--cpu-only`` samples of waiting
threads count too (``--idle``), so the table shows wall time: on an oversubscribed machine a
rank waiting in a collective is waiting for another rank to get a core. Prints a markdown
table: category, share of samples, and the three code locations of ours that led there most.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

from lightning_3d.errors import ConfigError

# (category, substrings of a frame); the innermost frame that matches any decides
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("collectives and waits", ("distributed_c10d.py", "_functional_collectives", "c10d_logger.py")),
    ("pipeline P2P waits (bubble, skew)", ("_wait_batch_p2p", "_batch_p2p")),
    ("DTensor dispatch", ("torch/distributed/tensor/",)),
    ("FSDP2 hooks", ("torch/distributed/fsdp/", "_composable/replicate")),
    ("pipeline runtime", ("torch/distributed/pipelining/", "lightning_3d/runtime/pipeline.py")),
    ("optimizer", ("torch/optim/",)),
    ("model compute (forward)", ("lightning_3d/models/", "torch/nn/", "lightning_3d/loss.py")),
    ("autograd (backward compute)", ("torch/autograd/",)),
    ("our per-step code", ("lightning_3d/",)),
    ("Lightning loop and callbacks", ("lightning/", "torchmetrics/")),
)
IN_TRAINING = "_TrainingEpochLoop.run"
TRAIN_OVERRIDES = [
    "recipe=tiny", "checkpoint.every_n_steps=null", "trainer.val_check_interval=null",
    "data.max_bytes=2000000", "trainer.enable_progress_bar=false",
]


def categorize(frames: list[str]) -> str:
    for frame in reversed(frames):
        for category, keys in CATEGORIES:
            if any(key in frame for key in keys):
                return category
    return "other"


def breakdown(raw_lines: list[str]) -> tuple[int, dict[str, int], dict[str, Counter]]:
    """(samples in the training loop, samples per category, our innermost frames per category) from
    py-spy's ``--format raw`` lines (``frame;frame;... count``)."""
    total, counts, ours = 0, Counter(), defaultdict(Counter)
    for line in raw_lines:
        stack, _, number = line.rstrip().rpartition(" ")
        if IN_TRAINING not in stack or not number.isdigit():
            continue
        frames = stack.split(";")
        category = categorize(frames)
        samples = int(number)
        total += samples
        counts[category] += samples
        own = [frame for frame in frames if "lightning_3d/" in frame]
        ours[category][own[-1] if own else "-"] += samples
    return total, dict(counts), ours


def table(total: int, counts: dict[str, int], ours: dict[str, Counter]) -> str:
    rows = ["| category | share of samples | where in our code (share) |", "|---|---|---|"]
    for category, samples in sorted(counts.items(), key=lambda item: -item[1]):
        where = ", ".join(f"`{frame}` {100 * n / total:.1f}%" for frame, n in ours[category].most_common(3))
        rows.append(f"| {category} | {100 * samples / total:.1f}% | {where} |")
    return "\n".join(rows)


def record(steps: int, rate: int, idle: bool, overrides: list[str], out: Path) -> Path:
    if shutil.which("py-spy") is None:
        raise ConfigError("py-spy is not installed: pip install py-spy")
    raw = out / "stacks.txt"
    command = [
        "py-spy", "record", "--subprocesses", "-r", str(rate), "--format", "raw", "-o", str(raw),
        *(["--idle"] if idle else []), "--", sys.executable, "-m", "lightning_3d.train",
        *TRAIN_OVERRIDES, f"trainer.max_steps={steps}", f"hydra.run.dir={out / 'run'}", *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rate", type=int, default=40, help="samples per second per process")
    parser.add_argument("--cpu-only", action="store_true", help="leave out samples of waiting threads")
    parser.add_argument("--raw", type=Path, help="classify an existing py-spy raw file instead of recording")
    parser.add_argument("overrides", nargs="*", help="more train overrides (e.g. parallel.sequence_parallel=false)")
    args = parser.parse_args()
    raw = args.raw or record(args.steps, args.rate, not args.cpu_only, args.overrides, Path(tempfile.mkdtemp(prefix="l3d_profile_")))
    total, counts, ours = breakdown(raw.read_text().splitlines())
    if not total:
        raise SystemExit(f"no samples inside the training loop in {raw}")
    print(f"{total} samples inside the training loop ({raw})")
    print(table(total, counts, ours))


if __name__ == "__main__":
    main()
