"""``lightning_3d.plan(...)``: every layout the strategy accepts, with its predicted memory
and step time, ranked (fitting layouts by predicted step time, then the others by how far
over the device's memory they are)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from omegaconf import OmegaConf

from lightning_3d.config import ModelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.planner.cluster import Cluster, ClusterConfig, resolve_cluster
from lightning_3d.planner.layouts import Layout, enumerate_layouts
from lightning_3d.planner.memory import MemoryBreakdown, Precision, rank_memory
from lightning_3d.planner.shapes import ModelShape
from lightning_3d.planner.timing import ViewTraffic, pipeline_ranks, step_time

_GIB = 2**30


@dataclass(frozen=True)
class LayoutPlan:
    """One layout with everything predicted for it.

    ``memory`` is the rank that needs the most (its pipeline position: ``memory_pp_rank``);
    ``traffic`` has one entry per mesh view, for the rank that moves the most over it.
    """

    layout: Layout
    memory: MemoryBreakdown
    memory_pp_rank: int
    capacity_bytes: int  # the device's memory
    traffic: tuple[ViewTraffic, ...]
    bubble: float
    compute_s: float
    exposed_comm_s: float
    step_s: float
    mfu: float
    tokens_per_s: float
    measured_step_s: Optional[float] = None
    rank: int = 0

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity_bytes

    @property
    def over_bytes(self) -> int:
        """How far over the device's memory the layout is (0 when it fits)."""
        return max(0, self.memory.total - self.capacity_bytes)

    def overrides(self) -> list[str]:
        """``python -m lightning_3d.train`` overrides that run it."""
        return self.layout.overrides()


@dataclass(frozen=True)
class PlanRequest:
    """What is planned: the model, the machines, the batch."""

    shape: ModelShape
    cluster: Cluster
    seq_len: int
    global_batch_size: int
    precision: Precision


@dataclass
class Ranking:
    """Every accepted layout ranked, and the degree sets the strategy refuses (with why)."""

    request: PlanRequest
    plans: list[LayoutPlan]
    refused: dict[str, list[str]] = field(default_factory=dict)

    @property
    def fitting(self) -> list[LayoutPlan]:
        return [plan for plan in self.plans if plan.fits]


def evaluate(request: PlanRequest, layout: Layout) -> LayoutPlan:
    """Predict one layout's memory (its worst rank) and step time."""
    memories = [
        (rank_memory(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, pp_rank,
                     reserved=request.cluster.reserved_bytes), pp_rank)
        for pp_rank in pipeline_ranks(layout)
    ]
    memory, worst = max(memories, key=lambda item: item[0].total)
    time = step_time(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, request.cluster)
    return LayoutPlan(
        layout=layout,
        memory=memory,
        memory_pp_rank=worst,
        capacity_bytes=request.cluster.memory_bytes,
        traffic=time.traffic,
        bubble=time.bubble,
        compute_s=time.compute_s,
        exposed_comm_s=time.exposed_comm_s,
        step_s=time.step_s,
        mfu=time.mfu,
        tokens_per_s=time.tokens_per_s,
    )


def order(plans: list[LayoutPlan]) -> list[LayoutPlan]:
    """Fitting layouts by step time, then the others by how far over memory they are; numbered from 1."""
    ranked = sorted(plans, key=lambda p: (not p.fits, p.step_s if p.fits else p.over_bytes, p.memory.total))
    return [replace(plan, rank=index + 1) for index, plan in enumerate(ranked)]


def rank_layouts(request: PlanRequest) -> Ranking:
    """Every layout the strategy accepts, predicted and ranked; a :class:`ConfigError` when there is none."""
    layouts, refused = enumerate_layouts(request.cluster.gpus, request.shape, request.seq_len, request.global_batch_size)
    if not layouts:
        raise ConfigError(no_layout_message(request, refused))
    return Ranking(request, order([evaluate(request, layout) for layout in layouts]), refused)


def no_layout_message(request: PlanRequest, refused: dict[str, list[str]]) -> str:
    """Why no set of degrees is accepted: the batch (when a batch divisible by any DP size would
    be), else the model against the world size."""
    gpus, shape = request.cluster.gpus, request.shape
    roomy = gpus * 1024  # divisible by every data-parallel size and microbatch count that can occur
    layouts, _ = enumerate_layouts(gpus, shape, request.seq_len, roomy)
    if layouts:
        # each layout needs the batch to be a multiple of dp × the fewest microbatches it can run
        granules: dict[int, str] = {}
        for layout in layouts:
            fewest = min(lay.microbatches for lay in layouts if lay.degrees == layout.degrees) if layout.pp > 1 else 1
            granules.setdefault(layout.dp * fewest, layout.degrees)
        batch = request.global_batch_size
        nearest = sorted({m for g in granules for m in (batch // g * g, (batch // g + 1) * g) if m > 0}, key=lambda m: (abs(m - batch), m))[:2]
        smallest = sorted(granules)[:3]
        examples = ", ".join(f"{g} ({granules[g]})" for g in smallest)
        return (
            f"data.global_batch_size={batch} divides no layout of {gpus} devices for this model: a layout needs a "
            f"multiple of its data-parallel size × its fewest pipeline microbatches, the smallest being {examples}; "
            f"nearest valid batches: {sorted(nearest)}"
        )
    examples = "; ".join(f"{name}: {problems[0]}" for name, problems in list(refused.items())[:3])
    return (
        f"no layout of {gpus} devices can run {shape.describe()} at data.seq_len={request.seq_len}: "
        f"the strategy refuses every set of degrees, e.g. {examples}"
    )


def make_request(
    model: Union[ModelConfig, ModelShape, str, Path],
    cluster: Union[ClusterConfig, Cluster, str],
    seq_len: int,
    global_batch_size: int,
    precision: Optional[str] = None,
) -> PlanRequest:
    shape = model_shape(model)
    if seq_len <= 0 or global_batch_size <= 0:
        raise ConfigError(f"seq_len={seq_len} and global_batch_size={global_batch_size} must both be > 0")
    if isinstance(cluster, Cluster):
        resolved = cluster
    else:
        config = cluster_config(cluster)
        on_cpu = (config.gpu or "").upper() == "CPU"
        precision = precision or ("32-true" if on_cpu else "bf16-mixed")
        resolved = resolve_cluster(config, precision=precision)
    flag = precision or ("32-true" if resolved.gpu.upper() == "CPU" else "bf16-mixed")
    return PlanRequest(shape, resolved, seq_len, global_batch_size, Precision.of(flag))


def model_shape(model: Union[ModelConfig, ModelShape, str, Path]) -> ModelShape:
    """A :class:`ModelShape` from a config, a ``conf/model`` name or a Hugging Face folder."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, ModelConfig):
        if model.source == "hf" or model.path:
            if not model.path:
                raise ConfigError("model=hf needs the model folder: model.path=/path/to/folder (its config.json)")
            return ModelShape.of_hf_folder(model.path)
        return ModelShape.of_config(model)
    path = Path(model)
    if path.is_dir():
        return ModelShape.of_hf_folder(path)
    from lightning_3d.train import CONF_DIR

    file = CONF_DIR / "model" / f"{model}.yaml"
    if not file.is_file():
        names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ConfigError(f"model {model!r} is neither a folder with a config.json nor one of conf/model: {names}")
    config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(file)))
    return model_shape(config) if config.source != "hf" else ModelShape.of_hf_folder(config.path or "")


def cluster_config(cluster: Union[ClusterConfig, str]) -> ClusterConfig:
    """A :class:`ClusterConfig`, or one of ``conf/cluster`` by name."""
    if isinstance(cluster, ClusterConfig):
        return cluster
    from lightning_3d.train import CONF_DIR

    file = CONF_DIR / "cluster" / f"{cluster}.yaml"
    if not file.is_file():
        names = sorted(p.stem for p in (CONF_DIR / "cluster").glob("*.yaml"))
        raise ConfigError(f"cluster {cluster!r} is not one of conf/cluster: {names}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.load(file)))


def plan(
    model: Union[ModelConfig, ModelShape, str, Path],
    cluster: Union[ClusterConfig, Cluster, str],
    seq_len: int,
    global_batch_size: int,
    top: Optional[int] = 10,
    precision: Optional[str] = None,
) -> list[LayoutPlan]:
    """The ``top`` best layouts (all when None) for ``model`` on ``cluster``.

    Args:
        model: a :class:`ModelConfig`, a ``conf/model`` name (``"llama3_70b"``) or a Hugging
            Face folder (only its ``config.json`` is read).
        cluster: a :class:`ClusterConfig` (e.g. ``ClusterConfig(gpus=64, gpus_per_node=8,
            gpu="H100")``) or a ``conf/cluster`` name.
        seq_len, global_batch_size: tokens per sequence, sequences per optimizer step.
        precision: the trainer's precision flag; None: ``bf16-mixed`` on GPUs, ``32-true`` on CPU.

    Returns the layouts ranked: those that fit the device's memory by predicted step time,
    then the others by how far over they are (``plan.fits``, ``plan.over_bytes``). Raises
    :class:`~lightning_3d.errors.ConfigError` when the strategy accepts no layout, or when
    none fits (saying what would: more devices, a smaller batch, a shorter sequence).
    """
    request = make_request(model, cluster, seq_len, global_batch_size, precision)
    ranking = rank_layouts(request)
    if not ranking.fitting:
        raise ConfigError(nothing_fits_message(ranking))
    return ranking.plans[:top] if top is not None else ranking.plans


# ----------------------------------------------------------------------------- when nothing fits


def nothing_fits_message(ranking: Ranking) -> str:
    """The closest layout, and what would make one fit: more devices, a smaller batch, a shorter sequence."""
    request = ranking.request
    best = ranking.plans[0]
    cluster = request.cluster
    parts = [
        f"no layout of {request.shape.describe()} fits {cluster.describe()}: the closest, {best.layout.degrees} "
        f"({best.layout.pipeline}, activation checkpointing {best.layout.checkpointing}), needs "
        f"{best.memory.total / _GIB:.1f} GiB per device, {best.over_bytes / _GIB:.1f} GiB over "
        f"(model states {best.memory.model_states / _GIB:.1f} GiB, activations {best.memory.activations / _GIB:.1f} GiB); "
        "every layout was tried with activation checkpointing none, selective and full"
    ]
    options = []
    gpus = _fitting_gpus(request)
    if gpus:
        options.append(f"cluster.gpus={gpus} (more devices)")
    batch = _fitting_half(request, "global_batch_size", 1)
    if batch:
        options.append(f"data.global_batch_size={batch} (a smaller batch)")
    seq = _fitting_half(request, "seq_len", 128)
    if seq:
        options.append(f"data.seq_len={seq} (shorter sequences)")
    if options:
        parts.append("what would fit: " + "; or ".join(options))
    else:
        parts.append("neither up to 16× the devices, nor a smaller batch or a shorter sequence makes one fit")
    return "; ".join(parts)


def fits_memory(request: PlanRequest, layout: Layout) -> bool:
    """Whether every pipeline rank of the layout fits the device (memory only: no timing)."""
    return all(
        rank_memory(request.shape, layout, request.precision, request.seq_len, request.global_batch_size, pp_rank,
                    reserved=request.cluster.reserved_bytes).total <= request.cluster.memory_bytes
        for pp_rank in pipeline_ranks(layout)
    )


def _frugal(layouts: list[Layout]) -> list[Layout]:
    """Of each set of degrees and schedule, the knobs that need the least memory: full activation
    checkpointing, the most microbatches, resharding after forward, loss parallel where offered."""
    best: dict[tuple, Layout] = {}
    for layout in layouts:
        if layout.activation_checkpoint != "full":
            continue
        key = (layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp, layout.pp, layout.pp_schedule)
        rank = (layout.microbatches, layout.reshard_after_forward, layout.loss_parallel)
        if key not in best or rank > (best[key].microbatches, best[key].reshard_after_forward, best[key].loss_parallel):
            best[key] = layout
    return sorted(best.values(), key=lambda lay: (-lay.fsdp, -lay.tp, -lay.pp))


def _any_fits(request: PlanRequest) -> bool:
    layouts, _ = enumerate_layouts(request.cluster.gpus, request.shape, request.seq_len, request.global_batch_size)
    return any(fits_memory(request, layout) for layout in _frugal(layouts))


def _fitting_gpus(request: PlanRequest) -> Optional[int]:
    for factor in (2, 4, 8, 16):
        cluster = replace(request.cluster, gpus=request.cluster.gpus * factor)
        if _any_fits(replace(request, cluster=cluster)):
            return cluster.gpus
    return None


def _fitting_half(request: PlanRequest, field: str, smallest: int) -> Optional[int]:
    """The largest of ``field``'s value halved again and again (down to ``smallest``) at which a layout fits."""
    value = getattr(request, field) // 2
    while value >= smallest:
        if _any_fits(replace(request, **{field: value})):
            return value
        value //= 2
    return None
