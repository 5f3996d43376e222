"""Our strategy against Lightning's own ``ModelParallelStrategy`` on the same 2D layout.

    python -m lightning_3d.bench.vs_lightning [--steps 12] [--rounds 3] [--warmup 3] [OVERRIDE ...]

One launch of 4 CPU processes (gloo) runs two Trainers in the same process group, taking
turns step by step (:mod:`lightning_3d.bench.turns`), ``rounds`` times; both train the
``tiny`` model on the same batches with the same optimizer (AdamW, warmup-cosine LR,
gradient clipping at 1.0):

- ours: ``build()`` of the ``tiny`` recipe with ``parallel.tp=2 parallel.pp=1`` (FSDP2
  ``dp_shard=2`` × tensor parallel ``tp=2``, sequence parallel on);
- Lightning's: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)`` and a
  LightningModule whose ``configure_model`` does what its user writes by hand: the same
  tensor-parallel styles as ``lightning_3d/plans/llama.py`` with ``parallelize_module``,
  then ``fully_shard`` per block and on the root. Its weights start from the same full
  tensors as ours (each drawn from a generator seeded by the run's seed and the
  parameter's name), so the losses can be compared step by step.

What still differs, by design: ours logs the global token-weighted loss and checks the loss
and the gradient norm for non-finite values on every rank, all in the one all-reduce its
step runs besides the parallelisms' own; theirs logs each rank's own loss. Both keep the
embedding and the final norm + head in the root FSDP unit (ours because each is smaller than
a block) and clip the gradients by their global norm.

Overrides given on the command line apply to our side only: ``perf.dp_unit_min_mb=25``
groups the blocks into FSDP2 units of at least 25 MiB (the whole ``tiny`` model in one unit),
which a hand-written ``configure_model`` could do too but rarely does.

Prints ``RATIO vs_lightning_model_parallel`` = our steps/s ÷ theirs: the median, over the
step pairs after ``warmup`` steps, of their step time ÷ ours.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from typing_extensions import override

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import (
    StepTimer,
    add_turn_ratios,
    bench_overrides,
    compose_config,
    initialized_model,
)
from lightning_3d.bench.turns import TurnTimer, fit_in_turns
from lightning_3d.config import Config
from lightning_3d.data import TextDataModule
from lightning_3d.models.llama import Transformer
from lightning_3d.module import adamw_with_schedule

MODULE = "lightning_3d.bench.vs_lightning"
DP, TP = 2, 2


class HandParallelizedLM(L.LightningModule):
    """The same model for Lightning's ``ModelParallelStrategy``, parallelized by hand in ``configure_model``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.model: Optional[Transformer] = None
        self.last_loss: Optional[Tensor] = None

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = initialized_model(self.config)
        tp_mesh, dp_mesh = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
        sequence = Shard(1)  # the residual stream between blocks is sharded on the sequence dim
        block_plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(sequence, None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=sequence),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(sequence,), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=sequence),
        }
        for block in model.layers.values():
            parallelize_module(block, tp_mesh, block_plan)
        parallelize_module(
            model,
            tp_mesh,
            {
                "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=sequence),
                "norm": SequenceParallel(),
                "output": ColwiseParallel(input_layouts=sequence, output_layouts=Replicate()),
            },
        )
        for block in model.layers.values():
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        self.model = model

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.last_loss = loss.detach()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        # torch's AdamW, as Lightning's users write it
        optimizer, schedule = adamw_with_schedule(
            self.parameters(), self.config.optim, self.trainer.max_steps, shard_local=False
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def lightning_trainer(config: Config, timer: StepTimer) -> L.Trainer:
    """The Trainer ``build()`` makes for ``config``, with Lightning's strategy instead of ours."""
    tcfg = config.trainer
    return L.Trainer(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=ModelParallelStrategy(data_parallel_size=DP, tensor_parallel_size=TP),
        precision=tcfg.precision,
        max_steps=tcfg.max_steps,
        log_every_n_steps=tcfg.log_every_n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=tcfg.gradient_clip_val,
        deterministic=tcfg.deterministic,
        enable_progress_bar=tcfg.enable_progress_bar,
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the datamodule's sampler follows the global order
        logger=CSVLogger(save_dir=config.run_dir, name="", version=""),
        callbacks=[timer],
        default_root_dir=config.run_dir,
    )


def _fit_ours(config: Config, timer: TurnTimer) -> None:
    from lightning_3d.train import build

    trainer, model, datamodule = build(config, callbacks=[timer])
    trainer.fit(model, datamodule=datamodule)


def _fit_lightning(config: Config, timer: TurnTimer) -> None:
    datamodule = TextDataModule(config.data, vocab_size=config.model.vocab_size, seed=config.seed)
    lightning_trainer(config, timer).fit(HandParallelizedLM(config), datamodule=datamodule)


def _worker(out: Path, steps: int, rounds: int, warmup: int, ours_overrides: list[str]) -> None:
    from lightning_3d.train import shutdown_distributed

    overrides = bench_overrides(steps) + [f"parallel.tp={TP}", "parallel.pp=1", "parallel.dp_shard=-1"]
    result: dict[str, Any] = {"ours": [], "lightning": []}
    for index in range(rounds):
        run_dir = out.parent / f"round_{index}"
        timers = fit_in_turns(
            ("ours", lambda timer: _fit_ours(compose_config(run_dir / "ours", overrides + ours_overrides), timer)),
            ("lightning", lambda timer: _fit_lightning(compose_config(run_dir / "lightning", overrides), timer)),
            # each rank's loss is the mean over its own batch; averaged over the ranks after training
            second_loss=lambda module: float(module.last_loss),
        )
        for side, timer in timers.items():
            result[side].append(timer.step_times[warmup:])
            result.setdefault("losses", {}).setdefault(side, timer.losses)
    # equal tokens per rank: the global mean loss is the mean of the ranks' means
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result["losses"]["lightning"])
    result["losses"]["lightning"] = torch.tensor(gathered, dtype=torch.float64).mean(0).tolist()
    result["threads"] = torch.get_num_threads()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    shutdown_distributed()


def run(steps: int, rounds: int, warmup: int, ours_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Launch the worker on 4 processes; add the per-step and median ratios. ``ours_overrides``
    (Hydra overrides) apply to our side only."""
    result = run_workers(MODULE, DP * TP, "--steps", str(steps), "--rounds", str(rounds), "--warmup", str(warmup), *ours_overrides)
    return add_turn_ratios(result, "lightning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for our side only")
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.steps, args.rounds, args.warmup, args.overrides)
        return
    result = run(args.steps, args.rounds, args.warmup, args.overrides)
    print(f"median step time: ours {result['ours_step_s'] * 1e3:.0f} ms, Lightning's {result['lightning_step_s'] * 1e3:.0f} ms")
    for step, (ours, theirs) in enumerate(zip(result["losses"]["ours"], result["losses"]["lightning"])):
        print(f"step {step}: loss ours {ours:.6f}, Lightning's {theirs:.6f}")
    print(f"RATIO vs_lightning_model_parallel {result['ratio']:.3f}")


if __name__ == "__main__":
    main()
