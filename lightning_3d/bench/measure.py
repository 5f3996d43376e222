"""What the benchmark suite's workers measure, and the configs and baselines they share.

- :class:`StepTimer`: ``time.perf_counter()`` at the start of every training batch and the
  loss after it; a step lasts from its start to the next step's start, so data loading,
  logging and every callback count, as they would in a plain loop.
- the RSS high-water mark of this process, reset between runs that share one process
  (read with ``lightning_3d.callbacks.performance.peak_memory_bytes``);
- the bytes of this rank's local shards of parameters, gradients and optimizer states;
- for the hand-written baselines: the reference model with the strategy's initial weights,
  (their optimizer is :func:`lightning_3d.module.adamw_with_schedule`, as CausalLM's).
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_3d.config import Config
from lightning_3d.models.llama import Transformer, init_parameter
from lightning_3d.parallel.materialize import materialize


def causal_lm_loss(module: L.LightningModule) -> float:
    """The global train loss of the step that just ran (before ``CausalLM`` logs and resets it)."""
    return float(module.train_loss.compute())


class StepTimer(Callback):
    """Records ``perf_counter()`` when each training batch starts and, after each, its loss.

    ``loss_of(module)`` reads the step's loss at the end of the batch (no collective, so the
    logging frequency of the run stays what its config says).
    """

    def __init__(self, loss_of: Callable[[L.LightningModule], float] = causal_lm_loss) -> None:
        self.loss_of = loss_of
        self.starts: list[float] = []
        self.losses: list[float] = []

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(self.loss_of(pl_module))


def steady_step_times(starts: list[float], warmup: int) -> list[float]:
    """Start-to-next-start intervals, the first ``warmup`` steps left out."""
    return [later - earlier for earlier, later in zip(starts, starts[1:])][warmup:]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def add_turn_ratios(result: dict[str, Any], other: str) -> dict[str, Any]:
    """Ours against ``other`` from the per-round step times the two sides took in turns:
    ``step_ratios`` (steps/s ours ÷ steps/s theirs = their step time ÷ ours, step pair by step
    pair), their median ``ratio``, each side's median step time (``ours_step_s``,
    ``<other>_step_s``) and the median extra time per step (``extra_s_per_step``)."""
    ours = [t for times in result["ours"] for t in times]
    theirs = [t for times in result[other] for t in times]
    result["step_ratios"] = [b / a for a, b in zip(ours, theirs)]
    result["ratio"] = median(result["step_ratios"])
    result["ours_step_s"], result[f"{other}_step_s"] = median(ours), median(theirs)
    result["extra_s_per_step"] = median(a - b for a, b in zip(ours, theirs))
    return result


def compose_config(run_dir: Path, overrides: list[str], devices: Optional[int] = None) -> Config:
    """The CLI's config for these overrides, sized to ``devices`` processes on one node, or by
    default to the torchrun world this process is in."""
    from hydra import compose, initialize_config_dir

    from lightning_3d.train import CONF_DIR, to_config

    local_world = devices or int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = 1 if devices else int(os.environ["WORLD_SIZE"]) // local_world
    base = [f"run_dir={run_dir}", f"trainer.devices={local_world}", f"trainer.num_nodes={nodes}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_config(compose(config_name="config", overrides=[*base, *overrides]))


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux), so that ``ru_maxrss`` covers only what follows.

    Lets several runs share one launch and still get a peak each. False where not possible:
    ``ru_maxrss`` then covers the whole process lifetime.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    """Resident set size now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so that the next run's
    peak RSS is not inflated by what the previous run left in the allocator."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _local_bytes(tensor: Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def local_state_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of this rank's local shards of the parameters, gradients and optimizer states."""
    params = list(module.parameters())
    states = [value for opt in optimizers for state in opt.state.values() for value in state.values()]
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(v) for v in states if isinstance(v, Tensor)),
    }


class LocalStateProbe(Callback):
    """:func:`local_state_bytes` at the end of the last training step, while the gradients still exist."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == trainer.max_steps:
            self.bytes = local_state_bytes(pl_module, trainer.optimizers)


# ----------------------------------------------------------------------------- the baselines' model and optimizer


def initialized_model(config: Config) -> Transformer:
    """The model our strategy trains, with the same initial weights (each full tensor drawn from a
    generator seeded by the run's seed and the parameter's name, as the strategy does)."""
    with torch.device("meta"):
        model = Transformer(config.model)

    def fill(name: str, full: Tensor, generator: torch.Generator) -> None:
        init_parameter(config.model, name.removeprefix("model."), full, generator)

    # named as the strategy names them: CausalLM keeps the model under "model"
    materialize(model, "model", torch.device("cpu"), fill, config.seed)
    return model


def bench_overrides(steps: int) -> list[str]:
    """The ``tiny`` recipe for ``steps`` steps; no checkpoint, no progress bar, one validation batch
    at the end (after the timed steps)."""
    return [
        "recipe=tiny",
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=null",
        "trainer.enable_progress_bar=false",
        "data.val_batches=1",
        "checkpoint.every_n_steps=null",
    ]
