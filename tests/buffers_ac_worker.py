"""Train small non-CausalLM modules inside one process group; launched by torchrun from the tests.

usage: torchrun ... tests/buffers_ac_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case name": {"strategy": {ModelParallel4DStrategy options}, "module": {TinyRegressor
options}, "steps": N}, ...}. Rank 0 writes OUT_DIR/<name>.pt with every rank's per-step losses,
every rank's buffers (by canonical name) and the full weights after training.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from conventions_models import TinyRegressor, regression_loader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lightning_3d.parallel.materialize import canonical_name
from lightning_3d.strategy import ModelParallel4DStrategy
from lightning_3d.train import shutdown_distributed


def run_case(name: str, case: dict, out_dir: Path) -> None:
    torch.manual_seed(0)  # every case draws the same dropout masks
    module = TinyRegressor(**case.get("module", {}))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=int(os.environ["WORLD_SIZE"]),  # set by torchrun
        strategy=ModelParallel4DStrategy(**case.get("strategy", {})),
        max_steps=case.get("steps", 4),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, regression_loader())
    weights = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True))
    buffers = {canonical_name(n): b.detach().cpu().clone() for n, b in module.model.named_buffers()}
    gathered = [None] * trainer.world_size
    dist.all_gather_object(gathered, (module.losses, buffers))
    if trainer.global_rank == 0:
        result = {
            "losses": [losses for losses, _ in gathered],
            "buffers": [rank_buffers for _, rank_buffers in gathered],
            "weights": {canonical_name(n): w.detach().cpu().float() for n, w in weights.items()},
        }
        torch.save(result, out_dir / f"{name}.pt")
    trainer.strategy.barrier()


def main() -> None:
    out_dir = Path(sys.argv[1])
    for name, case in json.loads(sys.argv[2]).items():
        run_case(name, case, out_dir)
    shutdown_distributed()


if __name__ == "__main__":
    main()
