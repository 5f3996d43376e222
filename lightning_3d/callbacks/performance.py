"""Per-step performance metrics: tokens/s, FLOP/s, MFU, peak memory per rank, gradient norm.

Built on Lightning's ThroughputMonitor. It counts a run's global throughput as one rank's
× the world size, which holds for pure data parallel only: under tensor, pipeline or
context parallel several ranks work on the same sequences. So each rank's batch is
counted here as its per-device share (sequences × dp / world), which makes the
``device/…`` figures per device and the global ones (× world) the whole job's.

Logged keys (with ``trainer.log_every_n_steps``; rates over the steps since the last log):
``train/items_per_sec`` (tokens/s, whole job; only with > 1 process),
``train/device/items_per_sec`` (tokens/s per device), ``train/device/flops_per_sec``,
``train/device/mfu`` (when the device's peak is known: ``perf.peak_flops``, else the GPU table in
:mod:`lightning_3d.flops` for the trainer's precision, else Lightning's ``get_available_flops``),
``memory/peak_gib_max`` and
``memory/peak_gib_min`` over ranks, ``grad_norm`` (before clipping).
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_3d.flops import peak_flops

_GIB = 2**30


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: allocated device memory on CUDA, resident set size (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib_or_bytes if sys.platform == "darwin" else kib_or_bytes * 1024  # Linux reports KiB


class PerformanceMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for any parallel layout, plus memory and gradient norm.

    Args:
        flops_per_token: training FLOPs of one token (``lightning_3d.flops.flops_per_token``);
            None: use the LightningModule's ``flops_per_batch``, if it has one.
        peak_flops: one device's peak FLOP/s for MFU; None: the known-GPU table at the trainer's
            precision (bf16 → bf16 peak, 32-true → fp32 or tf32 peak), else Lightning's table (no MFU on CPU).
        tokens_key: the batch entry holding the ``(sequences, seq_len)`` token ids.
    """

    def __init__(self, flops_per_token: Optional[int] = None, peak_flops: Optional[float] = None, tokens_key: str = "input_ids") -> None:
        super().__init__(batch_size_fn=self._sequences, length_fn=self._tokens)
        self.flops_per_token = flops_per_token
        self.peak_override = peak_flops
        self.tokens_key = tokens_key
        self._device_share = 1.0  # dp / world: the part of a rank's batch that is this device's own
        self.peak_memory_per_rank: list[int] = []  # bytes, refreshed at every logging step

    def _sequences(self, batch: Any) -> float:
        return batch[self.tokens_key].shape[0] * self._device_share

    def _tokens(self, batch: Any) -> float:
        return batch[self.tokens_key].numel() * self._device_share

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # a rate over exactly the steps since the previous log
        self.kwargs["window_size"] = max(2, trainer.log_every_n_steps * trainer.accumulate_grad_batches + 1)
        super().setup(trainer, pl_module, stage)
        meshes = getattr(trainer.strategy, "meshes", None)
        data_parallel = meshes["dp"].size() if meshes else trainer.world_size  # other strategies: pure DP
        self._device_share = data_parallel / trainer.world_size
        # fp32 matmuls run on tensor cores (tf32) unless the float32 matmul precision is "highest"
        tf32 = torch.get_float32_matmul_precision() != "highest"
        peak = peak_flops(_device_name(trainer.strategy.root_device), str(trainer.precision), self.peak_override, tf32)
        if peak is not None:  # else keep Lightning's own figure for this device and precision
            self.available_flops = peak
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops

    def _set_flops_per_batch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, training: bool) -> None:
        if self.flops_per_token is not None:
            # the whole job's FLOPs for this batch (ThroughputMonitor divides by the world size);
            # a forward pass alone is a third of forward + backward
            per_token = self.flops_per_token if training else self.flops_per_token / 3
            pl_module.flops_per_batch = per_token * self._tokens(batch) * trainer.world_size

    @override
    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._set_flops_per_batch(trainer, pl_module, batch, training=False)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._set_flops_per_batch(trainer, pl_module, batch, training=True)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return
        grad_norm = getattr(trainer.strategy, "last_grad_norm", None)
        if grad_norm is not None:
            pl_module.log("grad_norm", grad_norm, sync_dist=False)
        self.peak_memory_per_rank = _gather_peaks(peak_memory_bytes(trainer.strategy.root_device), trainer.strategy.root_device)
        pl_module.log("memory/peak_gib_max", max(self.peak_memory_per_rank) / _GIB, sync_dist=False)
        pl_module.log("memory/peak_gib_min", min(self.peak_memory_per_rank) / _GIB, sync_dist=False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.peak_memory_per_rank:
            ranks = ", ".join(f"{rank}: {value / _GIB:.2f}" for rank, value in enumerate(self.peak_memory_per_rank))
            kind = "allocated" if trainer.strategy.root_device.type == "cuda" else "RSS"
            rank_zero_info(f"peak memory per rank (GiB, {kind}): {ranks}")


def _gather_peaks(peak: int, device: torch.device) -> list[int]:
    """Every rank's peak, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [peak]
    gathered = torch.empty(dist.get_world_size(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(gathered, torch.tensor([float(peak)], dtype=torch.float64, device=device))
    return [int(value) for value in gathered.tolist()]
