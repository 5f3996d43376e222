"""Data startup at scale: time to the first batch and peak RSS per rank, by corpus size.

    python -m lightning_3d.bench.data [--sizes 40M,400M,4G] [--files 8] [--ranks 8] [--concurrent 8] [--repeats 3]

For each size, writes a synthetic corpus of ``--files`` uint16 ``.bin`` files, then starts
``--ranks`` processes, each the data module of one data-parallel rank of ``--ranks``
(``data=files``, seq_len 2048, global batch 16): it sets up, builds its training loader and
loads its first batch, all ranks starting together once each has imported. Reported per
size: the slowest rank's time from building the data module to its first batch (median of
``--repeats`` runs), and the largest peak RSS of a rank (whole process, imports included)
and its growth during that time. The corpus is deleted afterwards. At most
``--concurrent`` ranks run at once (fewer keeps a memory-hungry data path from exhausting
the machine; each rank's own figures do not depend on it, only the contention between them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODULE = "lightning_3d.bench.data"
SEQ_LEN = 2048
GLOBAL_BATCH = 16
VOCAB_SIZE = 50_304
# Written in pieces of this many tokens, so generating a large corpus needs little memory.
_WRITE_TOKENS = 1 << 25
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """``"40M"`` → bytes (powers of 1024)."""
    unit = _UNITS.get(text[-1].upper())
    return int(float(text[:-1]) * unit) if unit else int(text)


def write_corpus(folder: Path, total_bytes: int, files: int) -> list[Path]:
    """``files`` uint16 token files of random ids below the vocabulary, ``total_bytes`` together."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens_per_file = total_bytes // files // 2
    rng = np.random.default_rng(0)
    paths = []
    for index in range(files):
        path = folder / f"part-{index:03d}.bin"
        with open(path, "wb") as out:
            for start in range(0, tokens_per_file, _WRITE_TOKENS):
                count = min(_WRITE_TOKENS, tokens_per_file - start)
                rng.integers(0, VOCAB_SIZE, count, dtype=np.uint16).tofile(out)
        paths.append(path)
    return paths


def _memory_gib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process. Not ``getrusage``: its peak survives
    ``exec``, so a rank would report its launcher's memory at the moment it forked."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    return kib / 2**20


def _worker(corpus: Path, rank: int, ranks: int) -> None:
    """One rank: its data module, set up as rank ``rank`` of ``ranks``, to its first batch; prints JSON."""
    from types import SimpleNamespace

    from lightning_3d.config import DataConfig
    from lightning_3d.data import TextDataModule

    config = DataConfig(
        source="files", paths=[str(corpus)], token_dtype="uint16", seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH
    )
    # every rank starts its data setup at the same moment, as after a job's rendezvous
    print("ready", flush=True)
    sys.stdin.readline()
    rss_before = _memory_gib("VmRSS")
    start = time.perf_counter()
    datamodule = TextDataModule(config, vocab_size=VOCAB_SIZE, seed=0)
    # stands in for the Trainer: the data module reads only the DP layout and the accumulation from it
    datamodule.trainer = SimpleNamespace(
        strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": ranks, "rank": rank}),
        accumulate_grad_batches=1,
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    seconds = time.perf_counter() - start
    peak = _memory_gib("VmHWM")
    if tuple(batch["input_ids"].shape) != (GLOBAL_BATCH // ranks, SEQ_LEN):
        raise RuntimeError(f"rank {rank} got a batch of shape {tuple(batch['input_ids'].shape)}")
    print(json.dumps({"rank": rank, "seconds": seconds, "peak_rss_gib": peak, "rss_before_gib": rss_before}))


def run_ranks(corpus: Path, ranks: int, concurrent: int) -> list[dict]:
    """Every rank's figures, at most ``concurrent`` processes at a time."""
    results: list[dict] = []
    waiting = list(range(ranks))
    while waiting:
        batch, waiting = waiting[:concurrent], waiting[concurrent:]
        command = [sys.executable, "-m", MODULE, "--worker", str(corpus), "--ranks", str(ranks), "--rank"]
        running = [
            subprocess.Popen(
                [*command, str(rank)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread each, as several ranks share the cores
            )
            for rank in batch
        ]
        for process in running:  # imported and waiting
            process.stdout.readline()
        for process in running:
            try:
                process.stdin.write("go\n")
                process.stdin.flush()
            except BrokenPipeError:
                pass  # it died while importing: communicate() below reports it
        for rank, process in zip(batch, running):
            out, err = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"rank {rank} failed with exit code {process.returncode}:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measure(size: str, files: int, ranks: int, concurrent: int, repeats: int, folder: Path) -> dict:
    """One corpus of ``size``: the slowest rank's time (median over ``repeats`` runs) and the largest peak RSS."""
    corpus = folder / f"corpus-{size}"
    try:
        paths = write_corpus(corpus, parse_size(size), files)
        on_disk = sum(path.stat().st_size for path in paths)
        runs = [run_ranks(corpus, ranks, concurrent) for _ in range(repeats)]
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    every = [result for run in runs for result in run]
    return {
        "size": size,
        "corpus_gib": on_disk / 2**30,
        "ranks": ranks,
        "concurrent": concurrent,
        "first_batch_s": statistics.median(max(r["seconds"] for r in run) for run in runs),
        "peak_rss_gib": max(r["peak_rss_gib"] for r in every),
        "data_rss_gib": max(r["peak_rss_gib"] - r["rss_before_gib"] for r in every),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="40M,400M,4G", help="corpus sizes, comma-separated (K/M/G = KiB/MiB/GiB)")
    parser.add_argument("--files", type=int, default=8, help="token files per corpus")
    parser.add_argument("--ranks", type=int, default=8, help="data-parallel ranks (processes)")
    parser.add_argument("--concurrent", type=int, default=None, help="ranks running at once (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per corpus (the time is their median)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the corpora (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.rank, args.ranks)
        return
    concurrent = args.concurrent or args.ranks
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for size in args.sizes.split(","):
            row = measure(size, args.files, args.ranks, concurrent, args.repeats, Path(folder))
            rows.append(row)
            print(
                f"{row['size']:>6} ({row['corpus_gib']:.3f} GiB, {args.files} files), {args.ranks} ranks "
                f"({concurrent} at once): first batch {row['first_batch_s']:.3f} s, "
                f"peak RSS {row['peak_rss_gib']:.3f} GiB (data: +{row['data_rss_gib']:.3f} GiB)",
                flush=True,
            )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"RATIO first_batch {last['size']}/{first['size']}: {last['first_batch_s'] / first['first_batch_s']:.2f}")
        print(f"RATIO peak_rss {last['size']}/{first['size']}: {last['peak_rss_gib'] / first['peak_rss_gib']:.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
