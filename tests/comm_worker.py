"""Train several layouts in one process group with communication accounting; launched by tests/test_comm.py.

usage: torchrun ... tests/comm_worker.py OUT_DIR CASES_JSON
CASES_JSON: {"case name": [hydra overrides...], ...}. For every case rank 0 writes
OUT_DIR/<name>.json: one entry per rank with the measured totals of each step, the ops of
the last step, the analytic volume of a step on the counter's labels (in all and by
source) and the comm/ metrics the callback logged. Totals are {"dim/kind": {count, bytes, wire_bytes}};
"steps" are optimizer steps (the callback's training batches summed over each step's
accumulated micro-batches), "microbatches" the training batches themselves.
Then OUT_DIR/sweep.json: what the counter records for one op of each kind, per rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from parity_worker import compose_case

from lightning_3d.callbacks.comm import CommAccounting
from lightning_3d.comm import CommCounter, Totals, Volume, expected_step_volume, on_labels, view_labels
from lightning_3d.train import build, shutdown_distributed


def plain(table: Totals) -> dict[str, dict[str, float]]:
    return {f"{dim}/{kind}": volume.as_dict() for (dim, kind), volume in sorted(table.items())}


def optimizer_steps(batches: list[Totals], accumulate: int) -> list[Totals]:
    """The training batches' totals summed over the micro-batches of each optimizer step."""
    steps = []
    for start in range(0, len(batches), accumulate):
        step: Totals = {}
        for batch in batches[start : start + accumulate]:
            for key, volume in batch.items():
                step[key] = step.get(key, Volume()) + volume
        steps.append(step)
    return steps


def run_case(name: str, overrides: list[str], out_dir: Path) -> None:
    config = compose_case(out_dir / name, overrides)
    accounting = CommAccounting()
    trainer, model, datamodule = build(config, callbacks=[accounting])
    trainer.fit(model, datamodule=datamodule)
    strategy = trainer.strategy
    labels = view_labels(strategy.meshes)
    expected = expected_step_volume(config, strategy.dims, pp_rank=strategy.meshes["pp"].get_local_rank())
    result = {
        "steps": [plain(step) for step in optimizer_steps(accounting.steps, trainer.accumulate_grad_batches)],
        "microbatches": [plain(batch) for batch in accounting.steps],
        "ops": sorted({f"{r.op} {r.kind} {r.bytes}" for r in accounting.last_records}),
        "expected": plain(on_labels(expected, labels)),
        "expected_by_source": {source: plain(on_labels({source: table}, labels)) for source, table in expected.items()},
        "logged": {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("comm/")},
    }
    gathered: list = [None] * trainer.world_size
    dist.all_gather_object(gathered, result)
    if trainer.global_rank == 0:
        (out_dir / f"{name}.json").write_text(json.dumps(gathered, indent=1))
    strategy.barrier()


def collective_sweep(out_dir: Path) -> None:
    """One op of each kind on the default group, as (op, kind, bytes, wire bytes) per rank."""
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    ten = torch.ones(10)  # 40 bytes
    with CommCounter() as counter:
        dist.all_reduce(ten)
        dist.broadcast(ten, src=0)
        dist.all_gather_into_tensor(torch.empty(20), ten)
        dist.reduce_scatter_tensor(torch.empty(5), ten)
        dist.all_to_all_single(torch.empty(10), ten)
        dist.gather(ten, [torch.empty(10), torch.empty(10)] if rank == 0 else None, dst=0)
        dist.scatter(torch.empty(10), [ten, ten] if rank == 0 else None, src=0)
        funcol.all_reduce(ten, "sum", dist.group.WORLD).wait()
        funcol.all_gather_tensor(ten, 0, dist.group.WORLD).wait()
        funcol.reduce_scatter_tensor(ten, "sum", 0, dist.group.WORLD).wait()
        for work in dist.batch_isend_irecv([dist.P2POp(dist.isend, ten, peer), dist.P2POp(dist.irecv, torch.empty(10), peer)]):
            work.wait()
        dist.barrier()
    records = [[r.op, r.kind, r.dim, r.bytes, r.wire_bytes] for r in counter.records]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if rank == 0:
        (out_dir / "sweep.json").write_text(json.dumps(gathered, indent=1))


def main() -> None:
    out_dir = Path(sys.argv[1])
    for name, overrides in json.loads(sys.argv[2]).items():
        run_case(name, overrides, out_dir)
    collective_sweep(out_dir)  # in the process group the cases left
    shutdown_distributed()


if __name__ == "__main__":
    main()
