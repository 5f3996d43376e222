"""Batch conventions on 2 ranks, several cases in one process group; launched by torchrun.

usage: torchrun --nproc-per-node 2 tests/batch_conventions_worker.py OUT_DIR CORPUS_DIR
Rank 0 writes OUT_DIR/results.pt: {case: what every rank recorded}.

- ``data_accumulate{1,4}`` (dp_shard=2): the text data module's training and validation
  batch sizes, the validation samples and their token-loss sums, after one optimizer step.
- ``cp1_reference`` (dp_shard=2, both ranks given the same batches, so the global loss is
  one rank's), ``cp2_whole``, ``cp2_named``, ``cp2_unnamed`` (cp=2): a small decoder fed
  per-token features (batch, seq, 4) and, in some cases, a per-sample style (batch, 6).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_3d.config import DataConfig, ModelConfig, ParallelConfig
from lightning_3d.data import TextDataModule
from lightning_3d.loss import cross_entropy_sum, token_weighted_loss
from lightning_3d.models.llama import RMSNorm, TransformerBlock
from lightning_3d.plans import ParallelPlan
from lightning_3d.strategy import ModelParallel4DStrategy
from lightning_3d.train import shutdown_distributed

CONFIG = ModelConfig(n_layers=2, dim=32, n_heads=4, vocab_size=512)
FEATURES, STYLE, SEQ_LEN = 4, 6, 16


class FeatureDecoder(nn.Module):
    """Token embeddings plus projected per-token features and a per-sample style, then Llama blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.features = nn.Linear(FEATURES, config.dim, bias=False)
        self.style = nn.Linear(STYLE, config.dim, bias=False)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(config) for i in range(config.n_layers)})
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens: Tensor, features: Tensor, style: Tensor) -> Tensor:
        h = self.tok_embeddings(tokens) + self.features(features) + self.style(style)[:, None]
        for block in self.layers.values():
            h = block(h, None)  # positions: the attention's own (cp-aware) default
        return self.output(self.norm(h))


class FeatureLM(L.LightningModule):
    """Not the project's CausalLM: its own model, batch layout and steps; records what it sees."""

    def __init__(self, context_parallel_keys: Any = ()) -> None:
        super().__init__()
        self.context_parallel_keys = context_parallel_keys
        self.model: FeatureDecoder | None = None
        self.train_losses: list[float] = []
        self.seen: list[dict[str, Any]] = []
        self.val_seen: list[dict[str, Any]] = []

    def configure_model(self) -> None:
        if self.model is None:
            self.model = FeatureDecoder(CONFIG)

    def parallel_plan(self, parallel: ParallelConfig) -> ParallelPlan:
        return ParallelPlan(root="model", blocks="layers", attention="attention")

    def init_parameter(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        if name.endswith("norm.weight"):
            full.fill_(1.0)
        else:
            full.normal_(0.0, 0.02, generator=generator)

    def _logits(self, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        # batches of the text data module carry no features: zeros keep every weight in use
        features = batch.get("token_features", torch.zeros(*ids.shape, FEATURES))
        style = batch.get("style", torch.zeros(ids.shape[0], STYLE))
        return self.model(ids, features, style)

    def _record(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        record = {key: tuple(value.shape) for key, value in batch.items()}
        if "token_features" in batch:
            # each token's features are built from its id: still together after the cut?
            record["aligned"] = torch.equal(batch["token_features"][..., 0], batch["input_ids"].float() / CONFIG.vocab_size)
        return record

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self.seen.append(self._record(batch))
        loss_mesh = self.trainer.strategy.meshes["loss"]
        loss, global_loss, _ = token_weighted_loss(self._logits(batch), batch["labels"], loss_mesh)
        self.train_losses.append(float(global_loss))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        record = self._record(batch)
        record["rows"] = batch["input_ids"].tolist()
        record["loss_sum"] = float(cross_entropy_sum(self._logits(batch), batch["labels"]))
        record["tokens"] = batch["labels"].numel()
        self.val_seen.append(record)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def feature_batches(samples: int, style: bool) -> list[dict[str, Tensor]]:
    """Samples with per-token features whose first column is the token id / vocab size."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(samples):
        window = torch.randint(0, CONFIG.vocab_size, (SEQ_LEN + 1,), generator=generator)
        features = torch.randn(SEQ_LEN, FEATURES, generator=generator)
        features[:, 0] = window[:-1].float() / CONFIG.vocab_size
        sample = {"input_ids": window[:-1], "labels": window[1:], "token_features": features}
        if style:
            sample["style"] = torch.randn(STYLE, generator=generator)
        out.append(sample)
    return out


def trainer(strategy: ModelParallel4DStrategy, **options: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def strategy(**sizes: int) -> ModelParallel4DStrategy:
    # short timeouts: a rank left waiting in a collective fails the test instead of hanging it
    return ModelParallel4DStrategy(init_timeout_s=120.0, timeout_s=60.0, **sizes)


def data_case(accumulate: int, corpus: Path) -> dict[str, Any]:
    config = DataConfig(source="files", paths=[str(corpus)], seq_len=SEQ_LEN, global_batch_size=8, val_fraction=0.25, val_batches=2)
    module = FeatureLM()
    # one optimizer step, then the validation at the epoch's end
    run = trainer(strategy(dp_shard=2), accumulate_grad_batches=accumulate, limit_train_batches=accumulate)
    run.fit(module, datamodule=TextDataModule(config, vocab_size=CONFIG.vocab_size, seed=1))
    return {"train": module.seen, "val": module.val_seen}


def cp_case(sizes: dict[str, int], keys: Any, style: bool) -> dict[str, Any]:
    module = FeatureLM(keys)
    samples = feature_batches(6, style)
    run = trainer(strategy(**sizes), use_distributed_sampler=False, limit_val_batches=2)
    # every rank loads the same batches: under dp_shard=2 the global loss is then one rank's
    error = None
    try:
        run.fit(module, DataLoader(samples, batch_size=2), DataLoader(samples, batch_size=2))
    except Exception as caught:  # recorded, so that each case's test tells what went wrong
        error = {"type": type(caught).__name__, "message": str(caught)}
    return {
        "error": error,
        "losses": module.train_losses,
        "train": module.seen,
        "val": module.val_seen,
        "global_step": run.global_step,
    }


CASES = {
    "data_accumulate1": lambda corpus: data_case(1, corpus),
    "data_accumulate4": lambda corpus: data_case(4, corpus),
    "cp1_reference": lambda corpus: cp_case({"dp_shard": 2}, (), style=True),
    "cp2_whole": lambda corpus: cp_case({"cp": 2, "dp_shard": 1}, {"token_features": 1, "style": None}, style=True),
    "cp2_named": lambda corpus: cp_case({"cp": 2, "dp_shard": 1}, ["token_features"], style=False),
    "cp2_unnamed": lambda corpus: cp_case({"cp": 2, "dp_shard": 1}, (), style=False),
}


def main() -> None:
    out_dir, corpus = Path(sys.argv[1]), Path(sys.argv[2])
    results = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        record = case(corpus)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, record)  # also proves no rank is left inside a collective
        results[name] = gathered
    if dist.get_rank() == 0:
        torch.save(results, out_dir / "results.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
