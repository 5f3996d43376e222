"""Non-finite steps injected on one rank, several cases in one process group; launched by torchrun.

usage: torchrun ... tests/nonfinite_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case": {"overrides": [...], "inject": {"rank": R, "steps": [k, ...], "what": "loss" | "grad"},
"observe": true, "sigterm": {"rank": R, "batch": b}}}
Rank R makes its loss (or one gradient shard) NaN at those steps. Rank 0 writes OUT_DIR/<case>.json:
the error raised (or null), the logged losses, global_step, the guard's skip counts, and
whether the weights at the end equal the weights before the first injected step. With
``observe``, a callback's ``on_before_optimizer_step`` also records the global norm of the
gradients it sees, next to the norm the strategy agreed on. With ``sigterm``, rank R sends
itself SIGTERM at the start of training batch b. With ``"odd_broadcasts": true``, the callback
of ``python -m lightning_3d.bench.sigterm`` runs Lightning's own SIGTERM broadcast on odd
batches. Every case records each rank's global_step and the number of
``torch.distributed.broadcast`` calls made while training ran.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException
from parity_worker import compose_case, logged_train_losses
from torch.distributed.tensor import DTensor

from lightning_3d.bench.sigterm import BroadcastOnOddBatches
from lightning_3d.module import CausalLM
from lightning_3d.nonfinite import NonFiniteError
from lightning_3d.parallel.grad_clip import local_grad_square_sum
from lightning_3d.train import build, resume_path


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Injection(L.Callback):
    """NaN gradients on one rank at given steps; keeps this rank's weights from before the first one."""

    def __init__(self, rank: int, steps: list[int], what: str) -> None:
        self.rank, self.steps, self.what = rank, steps, what
        self.weights_before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.steps[0] and not self.weights_before:
            self.weights_before = {n: _local(p).detach().clone() for n, p in pl_module.named_parameters()}

    def on_after_backward(self, trainer, pl_module) -> None:
        if self.what == "grad" and trainer.global_rank == self.rank and trainer.global_step in self.steps:
            grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
            _local(grad).view(-1)[0] = float("nan")


class GradientObserver(L.Callback):
    """Reads the gradients where Lightning lets a callback see them: before clipping and the update."""

    def __init__(self) -> None:
        self.seen: list[float] = []  # the global norm of the gradients this hook saw, per step
        self.agreed: list[float] = []  # the strategy's norm for the same step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        square_sum = local_grad_square_sum(list(pl_module.parameters()), trainer.world_size, torch.device("cpu"))
        dist.all_reduce(square_sum)
        self.seen.append(square_sum.sqrt().item())
        self.agreed.append(float(trainer.strategy.last_grad_norm))


class Sigterm(L.Callback):
    """Rank ``rank`` sends itself SIGTERM at the start of training batch ``batch``."""

    def __init__(self, rank: int, batch: int) -> None:
        self.rank, self.batch = rank, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


class BroadcastCounter(L.Callback):
    """Counts ``torch.distributed.broadcast`` calls (any caller) from the start to the end of training."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._original = dist.broadcast

        def counted(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.broadcast = counted

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._original is not None:
            dist.broadcast, self._original = self._original, None


class NaNLossLM(CausalLM):
    """The reference module, whose loss is NaN on one rank at the injected steps."""

    injection: Injection

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        hit = self.injection.what == "loss" and self.global_rank == self.injection.rank
        return loss * float("nan") if hit and self.trainer.global_step in self.injection.steps else loss


def run_case(name: str, spec: dict, out_dir: Path) -> None:
    config = compose_case(out_dir / name, spec["overrides"])
    inject = spec.get("inject")
    injection = Injection(inject["rank"], inject["steps"], inject["what"]) if inject else None
    observer = GradientObserver() if spec.get("observe") else None
    sigterm = Sigterm(**spec["sigterm"]) if spec.get("sigterm") else None
    broadcasts = BroadcastCounter()
    odd_broadcasts = BroadcastOnOddBatches() if spec.get("odd_broadcasts") else None
    callbacks = [c for c in (injection, observer, sigterm, broadcasts, odd_broadcasts) if c is not None]
    trainer, _, datamodule = build(config, callbacks=callbacks)
    model = NaNLossLM(config.model, config.optim)
    model.injection = injection or Injection(-1, [-1], "none")
    error = None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(config))
    except NonFiniteError as raised:
        error = str(raised)
    except SIGTERMException:
        error = "SIGTERMException"
    unchanged = None
    if injection is not None and injection.weights_before:
        now = {n: _local(p).detach() for n, p in model.named_parameters()}
        unchanged = all(torch.equal(now[n], before) for n, before in injection.weights_before.items())
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (error, unchanged, trainer.global_step, broadcasts.calls))
    if trainer.global_rank == 0:
        result = {
            "errors": [v[0] for v in verdicts],
            "unchanged": [v[1] for v in verdicts],
            "losses": logged_train_losses(out_dir / name),
            "global_step": trainer.global_step,
            "global_steps": [v[2] for v in verdicts],
            "broadcasts": [v[3] for v in verdicts],
            "skipped_total": trainer.strategy.nonfinite.skipped_total,
        }
        if observer is not None:
            result |= {"seen_norms": observer.seen, "agreed_norms": observer.agreed}
        (out_dir / f"{name}.json").write_text(json.dumps(result))
    dist.barrier()


def main() -> None:
    out_dir = Path(sys.argv[1])
    for name, spec in json.loads(sys.argv[2]).items():
        run_case(name, spec, out_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
