"""The planner's printed report: a ranked table, then one block per layout shown."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_3d.planner.api import LayoutPlan, Ranking
from lightning_3d.planner.layouts import Layout

_GIB = 2**30


def view_name(view: str, layout: Layout) -> str:
    """A mesh view as the layout's degrees name it (the flattened FSDP view is dp_shard × cp)."""
    if view == "fsdp":
        return "dp_shard×cp" if layout.cp > 1 else "dp_shard"
    return view


def _gib(value: float) -> str:
    return f"{value / _GIB:.1f}"


def _bytes(value: float) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value >= 0.01 else f"{value * 1e3:.3g} ms"


def table(plans: Sequence[LayoutPlan]) -> str:
    """The ranked table: one row per layout."""
    header = ["#", "degrees", "pipeline", "AC", "reshard", "loss par.", "memory GiB", "fits", "step", "MFU", "bubble"]
    if any(plan.measured_step_s is not None for plan in plans):
        header.insert(9, "measured")
    rows = [header]
    for plan in plans:
        layout = plan.layout
        memory = f"{_gib(plan.memory.total)} / {_gib(plan.capacity_bytes)}"
        fits = "yes" if plan.fits else f"over {_gib(plan.over_bytes)} GiB"
        row = [
            str(plan.rank),
            layout.degrees,
            layout.pipeline,
            layout.checkpointing,
            ("after fwd" if layout.reshard_after_forward else "kept") if layout.fsdp > 1 else "-",
            ("yes" if layout.loss_parallel else "no") if layout.tp > 1 else "-",
            memory,
            fits,
            _seconds(plan.step_s),
            f"{plan.mfu:.1%}",
            f"{plan.bubble:.1%}" if layout.pp > 1 else "-",
        ]
        if len(header) > len(row):
            row.insert(9, _seconds(plan.measured_step_s) if plan.measured_step_s is not None else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def details(plan: LayoutPlan, command: Sequence[str]) -> str:
    """One layout: memory by part, communication per mesh view, time, and the command that runs it."""
    layout = plan.layout
    memory = plan.memory
    parts = " | ".join(f"{name} {_gib(value)}" for name, value in memory.parts().items())
    where = f"pipeline rank {plan.memory_pp_rank}" if layout.pp > 1 else "every rank"
    verdict = "fits" if plan.fits else f"does not fit: {_gib(plan.over_bytes)} GiB over"
    lines = [
        f"#{plan.rank}  {layout.degrees}  ({layout.pipeline}, activation checkpointing {layout.checkpointing})",
        f"  memory per device ({where}): {parts} = {_gib(memory.total)} GiB of {_gib(plan.capacity_bytes)}: {verdict}",
    ]
    traffic = [
        f"{view_name(t.view, layout)} ({t.ranks} ranks, {t.link}): {_bytes(t.volume.wire_bytes)} sent in {t.volume.count} calls, {_seconds(t.seconds)}"
        for t in plan.traffic
    ]
    lines.append("  communication per step: " + ("; ".join(traffic) if traffic else "none"))
    measured = f", measured {_seconds(plan.measured_step_s)}" if plan.measured_step_s is not None else ""
    lines.append(
        f"  time per step: compute {_seconds(plan.compute_s)}, exposed communication {_seconds(plan.exposed_comm_s)}, "
        f"bubble {plan.bubble:.1%} -> {_seconds(plan.step_s)}{measured}; {plan.tokens_per_s:,.0f} tokens/s, MFU {plan.mfu:.1%}"
    )
    lines.append("  run: " + " ".join(["python -m lightning_3d.train", *command, *plan.overrides()]))
    return "\n".join(lines)


def report(ranking: Ranking, shown: Sequence[LayoutPlan], command: Sequence[str]) -> str:
    request = ranking.request
    fitting = len(ranking.fitting)
    lines = [
        f"model: {request.shape.describe()}",
        f"cluster: {request.cluster.describe()}",
        f"batch: {request.global_batch_size} sequences × {request.seq_len} tokens per step, precision {request.precision.name}",
        f"{len(ranking.plans)} layouts the strategy accepts, {fitting} of them fit; "
        + (f"the best {len(shown)}:" if fitting else "none fits; the closest:"),
        "",
        table(shown),
        "",
    ]
    lines += [details(plan, command) + "\n" for plan in shown]
    if ranking.refused:
        refused = "; ".join(f"{name}: {problems[0]}" for name, problems in list(ranking.refused.items())[:4])
        more = f" (and {len(ranking.refused) - 4} more)" if len(ranking.refused) > 4 else ""
        lines.append(f"degrees the strategy refuses for this model and batch: {refused}{more}")
    return "\n".join(lines)
