"""Small LightningModules that plug into the strategy the way a user's own module would.

None of them is the project's ``CausalLM``: they exercise the conventions (model built in
``configure_model()``, a ``parallel_plan()``, ``init_parameter()``) on a different
architecture — a residual regression net — with the features the reference model lacks:
buffers (one persistent, one not) and dropout.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.utils.data import DataLoader

from lightning_3d.config import ParallelConfig
from lightning_3d.plans import ParallelPlan


class Block(nn.Module):
    """Residual MLP block; its input is scaled and shifted by two buffers before the MLP."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)
        # computed by the model's code, like a rotary inv_freq: one saved in state_dict, one not
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim))
        self.register_buffer("shift", 0.1 * torch.cos(0.3 * torch.arange(dim, dtype=torch.float32)), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.down(torch.tanh(self.up(x * self.scale + self.shift))))


class TinyNet(nn.Module):
    """``inp`` → blocks (an ``nn.ModuleDict``) → ``head``: one scalar per sample."""

    def __init__(self, dim: int = 16, hidden: int = 32, n_blocks: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleDict({str(i): Block(dim, hidden, dropout) for i in range(n_blocks)})
        self.head = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks.values():
            x = block(x)
        return self.head(x).squeeze(-1)


class TinyRegressor(L.LightningModule):
    """Mean squared error of :class:`TinyNet` on batches ``{"x": (B, dim), "y": (B,)}``.

    ``losses`` collects this rank's training loss of every step (for tests to compare).
    """

    def __init__(self, dim: int = 16, hidden: int = 32, n_blocks: int = 3, dropout: float = 0.0, lr: float = 0.01) -> None:
        super().__init__()
        self.sizes = {"dim": dim, "hidden": hidden, "n_blocks": n_blocks, "dropout": dropout}
        self.lr = lr
        self.model: TinyNet | None = None
        self.losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = TinyNet(**self.sizes)

    def parallel_plan(self, parallel: ParallelConfig) -> ParallelPlan:
        return ParallelPlan(root="model", blocks="blocks", block_tp={"up": ColwiseParallel(), "down": RowwiseParallel()})

    def init_parameter(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        if full.dim() == 2:
            full.normal_(0.0, full.shape[1] ** -0.5, generator=generator)
        else:
            full.uniform_(-0.1, 0.1, generator=generator)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = nn.functional.mse_loss(self.model(batch["x"]), batch["y"])
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_loader(samples: int = 64, dim: int = 16, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """A fixed, unshuffled regression set: the same batches on every run."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, dim, generator=generator)
    y = torch.sin(x.sum(-1))
    return DataLoader([{"x": x[i], "y": y[i]} for i in range(samples)], batch_size=batch_size)
