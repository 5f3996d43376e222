"""The layout planner against measurement on this CPU machine (gloo, fp32).

    python -m lightning_3d.bench.planner_proof                  # tiny on 8 processes, debug on 4
    python -m lightning_3d.bench.planner_proof --group debug    # one group
    python -m lightning_3d.bench.planner_proof --steps 8 --passes 1 --json /tmp/proof.json
    python -m lightning_3d.bench.planner_proof --from-json /tmp/proof.json   # compare again, run nothing
    python -m lightning_3d.bench.planner_proof --store /tmp/proof_runs.json  # resumable: run again to go on

For each set of degrees the planner accepts for the recipe (``tiny``: 8 processes,
``debug``: 4), the planner's best-ranked knobs for it, then a sweep of the other knobs
(activation checkpointing, pipeline schedules, microbatches, resharding, loss parallel)
on a few of them. All layouts of a group run one after the other in one launch, through
``build()`` like the CLI, for ``--steps`` steps. Step 1 (step 0 also sends the pipeline's
shape metadata) is probed on every rank:

- model states: the bytes of the rank's local shards of parameters, gradients and AdamW
  states (``lightning_3d.bench.measure.local_state_bytes``), against the planner (±2%);
- activations: the peak bytes autograd holds for backward, counted by a saved-tensors hook
  (:class:`SavedStorageBytes`: as ``lightning_3d.bench.memory`` counts them, each storage
  once and parameters left out), against the planner's saved-for-backward bytes (±15%);
- communication: every collective of the step per mesh dim, counted by the callback
  ``perf.comm_accounting=true`` installs (``CommAccounting``, here for that one step only),
  against the planner's volumes: calls and bytes, exactly.

The steps after the probed one are timed (median, start to start), in ``--passes`` launches
with the layouts in a shuffled order and then reversed; the planner's ranking by predicted
step time (``cluster.gpu=CPU``) is compared with the ranking by measured time (Spearman's ρ).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import compose_config, local_state_bytes, median, release_memory, steady_step_times
from lightning_3d.bench.memory import SavedTensorBytes
from lightning_3d.callbacks.comm import CommAccounting
from lightning_3d.comm import on_labels, view_labels
from lightning_3d.planner.api import LayoutPlan, PlanRequest, evaluate, rank_layouts
from lightning_3d.planner.cluster import ClusterConfig, resolve_cluster
from lightning_3d.planner.communication import step_volume
from lightning_3d.planner.layouts import Layout, layout_check
from lightning_3d.planner.memory import Precision, model_states, rank_memory
from lightning_3d.planner.shapes import ModelShape

MODULE = "lightning_3d.bench.planner_proof"
GROUPS = {"tiny": ("recipe=tiny", 8), "debug": ("recipe=debug", 4)}
PROBED_STEP = 1
CHUNK = 8  # layouts per launch
STATE_TOLERANCE, ACTIVATION_TOLERANCE = 0.02, 0.15


def base_overrides(recipe: str, steps: int) -> list[str]:
    return [
        recipe,
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=null",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=50",
        "data.val_batches=1",
        "checkpoint.every_n_steps=null",
        # the activation formulas follow DTensor's tensor-parallel path; the default local compute
        # saves less (docs/planner.md, limits)
        "perf.tp_local_linears=false",
    ]


def request_for(group: str, steps: int = 6) -> PlanRequest:
    """What the planner is asked for this group: the recipe's model and batch on ``processes`` CPU processes."""
    recipe, processes = GROUPS[group]
    config = compose_config(Path("unused"), base_overrides(recipe, steps), devices=processes)
    cluster = resolve_cluster(ClusterConfig(gpus=processes, gpus_per_node=processes, gpu="CPU"))
    shape = ModelShape.of_config(config.model, group)
    return PlanRequest(shape, cluster, config.data.seq_len, config.data.global_batch_size, Precision.of(config.trainer.precision))


# ----------------------------------------------------------------------------- which layouts


def proof_layouts(request: PlanRequest) -> list[Layout]:
    """Each accepted set of degrees with its best-ranked knobs, then a sweep of the knobs."""
    ranking = rank_layouts(request)
    best: dict[str, Layout] = {}
    for plan in ranking.plans:
        best.setdefault(plan.layout.degrees, plan.layout)
    chosen = list(best.values())
    sweep: list[Layout] = []
    pipelined = [layout for layout in chosen if layout.pp == 2 and layout.fsdp > 1]
    plain = [layout for layout in chosen if layout.pp == 1 and layout.tp > 1 and layout.fsdp > 1]
    if pipelined:
        base = pipelined[0]
        for schedule, per in (("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2), ("dualpipev", 2), ("interleaved_zero_bubble", 2)):
            for mode in ("none", "full"):
                sweep.append(replace(base, pp_schedule=schedule, stages_per_rank=per, microbatches=per * base.pp, activation_checkpoint=mode))
    if plain:
        base = plain[0]
        sweep += [replace(base, activation_checkpoint=mode, loss_parallel=False) for mode in ("none", "selective", "full")]
        sweep += [replace(base, loss_parallel=True), replace(base, reshard_after_forward=not base.reshard_after_forward)]
    valid = [layout for layout in sweep if not layout_check(layout, request.shape, request.seq_len, request.global_batch_size)]
    return chosen + [layout for layout in dict.fromkeys(valid) if layout not in chosen]


# ----------------------------------------------------------------------------- measuring


def _plain_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors under a tensor subclass (a DTensor's local shard, an async collective's result)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    return [plain for item in inner if isinstance(item, torch.Tensor) for plain in _plain_tensors(item)]


def _is_parameter(tensor: torch.Tensor) -> bool:
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(base, nn.Parameter)


class SavedStorageBytes(SavedTensorBytes):
    """Context manager: the peak bytes of the storages autograd holds for backward.

    Like :class:`lightning_3d.bench.memory.SavedTensorBytes`, with each storage counted once
    however many saved tensors view it (three projections saving one input hold it once), the
    local shard of a DTensor, and parameters (and views of them) left out: they are model states.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address → [saved tensors holding it, bytes]
        self.total = 0

    @override
    def _pack(self, tensor: torch.Tensor) -> "_HeldStorages":
        return _HeldStorages(self, tensor)


class _HeldStorages:
    def __init__(self, counter: SavedStorageBytes, tensor: torch.Tensor) -> None:
        self.counter, self.tensor, self.keys = counter, tensor, []
        if _is_parameter(tensor):
            return
        for local in _plain_tensors(tensor):
            if _is_parameter(local):
                continue
            storage = local.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = storage.data_ptr()
            entry = counter.live.setdefault(key, [0, storage.nbytes()])
            if entry[0] == 0:
                counter.total += entry[1]
                counter.peak = max(counter.peak, counter.total)
            entry[0] += 1
            self.keys.append(key)

    def __del__(self) -> None:  # freed with the autograd graph that saved it
        for key in self.keys:
            entry = self.counter.live[key]
            entry[0] -= 1
            if entry[0] == 0:
                self.counter.total -= entry[1]
                del self.counter.live[key]


class OneStepComm(CommAccounting):
    """The callback ``perf.comm_accounting=true`` installs, counting one training batch only."""

    def __init__(self, batch_index: int) -> None:
        super().__init__()
        self.batch_index = batch_index

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch_index:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # no table printed


class Probe(Callback):
    """Step starts; at the probed step the saved-for-backward peak and the local model states."""

    def __init__(self, batch_index: int) -> None:
        self.batch_index = batch_index
        self.starts: list[float] = []
        self.saved = SavedStorageBytes()
        self.states: dict[str, int] = {}

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.starts.append(time.perf_counter())
        if batch_idx == self.batch_index:
            self.saved.__enter__()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch_index:
            self.saved.__exit__(None, None, None)
            self.states = local_state_bytes(pl_module, trainer.optimizers)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())  # the end of the last step


def _relabel(measured: dict[str, dict[str, float]], labels: dict[str, str], view_ranks: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """Counter labels → mesh-view labels: a group the counter could not name (``other:<ranks>``,
    e.g. one DTensor built for a 2-D mesh) gets the label of the view with the same ranks; one
    matching none is the tied embedding's pair of pipeline ranks (counted on ``pp``)."""
    order = ("tp", "cp", "pp", "dp_shard", "dp_replicate", "fsdp", "dp", "loss")
    out: dict[str, dict[str, float]] = {}
    for key, volume in measured.items():
        dim, kind = key.split("/")
        if dim.startswith("other:"):
            ranks = [int(rank) for rank in dim.removeprefix("other:").split(",")]
            views = sorted((v for v, r in view_ranks.items() if r == ranks), key=lambda v: order.index(v) if v in order else len(order))
            dim = labels[views[0]] if views else labels["pp"]
        total = out.setdefault(f"{dim}/{kind}", {"count": 0, "bytes": 0, "wire_bytes": 0})
        for field in total:
            total[field] += volume[field]
    return out


def measure_layout(out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    from lightning_3d.train import build

    release_memory()
    config = compose_config(out_dir, overrides)
    probe, comm = Probe(PROBED_STEP), OneStepComm(PROBED_STEP)
    trainer, model, datamodule = build(config, callbacks=[probe, comm])
    trainer.fit(model, datamodule=datamodule)
    meshes = trainer.strategy.meshes
    labels = view_labels(meshes)
    view_ranks = {name: dist.get_process_group_ranks(mesh.get_group()) for name, mesh in meshes.items() if mesh.ndim == 1}
    measured = {f"{dim}/{kind}": volume.as_dict() for (dim, kind), volume in comm.steps[0].items()} if comm.steps else {}
    times = steady_step_times(probe.starts, PROBED_STEP + 1)  # the steps after the probed one
    result = {
        "pp_rank": meshes["pp"].get_local_rank(),
        "fsdp_index": meshes["fsdp"].get_local_rank(),
        "labels": labels,
        "states": probe.states,
        "saved_peak": probe.saved.peak,
        "comm": _relabel(measured, labels, view_ranks),
        "step_s": median(times) if times else None,
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return {"ranks": gathered}


def _worker(out: Path, cases: list[list[str]]) -> None:
    from lightning_3d.train import shutdown_distributed

    results = []
    for index, overrides in enumerate(cases):
        try:
            results.append(measure_layout(out.parent / f"layout_{index}", overrides))
        except Exception as error:  # one layout's failure is reported, the others still run
            results.append({"failed": f"{type(error).__name__}: {error}"})
        if dist.is_initialized():
            dist.barrier()
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    shutdown_distributed()


# ----------------------------------------------------------------------------- comparing


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank)."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in range(start, end + 1):
                out[order[position]] = (start + end) / 2
            start = end + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else 0.0


def layout_name(layout: Layout) -> str:
    knobs = [layout.pipeline if layout.pp > 1 else "", f"AC {layout.checkpointing}"]
    if layout.fsdp > 1 and layout.pp == 1:
        knobs.append("reshard" if layout.reshard_after_forward else "kept gathered")
    if layout.loss_parallel:
        knobs.append("loss parallel")
    return f"{layout.degrees} ({', '.join(knob for knob in knobs if knob)})"


def compare(request: PlanRequest, layout: Layout, measured: dict[str, Any]) -> dict[str, Any]:
    """Planner against measurement for one layout, every rank."""
    plan: LayoutPlan = evaluate(request, layout)
    row: dict[str, Any] = {"layout": asdict(layout), "name": layout_name(layout), "predicted_step_s": plan.step_s}
    if "failed" in measured:
        row["failed"] = measured["failed"]
        return row
    state_errors, saved_errors, comm_mismatches = [], [], []
    saved_pairs = []
    for rank, result in enumerate(measured["ranks"]):
        pp_rank, fsdp_index = result["pp_rank"], result["fsdp_index"]
        params, grads, optimizer = model_states(request.shape, layout, request.precision, pp_rank, fsdp_index)
        for name, predicted in (("params", params), ("grads", grads), ("optimizer", optimizer)):
            state_errors.append(predicted / result["states"][name] - 1)
        memory = rank_memory(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, pp_rank, fsdp_index)
        saved_errors.append(memory.saved_for_backward / result["saved_peak"] - 1)
        saved_pairs.append((memory.saved_for_backward, result["saved_peak"]))
        predicted_comm = on_labels(step_volume(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, pp_rank), result["labels"])
        predicted = {f"{dim}/{kind}": volume.as_dict() for (dim, kind), volume in predicted_comm.items()}
        for key in sorted(set(predicted) | set(result["comm"])):
            if predicted.get(key) != result["comm"].get(key):
                comm_mismatches.append(f"rank {rank} {key}: predicted {predicted.get(key)}, measured {result['comm'].get(key)}")
    worst = max(saved_pairs, key=lambda pair: abs(pair[0] / pair[1] - 1))
    row.update(
        states_max_error=max(state_errors, key=abs),
        states_bytes=measured["ranks"][0]["states"],
        saved_max_error=max(saved_errors, key=abs),
        saved_worst=worst,
        comm_exact=not comm_mismatches,
        comm_mismatches=comm_mismatches[:6],
        comm_bytes=sum(v["bytes"] for v in measured["ranks"][0]["comm"].values()),
    )
    return row


def run_group(group: str, steps: int, passes: int = 2, store: Path | None = None) -> dict[str, Any]:
    """Every layout of the group, ``passes`` times: in a shuffled order, then reversed, and so on.

    Layouts that run later in a launch are slower (each one's process groups stay until the
    launch ends) and the machine's load drifts, so the order must not follow the predicted
    ranking; step times are the median over the passes, memory and communication come from
    the first. Launches of :data:`CHUNK` layouts; after each, the measurements so far are
    written to ``store`` (a JSON file), and a run given the same ``store`` goes on from there.
    """
    request = request_for(group, steps)
    layouts = proof_layouts(request)
    order = list(range(len(layouts)))
    random.Random(0).shuffle(order)
    recipe, processes = GROUPS[group]
    saved = json.loads(store.read_text()) if store is not None and store.is_file() else {}
    state = saved.get(group)
    if not state or state["layouts"] != [asdict(layout) for layout in layouts] or state["steps"] != steps:
        state = {"layouts": [asdict(layout) for layout in layouts], "steps": steps, "runs": [[None] * len(layouts) for _ in range(passes)]}
    state["runs"] += [[None] * len(layouts) for _ in range(passes - len(state["runs"]))]
    for index in range(passes):
        ran = [p for p in (order if index % 2 == 0 else order[::-1]) if state["runs"][index][p] is None]
        for start in range(0, len(ran), CHUNK):
            chunk = ran[start:start + CHUNK]
            cases = [base_overrides(recipe, steps) + layouts[position].overrides() for position in chunk]
            for position, result in zip(chunk, run_workers(MODULE, processes, "--cases", json.dumps(cases))):
                state["runs"][index][position] = result
            if store is not None:
                saved[group] = state
                store.write_text(json.dumps(saved))
    runs = state["runs"][:passes]
    result = {
        "group": group, "processes": processes, "steps": steps, "passes": passes, "cluster": request.cluster.describe(),
        "layouts": state["layouts"],
        "measured": runs[0],
        "step_times": [[r["ranks"][0]["step_s"] for r in (run[position] for run in runs) if "ranks" in r and r["ranks"][0]["step_s"] is not None]
                       for position in range(len(layouts))],
    }
    return with_comparison(result)


def with_comparison(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` (a group's measurements) with the planner's predictions set against them."""
    request = request_for(result["group"], result["steps"])
    rows = []
    for layout, measured, times in zip(result["layouts"], result["measured"], result["step_times"]):
        row = compare(request, Layout(**layout), measured)
        if times:
            row["measured_step_s"] = median(times)
            row["measured_step_s_passes"] = times
        rows.append(row)
    timed = [row for row in rows if row.get("measured_step_s")]
    rho = spearman([row["predicted_step_s"] for row in timed], [row["measured_step_s"] for row in timed]) if len(timed) > 2 else None
    return {**result, "rows": rows, "spearman": rho}


def markdown(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        f"### `{result['group']}` on {result['processes']} processes ({len(rows)} layouts)",
        "",
        "| layout | model states: max error over ranks | saved for backward: predicted / measured MiB (worst rank) | error | comm per dim, calls and bytes | predicted ms/step | measured ms/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "failed" in row:
            lines.append(f"| {row['name']} | failed: {row['failed'][:120]} | | | | {row['predicted_step_s'] * 1e3:.0f} | |")
            continue
        predicted, measured = row["saved_worst"]
        lines.append(
            f"| {row['name']} | {row['states_max_error']:+.2%} | {predicted / 2**20:.2f} / {measured / 2**20:.2f} | "
            f"{row['saved_max_error']:+.1%} | {'exact' if row['comm_exact'] else 'DIFFERS'} | "
            f"{row['predicted_step_s'] * 1e3:.0f} | {row['measured_step_s'] * 1e3:.0f} |"
        )
    ok = [row for row in rows if "failed" not in row]
    states_ok = sum(abs(row["states_max_error"]) <= STATE_TOLERANCE for row in ok)
    saved_ok = sum(abs(row["saved_max_error"]) <= ACTIVATION_TOLERANCE for row in ok)
    comm_ok = sum(row["comm_exact"] for row in ok)
    rho = result["spearman"]
    lines += [
        "",
        f"Model states within ±2%: {states_ok}/{len(ok)}; saved for backward within ±15%: {saved_ok}/{len(ok)}; "
        f"communication exact: {comm_ok}/{len(ok)}; ranking by predicted vs measured step time: Spearman ρ = "
        + (f"{rho:.2f}" if rho is not None else "n/a") + f" over {len(ok)} layouts.",
    ]
    for row in ok:
        if row["comm_mismatches"]:
            lines.append(f"- {row['name']}: " + "; ".join(row["comm_mismatches"][:3]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--group", choices=list(GROUPS), action="append", help="tiny, debug (default: both)")
    parser.add_argument("--steps", type=int, default=6, help="steps per layout (step 1 is probed, the later ones timed)")
    parser.add_argument("--passes", type=int, default=2, help="launches per group, the layouts in a shuffled order, then reversed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--store", type=Path, help="keep the measurements here as they come; a run with the same file goes on from it")
    parser.add_argument("--from-json", type=Path, help="compare the planner with the measurements a --json file holds, running nothing")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cases", type=json.loads, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.cases)
        return
    if args.from_json is not None:
        results = [with_comparison(result) for result in json.loads(args.from_json.read_text())]
    else:
        results = [run_group(group, args.steps, args.passes, args.store) for group in args.group or list(GROUPS)]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print("\n\n".join(markdown(result) for result in results))


if __name__ == "__main__":
    main()
