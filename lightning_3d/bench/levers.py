"""Activation checkpointing modes, measured: activation memory and step time on one process.

    python -m lightning_3d.bench.levers                  # tiny model, batch 8 × 128 tokens
    python -m lightning_3d.bench.levers --rounds 5

Each mode wraps the same model (same weights) as the strategy would
(``lightning_3d.parallel.activation_checkpoint``); a saved-tensors hook counts the bytes
autograd holds for backward at its peak, and the modes take turns step by step, so the
median step times are comparable. One process, one thread: CPU figures, not GPU ones.

The hook sees what a block keeps as its checkpoint input and what unwrapped blocks save;
the outputs that ``op`` keeps live in the checkpoint's own storage, out of the hook's
sight, so its memory is not reported.
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch

from lightning_3d.bench.memory import SavedTensorBytes
from lightning_3d.config import ModelConfig, ParallelConfig
from lightning_3d.models.llama import Transformer
from lightning_3d.parallel.activation_checkpoint import apply_activation_checkpointing
from lightning_3d.plans import llama_plan

MODES = (("none", 1), ("full", 1), ("selective", 2), ("op", 1))
TINY = ModelConfig(n_layers=4, dim=128, n_heads=8, n_kv_heads=4, vocab_size=512, max_seq_len=256)


def _step(model: Transformer, tokens: torch.Tensor) -> tuple[float, int]:
    """Seconds of one forward + backward, and the peak bytes saved for backward."""
    started = time.perf_counter()
    with SavedTensorBytes() as saved:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started, saved.peak


def run(rounds: int, batch: int, seq_len: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    reference = Transformer(TINY)
    plan = llama_plan(TINY, ParallelConfig(), root="")
    models = {}
    for mode, every in MODES:
        model = Transformer(TINY)
        model.load_state_dict(reference.state_dict())
        apply_activation_checkpointing(model, plan, mode, every)
        models[f"{mode}" + (f" (every {every})" if mode == "selective" else "")] = model
    tokens = torch.randint(0, TINY.vocab_size, (batch, seq_len + 1))
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, int] = {}
    for index in range(rounds + 1):
        for name, model in models.items():  # taking turns: a load change hits every mode alike
            seconds, peaks[name] = _step(model, tokens)
            if index > 0:  # the first round warms up
                times[name].append(seconds)
    return {name: {"step_ms": median(times[name]) * 1e3, "saved_mib": peaks[name] / 2**20} for name in models}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = run(args.rounds, args.batch, args.seq_len)
    base = results["none"]
    print("| activation_checkpoint | saved for backward, MiB (peak) | vs none | step ms (median) | vs none |")
    print("|---|---|---|---|---|")
    for name, row in results.items():
        memory = "not visible to the hook | –" if name == "op" else f"{row['saved_mib']:.1f} | {row['saved_mib'] / base['saved_mib']:.2f}×"
        print(f"| {name} | {memory} | {row['step_ms']:.0f} | {row['step_ms'] / base['step_ms']:.2f}× |")


if __name__ == "__main__":
    main()
