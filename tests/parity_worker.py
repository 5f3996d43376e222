"""Run several training cases inside one process group; launched by torchrun from the tests.

usage: torchrun ... tests/parity_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case name": [hydra overrides...], ...}. Every case trains through the same
`build()` and `resume_path()` as the CLI; rank 0 writes OUT_DIR/<name>.pt with the per-step
global train losses, the validation loss, the full (unsharded) weights and optimizer
states after training (under the unsplit model's names) and the logits of a fixed input
when the layout has no pipeline. After the last case, OUT_DIR/collectives.pt records what
the strategy's collectives returned on every rank.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from lightning_3d.bench.measure import compose_config
from lightning_3d.config import Config
from lightning_3d.train import build, resume_path, shutdown_distributed

FULL = StateDictOptions(full_state_dict=True)
FULL_FLAT = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)


def logged_train_losses(run_dir: Path) -> list[float]:
    """Per-step train losses as the run logged them (the debug recipe logs every step)."""
    if not (run_dir / "metrics.csv").exists():  # nothing trained (e.g. resumed at max_steps)
        return []
    with open(run_dir / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train_loss")]
    return [float(row["train_loss"]) for row in sorted(rows, key=lambda row: int(row["step"]))]


# per-step measurements (lightning_3d.callbacks.performance) kept from the last logged row
METRICS = ("train/lengths", "train/samples", "train/device/items_per_sec", "train/items_per_sec",
           "train/device/flops_per_sec", "train/device/mfu", "grad_norm", "memory/peak_gib_max", "lr-AdamW/pg1")


def logged_metrics(run_dir: Path) -> dict[str, float]:
    """The last value each of :data:`METRICS` was logged with."""
    if not (run_dir / "metrics.csv").exists():
        return {}
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: float(row[key]) for row in rows for key in METRICS if row.get(key)}


def compose_case(run_dir: Path, overrides: list[str]) -> Config:
    """The CLI's config for these overrides, sized to the torchrun world this process is in."""
    return compose_config(run_dir, overrides)


def run_case(name: str, overrides: list[str], out_dir: Path) -> L.Trainer:
    config = compose_case(out_dir / name, overrides)
    trainer, model, datamodule = build(config)
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(config))
    # full tensors on every rank; under pipeline parallel each rank holds only its stages
    parts = model.model if isinstance(model.model, torch.nn.ModuleList) else [model.model]
    weights = {}
    for part in parts:
        weights.update(get_model_state_dict(part, options=FULL))
    optimizer = trainer.optimizers[0] if trainer.optimizers else None
    states = trainer.strategy.checkpointer.canonical(get_optimizer_state_dict(model, optimizer, options=FULL_FLAT)) if optimizer else {}
    logits = None
    if trainer.strategy.dims.pp == 1 and trainer.strategy.dims.cp == 1:
        with torch.no_grad():
            logits = model.model(fixed_input(config.model.vocab_size)).float()
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, ({n: t.cpu() for n, t in weights.items()}, {n: _cpu(v) for n, v in states.items()}))
    weights = {name: tensor for part_weights, _ in gathered for name, tensor in part_weights.items()}
    states = {name: value for _, part_states in gathered for name, value in part_states.items()}
    if trainer.global_rank == 0:
        val_loss = trainer.callback_metrics.get("val_loss")
        result = {
            "losses": logged_train_losses(out_dir / name),
            "metrics": logged_metrics(out_dir / name),
            "val_loss": float(val_loss) if val_loss is not None else None,
            "weights": {k: v.float() for k, v in weights.items()},
            "optimizer": states,
            "logits": logits,
            "global_step": trainer.global_step,
        }
        torch.save(result, out_dir / f"{name}.pt")
    trainer.strategy.barrier()
    return trainer


def fixed_input(vocab_size: int) -> torch.Tensor:
    return (torch.arange(32) * 7 % vocab_size)[None]


def _cpu(value):
    return value.cpu() if isinstance(value, torch.Tensor) else value


def record_collectives(trainer: L.Trainer, out_dir: Path) -> None:
    strategy, rank = trainer.strategy, trainer.global_rank
    record = {
        "reduce_sum": float(strategy.reduce(torch.tensor(float(rank)), reduce_op="sum")),
        "reduce_mean": float(strategy.reduce(torch.tensor(float(rank)))),
        "all_gather": strategy.all_gather(torch.tensor([rank])).flatten().tolist(),
        "broadcast": strategy.broadcast({"from": rank}, src=0),
        "sampler": strategy.distributed_sampler_kwargs,
        "mesh_dims": trainer.lightning_module.device_mesh.mesh_dim_names,
    }
    records = [None] * trainer.world_size
    dist.all_gather_object(records, record)
    if rank == 0:
        torch.save(records, out_dir / "collectives.pt")


def main() -> None:
    out_dir = Path(sys.argv[1])
    cases = json.loads(sys.argv[2])
    for name, overrides in cases.items():
        trainer = run_case(name, overrides, out_dir)
    record_collectives(trainer, out_dir)
    shutdown_distributed()


if __name__ == "__main__":
    main()
