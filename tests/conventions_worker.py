"""Lightning conventions under the strategy, with a user's own small language model (not CausalLM).

usage: torchrun ... tests/conventions_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case name": {"layout": {...strategy keywords}, "kind": "..."}}. Each case runs in
this process group; rank 0 writes OUT_DIR/<name>.pt with what the case observed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from case_harness import run_cases
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
from torch.utils.data import DataLoader
from torchmetrics.aggregation import SumMetric

from lightning_3d.config import ParallelConfig
from lightning_3d.loss import token_weighted_loss
from lightning_3d.plans import ParallelPlan
from lightning_3d.strategy import ModelParallel4DStrategy

VOCAB, DIM, SEQ = 32, 16, 8


class MixerBlock(nn.Module):
    """A residual MLP over each token (no attention: the model is a user's own toy)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(DIM, hidden)
        self.down = nn.Linear(hidden, DIM)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(torch.relu(self.up(x)))


class ToyLM(nn.Module):
    def __init__(self, n_blocks: int, hidden: int, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleDict({str(i): MixerBlock(hidden) for i in range(n_blocks)})
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) if self.embed is not None else tokens  # a later pipeline stage gets activations
        for block in self.blocks.values():
            x = block(x)
        return self.head(x) if self.head is not None else x


class ToyLit(L.LightningModule):
    """Logs what the tests look at: a constant, a per-stage value, a torchmetrics sum, an all_gather."""

    def __init__(
        self, n_blocks: int = 4, hidden: int = 32, tied: bool = False, slow_save_s: float = 0.0, slow_val_s: float = 0.0
    ) -> None:
        super().__init__()
        self.sizes = {"n_blocks": n_blocks, "hidden": hidden, "tied": tied}
        self.slow_save_s, self.slow_val_s = slow_save_s, slow_val_s
        self.model: Optional[ToyLM] = None
        self.count = SumMetric()
        self.gathered: list[list[int]] = []
        self.test_losses: list[float] = []
        self.val_losses: list[float] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = ToyLM(**self.sizes)

    def parallel_plan(self, parallel: ParallelConfig) -> ParallelPlan:
        return ParallelPlan(
            root="model", blocks="blocks", block_tp={"up": ColwiseParallel(), "down": RowwiseParallel()},
            first_stage=["embed"], last_stage=["head"],
        )

    def init_parameter(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        full.normal_(0.0, 0.2, generator=generator)

    def _pp_rank(self) -> int:
        return self.trainer.strategy.meshes["pp"].get_local_rank()

    def _log_conventions(self) -> None:
        self.log("ones", 1.0, reduce_fx="sum", sync_dist=True)
        self.log("stage_value", 10.0 * self._pp_rank() + 1.0, reduce_fx="sum", sync_dist=True)
        self.count.update(10.0 * self._pp_rank() + 1.0)
        self.log("count", self.count, on_step=False, on_epoch=True)
        self.gathered.append(self.all_gather(torch.tensor([float(dist.get_rank())])).flatten().tolist())

    # pipeline parallel: the strategy runs the schedule and hands over the global loss
    def pipeline_batch(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["input_ids"], batch["labels"]

    def record_loss(self, stage: str, loss: Tensor, tokens: Tensor) -> None:
        if stage == "train":
            self._log_conventions()
        else:
            (self.test_losses if stage == "test" else self.val_losses).append(float(loss))

    def _loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        loss_mesh = self.trainer.strategy.meshes["loss"]
        loss, global_loss, _ = token_weighted_loss(self.model(batch["input_ids"]), batch["labels"], loss_mesh)
        return loss, global_loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._log_conventions()
        return self._loss(batch)[0]

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_losses.append(float(self._loss(batch)[1]))

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.test_losses.append(float(self._loss(batch)[1]))

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(batch["input_ids"]).argmax(-1)

    def on_validation_epoch_end(self) -> None:
        if self.global_rank == 0:
            time.sleep(self.slow_val_s)  # a slow metric or callback on one rank at the end of validation
        self.log("val_ones", 1.0, reduce_fx="sum", sync_dist=True)  # the others wait here for rank 0

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.global_rank == 0:
            time.sleep(self.slow_save_s)  # a slow rank between steps (a large save, a slow disk)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader(batch_size: int = 4, batches: int = 4) -> DataLoader:
    """Every rank loads the same batches (the tests only look at what is logged and gathered)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch_size * batches, SEQ + 1), generator=generator)
    samples = [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]
    return DataLoader(samples, batch_size=batch_size)


def trainer_for(layout: dict[str, Any], out_dir: Path, steps: int = 3, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=ModelParallel4DStrategy(**layout),
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
        limit_val_batches=2, default_root_dir=str(out_dir), **kwargs,
    )


def case_logging(layout: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    module = ToyLit()
    trainer = trainer_for(layout, out_dir)
    trainer.fit(module, loader(batches=3))  # the epoch ends with the last step: epoch-level values are logged
    logged = {key: float(value) for key, value in trainer.logged_metrics.items()}
    return {"logged": logged, "gathered": module.gathered[-1]}


def case_after_fit(layout: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """fit, then validate / test / predict with the same trainer, then a new Trainer resumes from a checkpoint."""
    module = ToyLit()
    trainer = trainer_for(layout, out_dir)
    trainer.fit(module, loader(), loader(batches=2))
    result: dict[str, Any] = {"fit_steps": trainer.global_step}
    trainer.validate(module, loader(batches=2), verbose=False)
    result["val_losses"] = list(module.val_losses)
    trainer.test(module, loader(batches=2), verbose=False)
    result["test_losses"] = list(module.test_losses)
    try:
        predictions = trainer.predict(module, loader(batches=1))
        result["predict"] = [p.shape for p in predictions]
    except ValueError as error:
        result["predict_error"] = str(error)
    checkpoint = out_dir / "after_fit.ckpt"
    trainer.save_checkpoint(checkpoint)
    resumed = trainer_for(layout, out_dir, steps=5)
    resumed.fit(module, loader(), ckpt_path=checkpoint)  # the same module, a new Trainer
    result["resumed_steps"] = resumed.global_step
    return result


def case_slow_save(layout: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """After the first step only the step's collectives get parallel.timeout_s: a save that keeps
    rank 0 busy longer than that must not fail on the others."""
    module = ToyLit(slow_save_s=3.0)
    trainer = trainer_for({**layout, "timeout_s": 1.0, "init_timeout_s": 60.0}, out_dir, steps=2)
    trainer.fit(module, loader())
    started = time.perf_counter()
    trainer.save_checkpoint(out_dir / "slow.ckpt")
    return {"saved_after_s": time.perf_counter() - started, "complete": (out_dir / "slow.ckpt" / ".metadata").exists()}


def case_slow_validation(layout: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """A validation after the first step in which rank 0 is busy 3 s, with parallel.timeout_s=1."""
    module = ToyLit(slow_val_s=3.0)
    trainer = trainer_for({**layout, "timeout_s": 1.0, "init_timeout_s": 60.0}, out_dir, steps=3, val_check_interval=2)
    trainer.fit(module, loader(), loader(batches=2))
    return {"steps": trainer.global_step, "val_ones": float(trainer.logged_metrics["val_ones"])}


def case_tied(layout: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """An embedding tied to the head under pipeline parallel: each end's copy of the weight, after training."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = ToyLit(tied=True)
    trainer_for(layout, out_dir, steps=3).fit(module, loader())
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    mine = {key.split(".")[-2]: value.detach().clone() for key, value in state.items() if key.endswith(("embed.weight", "head.weight"))}
    copies: list[dict[str, Tensor]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(copies, mine)
    found = {name: tensor for copy in copies for name, tensor in copy.items()}
    return {"embed": found["embed"], "head": found["head"], "initial_std": 0.2}


def case_bad_module(layout: dict[str, Any], out_dir: Path, module_kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        trainer_for(layout, out_dir, steps=1).fit(ToyLit(**module_kwargs), loader())
    except ValueError as error:
        return {"error": str(error), "type": type(error).__name__}
    return {"error": None}


def run_case(name: str, case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    kind, layout = case["kind"], case["layout"]
    if kind == "bad_module":
        return case_bad_module(layout, out_dir, case["module"])
    cases = {"logging": case_logging, "after_fit": case_after_fit, "tied": case_tied, "slow_save": case_slow_save, "slow_validation": case_slow_validation}
    return cases[kind](layout, out_dir)


if __name__ == "__main__":
    run_cases(run_case)
