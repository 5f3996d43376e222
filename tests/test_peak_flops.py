"""MFU's denominator: a device's peak at the precision the run trains in, not always the bf16 one."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_3d.callbacks import performance
from lightning_3d.callbacks.performance import PerformanceMonitor
from lightning_3d.flops import peak_flops

H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize(
    "name, precision, tf32, expected",
    [
        (H100, "bf16-mixed", False, 989e12),
        (H100, "bf16-true", False, 989e12),
        (H100, "32-true", False, 66.9e12),
        (H100, "32-true", True, 494.7e12),  # fp32 matmuls on tensor cores
        ("NVIDIA H100 PCIe", "32-true", False, 51.2e12),
        ("NVIDIA A100-SXM4-80GB", "32-true", False, 19.5e12),
        ("NVIDIA A100-SXM4-80GB", "bf16-mixed", False, 312e12),
        ("NVIDIA H200", "bf16-mixed", False, 989e12),
        (H100, "64-true", False, None),  # no column for it: Lightning's table decides
        ("", "bf16-mixed", False, None),  # CPU
    ],
)
def test_peak_depends_on_the_precision(name: str, precision: str, tf32: bool, expected: float) -> None:
    assert peak_flops(name, precision, None, tf32) == expected


def test_override_wins_at_any_precision() -> None:
    assert peak_flops(H100, "32-true", 1e12) == 1e12
    assert peak_flops("", "bf16-mixed", 2e12) == 2e12


class _Tiny(L.LightningModule):
    """Not the project's model: any module with token batches gets the same MFU."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 8)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.layer(batch["input_ids"].float()).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"input_ids": torch.arange(8) % 5} for _ in range(8)], batch_size=2)


@pytest.mark.parametrize("precision, peak", [("32-true", 66.9e12), ("bf16-mixed", 989e12)])
def test_monitor_divides_by_the_peak_of_the_trainer_precision(tmp_path, monkeypatch, precision: str, peak: float) -> None:
    # a CPU run that reads as an H100: the figure must follow the trainer's precision
    monkeypatch.setattr(performance, "_device_name", lambda device: H100, raising=False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    monitor = PerformanceMonitor(flops_per_token=1000)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=3,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="", version=""),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(_Tiny())
    assert monitor.available_flops == peak
    logged = trainer.logged_metrics
    assert float(logged["train/device/mfu"]) == pytest.approx(float(logged["train/device/flops_per_sec"]) / peak)
