"""One GPU: the ~1B reference model under our strategy against Lightning's own ``ModelParallelStrategy``.

    python -m lightning_3d.bench.gpu                          # one CUDA GPU (sized for an H100 / H200)
    python -m lightning_3d.bench.gpu data.global_batch_size=4 # any config override, for both sides
    python -m lightning_3d.bench.gpu --smoke                  # the same code on CPU, tiny model (CI)

Both sides train the ``llama3_1b`` model (Llama 3.2 1B shapes, 1.24B parameters) from the
same initial weights on the same batches (``recipe=llama3_1b_1gpu`` with byte tokens of the
Python standard library instead of its token files: 8 × 2048 tokens a step), bf16-mixed,
every block compiled (inductor), every second block activation-checkpointed, AdamW with
gradient clipping at 1.0, world size 1:

- ours: ``build()`` of that config (``ModelParallel4DStrategy``; at world size 1 no FSDP
  wrapping is needed, so none is applied);
- Lightning's: ``ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)`` and a
  LightningModule whose ``configure_model`` does by hand what its user would: checkpoint
  the same blocks, compile each block with the same backend, ``fully_shard`` each block and
  the root.

The two run one after the other in this process, ours first: on a GPU of its own the load
does not change from one minute to the next (unlike the shared CPUs the other benchmarks
take turns on), each side's peak memory is then its own, the two models need not fit on the
device at once, and no side's queued GPU work runs inside the other's timed steps. Between
them the compiled code is dropped (``torch.compiler.reset()``) and the cached memory given
back, so each side compiles for itself (the second may find inductor's on-disk cache warm,
which only shortens its untimed first steps).

Timing: ``--warmup`` steps (compile, autotuning, allocator warm-up) are not timed; the clock
reads, after ``torch.cuda.synchronize()``, at the start of the first timed step and at the start
of the step after the last one (so ``--steps`` steps of device work, data loading and every
callback lie between); the benchmark adds no synchronization inside the window. Losses are
kept as tensors and read after training. Printed, per side: ``TOKENS_PER_S``, ``MFU``
(training FLOPs per token of :mod:`lightning_3d.flops` × tokens/s ÷ the device's dense bf16
peak from its table, or ``--peak-flops``; ``MFU ours_monitor``: what our PerformanceMonitor
logged last, as a cross-check), ``STEP_S`` (mean), ``PEAK_MEMORY_GIB``
(``torch.cuda.max_memory_allocated``; RSS on CPU), ``STARTUP_S`` (fit start to the first
timed step: setup, compile, warm-up), the ``LOSSES`` of every step; then
``RATIO gpu_vs_lightning_model_parallel`` = our tokens/s ÷ theirs.

``--smoke`` runs the same code on CPU: the ``debug`` model (``recipe=debug``, with the 1B
model's tied embedding and grouped-query attention), bf16-mixed, the ``aot_eager`` compile
backend, gloo, 2 + 3 + 1 steps, and MFU against a nominal ``--peak-flops`` (1e12 unless
given): its figures say nothing about speed; its losses show that both sides trained the
same model on the same batches.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.fsdp import fully_shard
from typing_extensions import override

from lightning_3d.bench.measure import compose_config, initialized_model, release_memory, reset_peak_rss
from lightning_3d.bench.vs_lightning import HandParallelizedLM
from lightning_3d.callbacks.performance import peak_memory_bytes
from lightning_3d.compat import checkpoint_wrapper
from lightning_3d.config import Config
from lightning_3d.data import TextDataModule
from lightning_3d.errors import ConfigError
from lightning_3d.flops import flops_per_token, mfu, peak_flops
from lightning_3d.train import build, shutdown_distributed

RATIO_NAME = "gpu_vs_lightning_model_parallel"
SIDES = ("ours", "lightning")
SMOKE_PEAK_FLOPS = 1e12  # nominal: gives the CPU run an MFU line to print, not a figure to read
_GIB = 2**30

# both sides: no checkpoints, no progress bar, a bounded slice of the corpus (bytes = tokens)
_COMMON = ["trainer.enable_progress_bar=false", "checkpoint.every_n_steps=null", "trainer.devices=1", "parallel.tp=1", "parallel.pp=1"]
GPU_OVERRIDES = [
    "recipe=llama3_1b_1gpu",
    "data=stdlib",  # the recipe reads token files; byte tokens of the standard library need none
    "data.seq_len=2048",
    "data.global_batch_size=8",
    "data.max_bytes=4000000",
    "perf.compile=true",
    "perf.compile_backend=inductor",
    "perf.activation_checkpoint=selective",
    "trainer.precision=bf16-mixed",
    *_COMMON,
]
SMOKE_OVERRIDES = [
    "recipe=debug",
    # as the 1B model: tied embedding and head, grouped-query attention, bf16 autocast
    "model.tie_embeddings=true",
    "model.n_kv_heads=2",
    "trainer.precision=bf16-mixed",
    "data.max_bytes=400000",
    "perf.compile=true",
    "perf.compile_backend=aot_eager",
    "perf.activation_checkpoint=selective",
    "trainer.accelerator=cpu",
    *_COMMON,
]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


class WindowTimer(L.Callback):
    """Synchronized clock reads at the start of step ``warmup`` and of step ``warmup + steps``; each step's loss
    kept as a tensor (reading it every step would add a synchronization the run does not otherwise have)."""

    def __init__(self, warmup: int, steps: int, loss_of: Callable[[L.LightningModule], Tensor]) -> None:
        self.warmup, self.steps, self.loss_of = warmup, steps, loss_of
        self.marks: list[float] = []
        self._losses: list[Tensor] = []

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx in (self.warmup, self.warmup + self.steps):
            _synchronize(pl_module.device)
            self.marks.append(time.perf_counter())

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._losses.append(self.loss_of(pl_module).detach().clone())

    @property
    def window_s(self) -> float:
        if len(self.marks) != 2:
            raise RuntimeError(f"the run ended before step {self.warmup + self.steps} started: the timed window is not closed")
        return self.marks[1] - self.marks[0]

    @property
    def losses(self) -> list[float]:
        return [float(loss) for loss in self._losses]


class CompiledShardedLM(HandParallelizedLM):
    """The model as a ``ModelParallelStrategy`` user parallelizes it by hand for one device: the blocks
    ``config.perf`` names activation-checkpointed, each block compiled, ``fully_shard`` per block and on the root."""

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = initialized_model(self.config)
        perf = self.config.perf
        if perf.activation_checkpoint not in ("none", "full", "selective"):
            raise ConfigError(f"perf.activation_checkpoint={perf.activation_checkpoint!r}: this baseline does none, full or selective")
        for key, block in list(model.layers.named_children()):
            if perf.activation_checkpoint == "full" or (perf.activation_checkpoint == "selective" and int(key) % perf.ac_every == 0):
                block = checkpoint_wrapper(block, preserve_rng_state=False)  # no dropout: nothing random to replay
            if perf.compile:
                block = torch.compile(block, backend=perf.compile_backend)
            model.layers.register_module(key, block)
        mesh = self.device_mesh["data_parallel"]
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model


def lightning_trainer(config: Config, timer: WindowTimer) -> L.Trainer:
    """The Trainer ``build()`` makes for ``config``, with Lightning's strategy on one device."""
    tcfg = config.trainer
    return L.Trainer(
        accelerator=tcfg.accelerator,
        devices=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        precision=tcfg.precision,
        max_steps=tcfg.max_steps,
        log_every_n_steps=tcfg.log_every_n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=tcfg.gradient_clip_val,
        deterministic=tcfg.deterministic,
        enable_progress_bar=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the datamodule's sampler follows the global order
        logger=False,
        callbacks=[timer],
        default_root_dir=config.run_dir,
    )


def _fit(side: str, config: Config, timer: WindowTimer) -> None:
    """Train one side; ours as ``python -m lightning_3d.train`` would, with every callback it adds."""
    if side == "ours":
        trainer, module, datamodule = build(config, callbacks=[timer])
        trainer.limit_val_batches = 0  # as on Lightning's side: no validation (it would compile its own graphs)
    else:
        trainer = lightning_trainer(config, timer)
        module = CompiledShardedLM(config)
        datamodule = TextDataModule(config.data, vocab_size=config.model.vocab_size, seed=config.seed)
    trainer.fit(module, datamodule=datamodule)


def logged_mfu(run_dir: str) -> Optional[float]:
    """The last ``train/device/mfu`` our PerformanceMonitor logged (its own window and clock), if any."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with path.open() as handle:
        values = [row["train/device/mfu"] for row in csv.DictReader(handle) if row.get("train/device/mfu")]
    return float(values[-1]) if values else None


def _loss_of(side: str) -> Callable[[L.LightningModule], Tensor]:
    if side == "ours":
        return lambda module: module.train_loss.compute()  # the step's global loss, before CausalLM resets it
    return lambda module: module.last_loss


def measure_side(side: str, config: Config, warmup: int, steps: int, device: torch.device, peak: float) -> dict[str, Any]:
    """Train ``side`` for ``warmup + steps + 1`` steps; its throughput, MFU, peak memory and losses."""
    timer = WindowTimer(warmup, steps, _loss_of(side))
    _reset_peak_memory(device)
    started = time.perf_counter()
    _fit(side, config, timer)
    tokens_per_step = config.data.global_batch_size * config.data.seq_len
    tokens_per_s = steps * tokens_per_step / timer.window_s
    result = {
        "tokens_per_s": tokens_per_s,
        "mfu": mfu(tokens_per_s, config.model, config.data.seq_len, peak),
        "step_s": timer.window_s / steps,
        "peak_memory_gib": peak_memory_bytes(device) / _GIB,
        "startup_s": timer.marks[0] - started,
        "losses": timer.losses,
        "flops_per_token": flops_per_token(config.model, config.data.seq_len),
    }
    if side == "ours":
        result["monitor_mfu"] = logged_mfu(config.run_dir)
    torch.compiler.reset()  # the next side compiles its own blocks
    release_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def resolve_peak(device_name: str, precision: str, override: Optional[float]) -> float:
    """One device's dense peak FLOP/s at the run's precision; looked up before anything trains."""
    peak = peak_flops(device_name, precision, override)
    if peak is None or peak <= 0:
        raise ConfigError(
            f"no peak FLOP/s known for {device_name!r} at precision {precision} (got {peak}): pass --peak-flops "
            "(the device's dense peak for that precision, e.g. 989e12 for an H100 SXM in bf16)"
        )
    return peak


def run(smoke: bool, warmup: int, steps: int, overrides: list[str], peak_override: Optional[float] = None) -> dict[str, Any]:
    """Both sides, one after the other; the per-side figures and the ratio."""
    if warmup < 1 or steps < 1:
        raise ConfigError(f"--warmup={warmup} and --steps={steps} must both be >= 1 (the first step compiles: it is never timed)")
    if not smoke and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU here: this benchmark needs one (python -m lightning_3d.bench.gpu --smoke runs its code on CPU)")
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    base = SMOKE_OVERRIDES if smoke else GPU_OVERRIDES
    if smoke and peak_override is None:
        peak_override = SMOKE_PEAK_FLOPS
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # one more step than timed: the window closes at the start of the step after the last timed one
        every = [*base, f"trainer.max_steps={warmup + steps + 1}", *([f"perf.peak_flops={peak_override}"] if peak_override else []), *overrides]
        configs = {side: compose_config(Path(tmp) / side, every, devices=1) for side in SIDES}
        precision = configs["ours"].trainer.precision
        # the peak our PerformanceMonitor uses too
        peak = resolve_peak(device_name, precision, configs["ours"].perf.peak_flops)
        result: dict[str, Any] = {"smoke": smoke, "warmup": warmup, "steps": steps, "overrides": overrides,
                                  "device": device_name, "precision": precision, "peak_flops": peak}
        for side in SIDES:
            result[side] = measure_side(side, configs[side], warmup, steps, device, peak)
    shutdown_distributed()
    result["ratio"] = result["ours"]["tokens_per_s"] / result["lightning"]["tokens_per_s"]
    result["wall_s"] = time.perf_counter() - started
    return result


def report(result: dict[str, Any]) -> list[str]:
    """The printed lines: ``NAME side value``, then the ratio."""
    lines = [f"device {result['device']}, precision {result['precision']}, peak {result['peak_flops']:.4g} FLOP/s, "
             f"{result['warmup']} warm-up + {result['steps']} timed steps per side"]
    for key, name, form in (("tokens_per_s", "TOKENS_PER_S", ".1f"), ("mfu", "MFU", ".4g"), ("step_s", "STEP_S", ".4f"),
                            ("peak_memory_gib", "PEAK_MEMORY_GIB", ".3f"), ("startup_s", "STARTUP_S", ".1f")):
        lines += [f"{name} {side} {result[side][key]:{form}}" for side in SIDES]
        if key == "mfu" and result["ours"].get("monitor_mfu") is not None:
            lines.append(f"MFU ours_monitor {result['ours']['monitor_mfu']:.4g}")
    lines += [f"LOSSES {side} " + " ".join(f"{loss:.6f}" for loss in result[side]["losses"]) for side in SIDES]
    lines.append(f"RATIO {RATIO_NAME} {result['ratio']:.3f}")
    lines.append(f"wall time {result['wall_s']:.0f} s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides (key=value, as on the training CLI)")
    parser.add_argument("--smoke", action="store_true", help="run on CPU with the debug model (checks the code, not the speed)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 5; --smoke: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default: 30; --smoke: 3)")
    parser.add_argument("--peak-flops", type=float, default=None, help="the device's dense peak FLOP/s for MFU (default: its table entry)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
    steps = args.steps if args.steps is not None else (3 if args.smoke else 30)
    try:
        result = run(args.smoke, warmup, steps, args.overrides, args.peak_flops)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for line in report(result):
        print(line, flush=True)
    if not all(math.isfinite(loss) for side in SIDES for loss in result[side]["losses"]):
        raise SystemExit("a loss is not finite: the figures above are not from a healthy run")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
