"""ZeRO stages on FSDP2, measured: model-state memory and communication per rank against the ZeRO formulas.

    python -m lightning_3d.bench.zero                 # debug model, 4 gloo processes, 3 steps per case
    python -m lightning_3d.bench.zero --steps 4

Each case trains the ``debug`` recipe on 4 CPU processes: DDP-style replicas (``dp_replicate=4``,
stage 0) and ``parallel.zero_stage`` 1, 2, 3 on ``dp_shard=4``, each with every optimizer step
made of 1 and of 2 accumulated micro-batches. In the last step, on rank 0:

- model-state bytes: this rank's parameters, gradients and AdamW states, read from FSDP2's
  own records (sharded and gathered parameters, sharded and unsharded gradients) at the end
  of every unit's forward (before it reshards), after every gradient accumulation, before the
  optimizer step and after it. "peak" is the sample with the largest sum, "at rest" the one
  after the optimizer step. Communication buffers and activations are not model states and
  are not counted;
- the data-parallel wire bytes of the step (``CommCounter``, ``perf.comm_accounting=true``):
  FSDP2's all-gathers and reduce-scatters; for DDP-style replicas the all-reduces, less the
  analytic loss reductions and the step's health check that share their group. Any other
  difference between what was counted and :func:`lightning_3d.comm.expected_step_volume` is
  printed below the table.

Both are given in units of Ψ (the parameter count): bytes/Ψ for memory (fp32: 4 per copy of
the parameters), fp32 words/Ψ for communication, next to the ZeRO paper's formulas and to
:func:`lightning_3d.comm.expected_step_volume`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_3d.bench.launch import run_workers
from lightning_3d.compat import fsdp_parameters

PROCESSES = 4
# (label, ZeRO stage for the formulas, overrides)
CASES = [
    ("DDP-style (stage 0)", 0, ["parallel.dp_replicate=4", "parallel.dp_shard=1"]),
    ("zero_stage=1", 1, ["parallel.dp_shard=4", "parallel.zero_stage=1"]),
    ("zero_stage=2", 2, ["parallel.dp_shard=4", "parallel.zero_stage=2"]),
    ("zero_stage=3", 3, ["parallel.dp_shard=4", "parallel.zero_stage=3"]),
]
ACCUMULATE = (1, 2)


# ----------------------------------------------------------------------------- the ZeRO paper, fp32 AdamW


def zero_memory(stage: int, n: int) -> dict[str, float]:
    """Model-state bytes/Ψ on one of ``n`` ranks: parameters 4, gradients 4, AdamW's two moments 8,
    each divided by n from the stage that partitions it (optimizer states 1, gradients 2, parameters 3)."""
    return {
        "params": 4 / n if stage >= 3 else 4,
        "grads": 4 / n if stage >= 2 else 4,
        "optimizer": 8 / n if stage >= 1 else 8,
    }


def zero_words(stage: int, n: int, accumulate: int) -> float:
    """fp32 words/Ψ one rank sends per optimizer step, ring collectives over ``n`` ranks: a
    reduce-scatter or an all-gather of Ψ moves (n−1)/n·Ψ. Stage 0 and 1 reduce the gradients
    once per step (stage 1 then gathers the updated parameters); stage 2 reduce-scatters on every
    micro-batch and gathers once; stage 3 gathers for every forward and backward and
    reduce-scatters on every micro-batch."""
    per_pass = {0: 2.0, 1: 2.0, 2: accumulate + 1.0, 3: 3.0 * accumulate}[stage]
    return per_pass * (n - 1) / n


# ----------------------------------------------------------------------------- the probe


def model_state_bytes(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
    """This rank's parameters (shards, and gathered copies while they exist), gradients
    (sharded, and unsharded ones while accumulated or not yet reduced) and optimizer states,
    each storage counted once (a gathered parameter may share its shard's storage)."""
    storages: dict[str, dict[int, int]] = {"params": {}, "grads": {}, "optimizer": {}}

    def add(kind: str, tensor: Optional[Tensor]) -> None:
        if tensor is not None:
            storage = (tensor.to_local() if isinstance(tensor, DTensor) else tensor).untyped_storage()
            storages[kind][storage.data_ptr()] = storage.nbytes()  # 0 once FSDP2 freed it

    for sharded, gathered, accumulated in fsdp_parameters(module):
        add("params", sharded)
        add("grads", sharded.grad)
        add("grads", accumulated)
        if gathered is not None:
            add("params", gathered)
            add("grads", gathered.grad)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                add("optimizer", value if isinstance(value, Tensor) else None)
    return {kind: sum(sizes.values()) for kind, sizes in storages.items()}


class ModelStateProbe(Callback):
    """Samples :func:`model_state_bytes` through the last optimizer step (see the module docstring)."""

    def __init__(self) -> None:
        self.peak: dict[str, int] = {}
        self.at_rest: dict[str, int] = {}
        self._module: Optional[torch.nn.Module] = None
        self._optimizers: list[torch.optim.Optimizer] = []
        self._hooked: set[int] = set()
        self._active = False

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._module, self._optimizers = pl_module, trainer.optimizers
        for unit in pl_module.modules():
            if isinstance(unit, FSDPModule):  # before FSDP2's own post-forward reshards the unit
                unit.register_forward_hook(lambda *_: self.sample(), prepend=True)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._active = trainer.global_step == trainer.max_steps - 1
        self.sample()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        self.sample()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._active and trainer.global_step == trainer.max_steps:
            self.at_rest = model_state_bytes(pl_module, self._optimizers)
        self.sample()
        self._active = False

    def sample(self) -> None:
        if not self._active or self._module is None:
            return
        for _, gathered, _ in fsdp_parameters(self._module):
            # gathered parameters are created once and reused: hook each when first seen
            if gathered is not None and id(gathered) not in self._hooked:
                gathered.register_post_accumulate_grad_hook(lambda _: self.sample())
                self._hooked.add(id(gathered))
        now = model_state_bytes(self._module, self._optimizers)
        if sum(now.values()) > sum(self.peak.values()):
            self.peak = now


# ----------------------------------------------------------------------------- one case


def _data_parallel_wire(config: Any, strategy: Any, step: dict) -> tuple[float, float, dict[str, str]]:
    """The step's data-parallel wire bytes as counted and as :func:`expected_step_volume` has them,
    and what else differs between all that was counted and the analytic volume of every source.

    FSDP2's all-gathers and reduce-scatters are data parallel's alone; the all-reduces of
    DDP-style replicas share their group with the loss reductions and the step's health check,
    whose analytic volumes (a few dozen bytes) are taken off."""
    from lightning_3d.comm import expected_step_volume, on_labels, view_labels

    labels = view_labels(strategy.meshes)
    expected = expected_step_volume(config, strategy.dims)
    analytic = sum(volume.wire_bytes for volume in expected.get("data_parallel", {}).values())
    if strategy.dims.fsdp > 1:
        counted = sum(volume.wire_bytes for (_, kind), volume in step.items() if kind in ("all_gather", "reduce_scatter"))
    else:
        others = on_labels({source: table for source, table in expected.items() if source in ("loss", "step_health")}, labels)
        counted = sum(volume.wire_bytes for volume in step.values()) - sum(volume.wire_bytes for volume in others.values())
    everything = on_labels(expected, labels)
    mismatches = {f"{dim}/{kind}": f"counted {step.get((dim, kind))}, analytic {everything.get((dim, kind))}"
                  for dim, kind in set(step) | set(everything) if step.get((dim, kind)) != everything.get((dim, kind))}
    return counted, analytic, mismatches


def run_case(overrides: list[str], accumulate: int, steps: int, run_dir: Path) -> dict[str, Any]:
    from lightning_3d.bench.measure import compose_config
    from lightning_3d.callbacks.comm import CommAccounting
    from lightning_3d.comm import Volume
    from lightning_3d.train import build

    config = compose_config(run_dir, [
        "recipe=debug", f"trainer.max_steps={steps}", f"trainer.accumulate_grad_batches={accumulate}",
        "trainer.val_check_interval=null", "data.val_batches=1", "perf.comm_accounting=true", *overrides,
    ])
    probe = ModelStateProbe()
    trainer, model, datamodule = build(config, callbacks=[probe])
    trainer.fit(model, datamodule=datamodule)
    accounting = next(c for c in trainer.callbacks if isinstance(c, CommAccounting))
    step: dict = {}
    for batch in accounting.steps[-accumulate:]:  # the last optimizer step's micro-batches
        for key, volume in batch.items():
            step[key] = step.get(key, Volume()) + volume
    measured, analytic, mismatches = _data_parallel_wire(config, trainer.strategy, step)
    params = sum(p.numel() for p in model.parameters())  # global sizes (DTensor numel is the full tensor's)
    return {"psi": params, "peak": probe.peak, "at_rest": probe.at_rest, "dp_wire": measured, "dp_wire_analytic": analytic, "mismatches": mismatches}


def worker(out: Path, steps: int) -> None:
    from lightning_3d.train import shutdown_distributed

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, stage, overrides in CASES:
            for accumulate in ACCUMULATE:
                result = run_case(overrides, accumulate, steps, Path(tmp) / f"{stage}_{accumulate}")
                results.append({"label": label, "stage": stage, "accumulate": accumulate, **result})
                dist.barrier()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    shutdown_distributed()


# ----------------------------------------------------------------------------- the table


def table(results: list[dict[str, Any]]) -> str:
    n = PROCESSES
    lines = [
        "| layout | micro-batches | peak: params + grads + AdamW (bytes/Ψ) | ZeRO formula | at rest | "
        "data-parallel words/Ψ per step | analytic (ours) | ZeRO formula |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        psi = row["psi"]
        peak, rest = ({k: v / psi for k, v in row[key].items()} for key in ("peak", "at_rest"))
        formula = zero_memory(row["stage"], n)

        def parts(values: dict[str, float]) -> str:
            return " + ".join(f"{values[k]:.2f}" for k in ("params", "grads", "optimizer")) + f" = {sum(values.values()):.2f}"

        lines.append(
            f"| {row['label']} | {row['accumulate']} | {parts(peak)} | {parts(formula)} | {sum(rest.values()):.2f} | "
            f"{row['dp_wire'] / (4 * psi):.3f} | {row['dp_wire_analytic'] / (4 * psi):.3f} | "
            f"{zero_words(row['stage'], n, row['accumulate']):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the last one is measured)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps)
        return
    if args.steps < 2:
        sys.exit("--steps must be >= 2: the first step creates AdamW's states")
    results = run_workers("lightning_3d.bench.zero", PROCESSES, "--steps", str(args.steps))
    print(f"debug model, Ψ = {results[0]['psi']:,} parameters, fp32, {PROCESSES} ranks; rank 0, last of {args.steps} steps")
    print(table(results))
    for row in results:  # all sources: also the loss reductions and the step's health check
        for key, what in sorted(row["mismatches"].items()):
            print(f"not as expected_step_volume has it: {row['label']}, {row['accumulate']} micro-batches: {key} {what}")


if __name__ == "__main__":
    main()
