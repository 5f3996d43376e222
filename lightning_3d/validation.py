"""Pre-flight checks of a layout against the world size, the model and the data.

Shared by the CLI (before any process starts) and the strategy (before any process group
exists). All problems are collected and reported at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from lightning_3d.compat import _convert_precision_to_unified_args
from lightning_3d.config import (
    DataConfig,
    ModelConfig,
    ParallelConfig,
    PerfConfig,
    TrainerConfig,
)
from lightning_3d.dims import ParallelDims, divisors
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.activation_checkpoint import activation_checkpoint_problems
from lightning_3d.parallel.compile import compile_problems, float8_problems
from lightning_3d.parallel.data_parallel import (
    SUPPORTED_PRECISIONS,
    data_parallel_problems,
    zero_stage_problems,
)
from lightning_3d.parallel.pipeline_parallel import (
    NEEDS_MICROBATCHES_PER_STAGE,
    SCHEDULES,
    V_SHAPED,
    check_explicit_split,
    is_single_stage,
    num_microbatches,
)
from lightning_3d.parallel.tensor_parallel import blocks_of

VALID_CP_BACKENDS = ("ring", "allgather", "native")
VALID_ACCELERATORS = ("cpu", "gpu", "cuda", "auto")


@dataclass(frozen=True)
class Hardware:
    """The GPUs this machine offers; detected only when a run asks for them (tests pass their own)."""

    cuda_devices: int
    bf16: bool  # whether GPU 0 computes in bfloat16 (compute capability >= 8.0)
    name: str = ""
    capability: Optional[tuple[int, int]] = None  # GPU 0's compute capability

    @classmethod
    def detect(cls) -> "Hardware":
        count = torch.cuda.device_count()
        if count == 0:
            return cls(0, False)
        return cls(count, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def trainer_problems(trainer: TrainerConfig, hardware: Optional[Hardware] = None) -> list[str]:
    """Accelerator, device count and precision against what the machine has."""
    problems = []
    if trainer.accelerator not in VALID_ACCELERATORS:
        problems.append(f"trainer.accelerator={trainer.accelerator!r} is not one of {list(VALID_ACCELERATORS)}")
    try:
        precision = str(_convert_precision_to_unified_args(trainer.precision))  # Lightning's aliases: bf16, 32
    except ValueError:
        precision = str(trainer.precision)
    if precision not in SUPPORTED_PRECISIONS:
        problems.append(
            f"trainer.precision={trainer.precision!r} is not supported; use one of {list(SUPPORTED_PRECISIONS)} "
            "(fp16 would need a gradient scaler, fp64 a policy of its own)"
        )
    devices = trainer.devices
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        problems.append(f"trainer.devices={devices!r} must be a positive number of processes per node")
        devices = 1
    if trainer.num_nodes < 1:
        problems.append(f"trainer.num_nodes={trainer.num_nodes} must be >= 1")
    if trainer.accelerator in ("gpu", "cuda"):
        hardware = hardware or Hardware.detect()
        if hardware.cuda_devices == 0:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            problems.append(
                f"trainer.accelerator={trainer.accelerator} but no CUDA GPU is visible (torch {torch.__version__}, {build}); "
                "use trainer.accelerator=cpu (e.g. trainer=cpu), or run where a GPU and a CUDA build of torch are"
            )
        else:
            if devices > hardware.cuda_devices:
                problems.append(
                    f"trainer.devices={devices} but this machine has {hardware.cuda_devices} GPU(s); set trainer.devices to "
                    f"at most {hardware.cuda_devices} per node (the world size is devices × trainer.num_nodes)"
                )
            if precision.startswith("bf16") and not hardware.bf16:
                problems.append(
                    f"trainer.precision={trainer.precision} needs bfloat16, which {hardware.name or 'this GPU'} lacks "
                    "(it needs compute capability 8.0+); use 32-true"
                )
    return problems


def perf_problems(
    perf: PerfConfig, dims: Optional[ParallelDims], accelerator: str, hardware: Optional[Hardware] = None
) -> list[str]:
    """The speed levers against the layout and the machine (``accelerator``: cpu, gpu/cuda or auto)."""
    if accelerator == "auto":
        accelerator = "gpu" if (hardware.cuda_devices if hardware else torch.cuda.device_count()) else "cpu"
    problems = activation_checkpoint_problems(perf.activation_checkpoint, perf.ac_every)
    problems += compile_problems(perf.compile, perf.compile_backend, accelerator)
    on_gpu = accelerator in ("gpu", "cuda")
    capability = (hardware or Hardware.detect()).capability if perf.float8 and on_gpu else None
    problems += float8_problems(perf.float8, accelerator, dims.tp if dims else 1, capability)
    if dims is not None:
        problems += data_parallel_problems(dims, perf.fsdp_prefetch, perf.cpu_offload, perf.dp_unit_min_mb)
    if perf.peak_flops is not None and perf.peak_flops <= 0:
        problems.append(f"perf.peak_flops={perf.peak_flops} must be > 0 (FLOP/s of one device), or null for the known-GPU table")
    return problems


def _valid_tp(values: list[int], world_size: int) -> str:
    common = [d for d in divisors(world_size) if all(v % d == 0 for v in values)]
    return f"valid tp values: {common}"


def _pipeline_problems(parallel: ParallelConfig, model: ModelConfig | None) -> list[str]:
    if parallel.pp_schedule not in SCHEDULES:
        return [f"parallel.pp_schedule={parallel.pp_schedule!r} is not one of {list(SCHEDULES)}"]
    if parallel.pp <= 1:
        return []
    problems = []
    stages_per_rank = parallel.stages_per_rank
    num_stages = parallel.pp * stages_per_rank
    schedule = parallel.pp_schedule
    if stages_per_rank < 1:
        problems.append(f"parallel.stages_per_rank={stages_per_rank} must be >= 1")
    elif is_single_stage(schedule) and stages_per_rank != 1:
        problems.append(f"pp_schedule={schedule} runs one stage per rank, but stages_per_rank={stages_per_rank}; use 1")
    elif schedule in V_SHAPED and stages_per_rank != 2:
        problems.append(f"pp_schedule={schedule} places exactly 2 stages per rank (a V), but stages_per_rank={stages_per_rank}")
    elif not is_single_stage(schedule) and stages_per_rank == 1:
        problems.append(f"pp_schedule={schedule} runs several stages per rank, but stages_per_rank=1; use 2 or more")
    microbatches = num_microbatches(parallel.microbatches, num_stages)
    if microbatches < 1:
        problems.append(f"parallel.microbatches={microbatches} must be >= 1")
    elif schedule in NEEDS_MICROBATCHES_PER_STAGE and microbatches < num_stages:
        problems.append(
            f"pp_schedule={schedule} needs at least as many microbatches as stages: microbatches={microbatches} < "
            f"pp {parallel.pp} × stages_per_rank {stages_per_rank} = {num_stages} (it would stall)"
        )
    if model is not None:
        if num_stages > model.n_layers:
            problems.append(
                f"pp {parallel.pp} × stages_per_rank {stages_per_rank} = {num_stages} stages, more than "
                f"model.n_layers={model.n_layers}; every stage needs at least one block"
            )
        elif parallel.pp_layers is not None:
            problems += check_explicit_split(parallel.pp_layers, model.n_layers, num_stages)
    if parallel.loss_parallel:
        problems.append("parallel.loss_parallel=true is not supported with pp > 1 yet; set it to false")
    return problems


def global_batch_problem(
    global_batch_size: int, dp_size: int, accumulate_grad_batches: int, dp_detail: str = ""
) -> str | None:
    """Why ``global_batch_size`` cannot be split into DP ranks × accumulation steps, or None."""
    per_step = dp_size * accumulate_grad_batches
    if global_batch_size <= 0:
        return f"data.global_batch_size={global_batch_size} must be > 0 (a multiple of {per_step})"
    if global_batch_size % per_step:
        below = (global_batch_size // per_step) * per_step
        nearest = [b for b in (below, below + per_step) if b > 0]
        return (
            f"data.global_batch_size={global_batch_size} is not divisible by the data-parallel size {dp_size}{dp_detail} × "
            f"accumulate_grad_batches={accumulate_grad_batches} = {per_step}; nearest valid: {nearest}"
        )
    return None


def check_layout(
    parallel: ParallelConfig,
    world_size: int,
    model: ModelConfig | None = None,
    data: DataConfig | None = None,
    accumulate_grad_batches: int = 1,
    trainer: TrainerConfig | None = None,
    hardware: Hardware | None = None,
) -> ParallelDims:
    """Return the resolved :class:`ParallelDims`, or raise ``ValueError`` listing every problem.

    ``trainer``: also check its accelerator, devices and precision against ``hardware``
    (detected when None and a GPU is asked for).
    """
    dims, problems = layout_problems(parallel, world_size, model, data, accumulate_grad_batches)
    if trainer is not None:
        problems += trainer_problems(trainer, hardware)
    raise_problems(problems)
    assert dims is not None  # no problems means the dims resolved
    return dims


def layout_problems(
    parallel: ParallelConfig,
    world_size: int,
    model: ModelConfig | None = None,
    data: DataConfig | None = None,
    accumulate_grad_batches: int = 1,
) -> tuple[ParallelDims | None, list[str]]:
    """The resolved :class:`ParallelDims` (None if they do not resolve) and every problem found."""
    problems: list[str] = []
    dims = None
    try:
        dims = ParallelDims.from_config(parallel, world_size)
    except ValueError as error:
        problems.append(str(error))
    tp = max(parallel.tp, 1)
    problems += _pipeline_problems(parallel, model)
    problems += zero_stage_problems(parallel, dims)
    if parallel.cp_backend not in VALID_CP_BACKENDS:
        problems.append(f"parallel.cp_backend={parallel.cp_backend!r} is not one of {list(VALID_CP_BACKENDS)}")
    elif parallel.cp > 1 and parallel.cp_backend == "native":
        problems.append(
            "parallel.cp_backend=native (torch's context_parallel) is not wired in: it has no CPU kernel in torch 2.13 "
            "and is untested here on CUDA; use cp_backend=ring or allgather"
        )
    for name in ("init_timeout_s", "timeout_s"):
        if getattr(parallel, name) <= 0:
            problems.append(f"parallel.{name}={getattr(parallel, name)} must be > 0")
    if model is not None:
        try:
            model.validate()
        except ValueError as error:
            problems.append(str(error))
        for name, value in (("n_heads", model.n_heads), ("n_kv_heads", model.kv_heads), ("vocab_size", model.vocab_size)):
            if value > 0 and value % tp:
                problems.append(
                    f"model.{name}={value} is not divisible by parallel.tp={tp}; "
                    + _valid_tp([model.n_heads, model.kv_heads, model.vocab_size], world_size)
                )
    if data is not None:
        if data.seq_len <= 0:
            problems.append(f"data.seq_len={data.seq_len} must be > 0")
        if model is not None and data.seq_len > model.max_seq_len:
            problems.append(f"data.seq_len={data.seq_len} is longer than model.max_seq_len={model.max_seq_len}")
        cp = max(parallel.cp, 1)
        sp = tp if parallel.sequence_parallel else 1
        pieces = (2 * cp if cp > 1 else 1) * sp
        if pieces > 1 and data.seq_len % pieces:
            factors, reasons = [], []
            if cp > 1:
                factors.append(f"2·cp={2 * cp}")
                reasons.append("context parallel cuts each sequence into 2·cp chunks")
            if sp > 1:
                factors.append(f"parallel.tp={tp}")
                reasons.append("sequence parallel shards the sequence over tp")
            below = data.seq_len // pieces * pieces
            nearest = [n for n in (below, below + pieces) if n > 0]
            problems.append(
                f"data.seq_len={data.seq_len} is not divisible by " + " × ".join(factors)
                + (f" = {pieces}" if len(factors) > 1 else "") + f" ({'; '.join(reasons)}); nearest valid: {nearest}"
                + (", or set parallel.sequence_parallel=false" if sp > 1 else "")
            )
        if accumulate_grad_batches < 1:
            problems.append(f"trainer.accumulate_grad_batches={accumulate_grad_batches} must be >= 1")
        elif dims is not None:
            detail = f" (dp_replicate={dims.dp_replicate} × dp_shard={dims.dp_shard})"
            problem = global_batch_problem(data.global_batch_size, dims.dp, accumulate_grad_batches, detail)
            if problem:
                problems.append(problem)
            elif parallel.pp > 1:
                per_rank = data.global_batch_size // (dims.dp * accumulate_grad_batches)
                microbatches = num_microbatches(parallel.microbatches, parallel.pp * parallel.stages_per_rank)
                if microbatches > 0 and per_rank % microbatches:
                    problems.append(
                        f"the per-rank batch of {per_rank} sequences (global_batch_size={data.global_batch_size} / "
                        f"dp {dims.dp} / accumulate_grad_batches {accumulate_grad_batches}) is not divisible by "
                        f"parallel.microbatches={microbatches}; valid microbatches: {divisors(per_rank)}"
                    )
    return dims, problems


# ----------------------------------------------------------------------------- the module itself


def check_strategy(
    module: Any, parallel: ParallelConfig, perf: PerfConfig, world_size: int, trainer: TrainerConfig, accumulate_grad_batches: int
) -> ParallelDims:
    """The strategy's checks before any process group: the module's contract, the layout
    (against the module's ``model_config`` when it has one), the trainer and the speed levers."""
    problems = module_contract_problems(module, parallel) if module is not None else []
    dims, layout = layout_problems(parallel, world_size, getattr(module, "model_config", None), None, accumulate_grad_batches)
    problems += layout + trainer_problems(trainer)
    if dims is not None:
        problems += perf_problems(perf, dims, trainer.accelerator)
    raise_problems(problems)
    assert dims is not None  # no problems means the dims resolved
    return dims


def module_contract_problems(module: Any, parallel: ParallelConfig) -> list[str]:
    """What a LightningModule must provide for this layout (checked before any process group).

    Any module qualifies: the plan is derived after ``configure_model`` (see
    :mod:`lightning_3d.plans.auto`); only what no plan can fix is refused here."""
    problems = []
    if parallel.pp > 1 and not getattr(module, "automatic_optimization", True):
        problems.append(
            f"parallel.pp={parallel.pp}: {type(module).__name__} uses manual optimization (automatic_optimization=False), "
            "but under pipeline parallel the schedule runs forward and backward itself; use automatic optimization or pp=1"
        )
    return problems


# the weight dim a style shards, by module type: (Colwise, Rowwise)
_SHARDED_DIM = {nn.Linear: (0, 1), nn.Embedding: (1, 0)}


def _tp_shape_problem(name: str, module: nn.Module, style: object, tp: int) -> str | None:
    kind = 0 if isinstance(style, ColwiseParallel) else 1 if isinstance(style, RowwiseParallel) else None
    dims = next((d for t, d in _SHARDED_DIM.items() if isinstance(module, t)), None)
    if kind is None or dims is None:
        return None  # other styles (SequenceParallel, PrepareModuleInput) shard activations only
    weight = module.weight
    dim = dims[kind]
    if weight.shape[dim] % tp:
        return (
            f"{name} ({type(style).__name__} on {type(module).__name__} weight {tuple(weight.shape)}): dim {dim} of size "
            f"{weight.shape[dim]} is not divisible by parallel.tp={tp}"
        )
    return None


def module_problems(module: nn.Module, plan: Any, parallel: ParallelConfig, dims: ParallelDims) -> list[str]:
    """Checks that run from the module itself, for any module (parameters on meta, before parallelizing):
    the plan's names exist, TP-sharded weights divide by tp, there are blocks enough for the pipeline
    stages. What cannot be checked from the module
    (attention heads vs tp, sequence length vs cp) is said once, on rank 0."""
    try:
        root = module.get_submodule(plan.root)
        blocks = blocks_of(root, plan)
    except AttributeError as error:
        return [f"{type(module).__name__}: the plan names a module that does not exist ({error})"]
    problems = []
    if dims.tp > 1:
        found: dict[str, str] = {}  # plan entry → its first problem (blocks repeat the same one)
        named = [(f"{plan.blocks}.{i}.", block, n, s) for i, block in enumerate(blocks) for n, s in plan.block_tp.items()]
        for prefix, owner, name, style in named + [("", root, n, s) for n, s in plan.top_tp.items()]:
            if _missing(owner, name):
                problem = f"{plan.root}.{prefix}{name}: the plan's tensor-parallel style names a module that does not exist"
            else:
                problem = _tp_shape_problem(f"{plan.root}.{prefix}{name}", owner.get_submodule(name), style, dims.tp)
            if problem:
                found.setdefault(name, problem)
        problems += found.values()
    num_stages = dims.pp * parallel.stages_per_rank
    if dims.pp > 1:
        if num_stages > len(blocks):
            problems.append(
                f"pp {dims.pp} × stages_per_rank {parallel.stages_per_rank} = {num_stages} stages, more than the "
                f"{len(blocks)} blocks in {plan.root}.{plan.blocks}; every stage needs at least one block"
            )
        elif parallel.pp_layers is not None:
            problems += check_explicit_split(parallel.pp_layers, len(blocks), num_stages)
    if dims.cp > 1:
        missing = [i for i, block in enumerate(blocks) if _missing(block, plan.attention)]
        if missing:
            problems.append(f"context parallel: blocks {missing[:5]} of {plan.root}.{plan.blocks} have no `{plan.attention}` module")
    if not hasattr(module, "model_config") and (dims.tp > 1 or dims.cp > 1):
        rank_zero_info(
            f"{type(module).__name__}: weight shapes vs tp and blocks vs pipeline stages were checked from the module; "
            "attention heads vs tp cannot be (a projection may divide by tp while its head count does not), and "
            "sequence lengths vs cp are checked batch by batch"
        )
    return problems


def _missing(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return True
    return False


def self_parallelized_problems(module: nn.Module, dims: ParallelDims) -> list[str]:
    """A module that applied TP / FSDP2 itself in configure_model (ModelParallelStrategy style) gets
    nothing on top: it sees the mesh as ``device_mesh["data_parallel"]`` / ``["tensor_parallel"]`` only."""
    extra = {name: size for name, size in (("pp", dims.pp), ("cp", dims.cp)) if size > 1}
    if not extra:
        return []
    return [
        f"{type(module).__name__} parallelized itself in configure_model() (DTensor parameters or fully_shard), so the "
        f"strategy applies nothing on top; {', '.join(f'{k}={v}' for k, v in extra.items())} cannot be added to it. "
        "Use data × tensor parallel only, or let the strategy parallelize (create the model without sharding it)"
    ]
