"""Run several training cases inside one process group; launched by torchrun from the tests.

usage: torchrun ... tests/parity_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case name": [hydra overrides...], ...}. Every case trains through the same
`build()` as the CLI; rank 0 writes OUT_DIR/<name>.pt with the per-step global train
losses, the validation loss and the full (unsharded) weights after training. After the
last case, OUT_DIR/collectives.pt records what the strategy's collectives returned on
every rank.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_3d.train import CONF_DIR, build, to_config


class StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.losses.append(float(trainer.callback_metrics["train_loss"]))


def run_case(name: str, overrides: list[str], out_dir: Path) -> L.Trainer:
    local_world = int(os.environ["LOCAL_WORLD_SIZE"])
    nodes = int(os.environ["WORLD_SIZE"]) // local_world
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"run_dir={out_dir / name}", f"trainer.devices={local_world}", f"trainer.num_nodes={nodes}", *overrides],
        )
    recorder = StepLosses()
    trainer, model, datamodule = build(to_config(cfg), callbacks=[recorder])
    trainer.fit(model, datamodule=datamodule)
    weights = get_model_state_dict(model.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.global_rank == 0:
        result = {
            "losses": recorder.losses,
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "weights": {k: v.float() for k, v in weights.items()},
        }
        torch.save(result, out_dir / f"{name}.pt")
    trainer.strategy.barrier()
    return trainer


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


if __name__ == "__main__":
    main()
