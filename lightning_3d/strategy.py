"""ModelParallel4DStrategy: a Lightning strategy for data × tensor (× pipeline × context) parallel."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.distributed.distributed_c10d as c10d
from lightning.fabric.utilities.distributed import (
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH, ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import (
    rank_zero_info,
    rank_zero_only,
    rank_zero_warn,
)
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor.parallel import loss_parallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_3d.checkpoint import (
    MODEL_KEY,
    RNG_DIR,
    TRAINER_STATE,
    SafeLoadPlanner,
    SafeReader,
    canonical_names,
    fit_problems,
    load_trainer_state,
    local_names,
    raise_if_problems,
    read_metadata,
    remove_folder,
    rng_file,
    rng_state,
    set_rng_state,
    write_atomically,
)
from lightning_3d.config import ParallelConfig, PerfConfig, TrainerConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.health import Heartbeat, is_communication_failure, nccl_debug_env
from lightning_3d.launcher import SubprocessLauncher
from lightning_3d.loss import count_tokens, sum_over
from lightning_3d.nonfinite import NonFiniteError, NonFiniteGuard, step_health
from lightning_3d.parallel import parallelize
from lightning_3d.parallel.context_parallel import shard_batch
from lightning_3d.parallel.materialize import meta_parameters
from lightning_3d.parallel.grad_clip import clip_grad_norm_, reduce_partial_grads
from lightning_3d.parallel.pipeline_parallel import (
    PipelineLoss,
    build_schedules,
    num_microbatches,
)
from lightning_3d.plans.base import ParallelPlan
from lightning_3d.validation import check_layout, perf_problems, raise_problems

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_PARALLEL_FIELDS = tuple(f.name for f in fields(ParallelConfig))
_PERF_FIELDS = tuple(f.name for f in fields(PerfConfig))
# optimizer states are saved flattened (one entry per parameter), which is what lets DCP reshard them
_FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


class ModelParallel4DStrategy(ParallelStrategy):
    """Train with FSDP2/HSDP/DDP data parallel and tensor + sequence parallel from one DeviceMesh.

    Args:
        parallel: a full :class:`ParallelConfig`; or give its fields as keywords
            (``ModelParallel4DStrategy(dp_shard=2, tp=2)``), which override it.
        perf: the speed levers (:class:`PerfConfig`: activation checkpointing, compile, FSDP2
            prefetch, CPU offload, float8); its fields may also be given as keywords
            (``activation_checkpoint="full"``, ``compile=True``).
        init_seed: seed of the initial weights, drawn per parameter name so that every
            layout starts from the same full model.
        process_group_backend: ``gloo`` / ``nccl``; default from the device.
        async_save: write checkpoints in a background thread; the loop is blocked only while
            the states are copied to CPU memory.
        on_nonfinite: ``"stop"`` raises :class:`NonFiniteError` on every rank when any rank's loss
            or gradient norm is not finite, before the optimizer step; ``"skip"`` drops that update.
        max_skipped: with ``"skip"``, the number of skipped steps in a row tolerated.

    The LightningModule creates its model in ``configure_model()`` (run on the meta
    device), returns a :class:`ParallelPlan` from ``parallel_plan(parallel_config)`` and
    fills full parameter tensors in ``init_parameter(name, tensor, generator)``; see the
    README's "Bring your own model".
    """

    strategy_name = "4d"

    def __init__(
        self,
        parallel: Optional[ParallelConfig] = None,
        *,
        perf: Optional[PerfConfig] = None,
        init_seed: int = 0,
        process_group_backend: Optional[str] = None,
        async_save: bool = False,
        on_nonfinite: str = "stop",
        max_skipped: int = 5,
        **options: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(_PARALLEL_FIELDS) - set(_PERF_FIELDS))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; valid: {list(_PARALLEL_FIELDS + _PERF_FIELDS)}")
        self.parallel = replace(parallel or ParallelConfig(), **{k: v for k, v in options.items() if k in _PARALLEL_FIELDS})
        self.perf = replace(perf or PerfConfig(), **{k: v for k, v in options.items() if k in _PERF_FIELDS})
        self.init_seed = init_seed
        self._process_group_backend = process_group_backend
        self._dims: Optional[ParallelDims] = None
        self._device_mesh: Optional[DeviceMesh] = None
        self._meshes: dict[str, DeviceMesh] = {}
        self.num_nodes = 1
        self.async_save = async_save
        self._plan_root = ""
        self._checkpoint_group: Optional[dist.ProcessGroup] = None
        self._pending_save: Optional[Future] = None
        self._pending_removals: list[Path] = []
        self.save_blocked_s: list[float] = []  # seconds each save held up the training loop
        self.load_s: Optional[float] = None  # seconds the last checkpoint load took
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_skipped)
        self._step_grad_norm: Optional[Tensor] = None  # computed by the step check, reused by clipping
        self.last_grad_norm: Optional[Tensor] = None  # the last step's global gradient norm, before clipping
        self._steady_timeouts = False  # parallel.timeout_s applies once the first step is done
        self._heartbeat: Optional[Heartbeat] = None
        self._failed = False
        self.failure_report: Optional[str] = None  # which ranks broke the job, after a communication failure

    # ------------------------------------------------------------------ layout
    @property
    def dims(self) -> ParallelDims:
        if self._dims is None:
            raise RuntimeError("the parallel layout is resolved in setup_environment(); it is not known yet")
        return self._dims

    @property
    def device_mesh(self) -> "DeviceMesh":
        if self._device_mesh is None:
            raise RuntimeError("the device mesh is built in setup_environment(); it does not exist yet")
        return self._device_mesh

    @property
    def meshes(self) -> dict[str, "DeviceMesh"]:
        """Views of the mesh by name: pp, dp_replicate, dp_shard, cp, tp, dp, fsdp, loss (and hsdp with dp_replicate > 1)."""
        if not self._meshes:
            raise RuntimeError("the device mesh is built in setup_environment(); it does not exist yet")
        return self._meshes

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        dp_mesh = self.meshes["dp"]
        return {"num_replicas": dp_mesh.size(), "rank": dp_mesh.get_local_rank()}

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False

    # ------------------------------------------------------------------ precision
    @property
    @override
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else Precision()

    @precision_plugin.setter
    @override
    def precision_plugin(self, plugin: Optional[Precision]) -> None:
        # Lightning clips through its precision plugin, whose clip_grad_norm_ cannot combine
        # DTensor gradients on different meshes: route norm clipping to the global version.
        if plugin is not None:
            plugin.clip_grad_by_norm = self._clip_grad_by_norm  # type: ignore[method-assign]
        self._precision_plugin = plugin

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: Union[int, float]) -> None:
        norm, self._step_grad_norm = self._step_grad_norm, None
        params = self.precision_plugin.main_params(optimizer)
        clip_grad_norm_(params, float(clip_val), self._ranks_per_stage, self.root_device, norm=norm)

    @property
    def _ranks_per_stage(self) -> int:
        return self.dims.world_size // self.dims.pp

    # ------------------------------------------------------------------ setup
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = SubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        self._set_world_ranks()
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        # Validate before any process group exists, so a bad layout never hangs.
        if module is not None and self.parallel.pp > 1:
            missing = [hook for hook in ("pipeline_batch", "record_loss") if not hasattr(module, hook)]
            if missing:
                raise ConfigError(
                    f"parallel.pp={self.parallel.pp}: {type(module).__name__} lacks {missing}; a pipelined module "
                    "defines `pipeline_batch(batch) -> (input_ids, labels)` and `record_loss(stage, loss, tokens)` "
                    "(see README, 'Bring your own model')"
                )
        if module is not None and not hasattr(module, "parallel_plan"):
            raise ConfigError(
                f"{type(module).__name__} defines no `parallel_plan(parallel_config)` method: the strategy needs "
                f"the block container and root module to shard (parallel.tp={self.parallel.tp}); see ParallelPlan"
            )
        self._dims = check_layout(
            self.parallel,
            self.world_size,
            model=getattr(module, "model_config", None),
            accumulate_grad_batches=trainer.accumulate_grad_batches if trainer is not None else 1,
            trainer=TrainerConfig(
                accelerator=self.root_device.type,
                devices=self.num_processes,
                num_nodes=self.num_nodes,
                precision=str(self.precision_plugin.precision),
            ),
        )
        raise_problems(perf_problems(self.perf, self._dims, self.root_device.type))
        reset_seed()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        if backend == "nccl":
            # a hung collective then leaves a flight-recorder dump per rank (explicit settings win)
            dump_dir = os.path.join(trainer.default_root_dir if trainer is not None else ".", "nccl_traces")
            for name, value in nccl_debug_env(dump_dir).items():
                os.environ.setdefault(name, value)
        _init_dist_connection(
            self.cluster_environment,
            backend,
            timeout=timedelta(seconds=self.parallel.init_timeout_s),
            device_id=self.root_device if self.root_device.type != "cpu" else None,
            **self._restarted_worker_store(),
        )
        self._heartbeat = Heartbeat.from_environment(self.global_rank, self.world_size)
        self._device_mesh, self._meshes = self._dims.build_mesh(self.root_device.type)
        if module is not None:
            module._device_mesh = self._device_mesh
        if self.async_save:
            # the background save runs collectives while training runs its own: separate group
            self._checkpoint_group = dist.new_group(backend="gloo")

    def _restarted_worker_store(self) -> dict[str, Any]:
        """Under ``torchrun --max-restarts``, a store private to this restart.

        The agent keeps one store for all restarts of its workers and the default group's
        keys are the same each time, so a restarted rank can read a peer's address from the
        attempt that died and fail to connect. Prefixing the keys with the restart count
        (set by torchrun) keeps each attempt to its own.
        """
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return {}
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size, is_master=False,
            timeout=timedelta(seconds=self.parallel.init_timeout_s),
        )
        return {"store": dist.PrefixStore(f"lightning_3d/restart-{restart}", store)}

    def _set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: Optional[bool] = None) -> Generator[None, None, None]:
        # configure_model() creates its parameters on the meta device (buffers as usual): weights
        # are materialized shard by shard after parallelization, so no rank ever holds the full model.
        with meta_parameters(), self.precision_plugin.tensor_init_context():
            yield

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        plan = self._resolve_plan(module)
        self._plan_root = plan.root
        self.model = self.precision_plugin.convert_module(self.model)
        stages = parallelize(
            module,
            plan,
            self.meshes,
            self.dims,
            self.parallel,
            precision=str(self.precision_plugin.precision),
            device=self.root_device,
            init_fn=getattr(module, "init_parameter", None),
            seed=self.init_seed,
            perf=self.perf,
        )
        if self.dims.pp > 1:
            self._setup_pipeline(stages)
            # The schedule runs backward inside training_step; Lightning's closure would zero
            # the gradients after it and backward again. Switch both off (as Lightning's own
            # SWA callback does) and zero the gradients in _pipeline_step instead.
            trainer.fit_loop._skip_backward = True
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _resolve_plan(self, module: "pl.LightningModule") -> ParallelPlan:
        plan = module.parallel_plan(self.parallel)  # its presence is checked in setup_environment()
        if not isinstance(plan, ParallelPlan):
            raise TypeError(f"{type(module).__name__}.parallel_plan() returned {type(plan).__name__}, not a ParallelPlan")
        return plan

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------ pipeline
    def _setup_pipeline(self, stages: list[tuple[int, torch.nn.Module]]) -> None:
        num_stages = self.parallel.pp * self.parallel.stages_per_rank
        self._pipeline_loss = PipelineLoss()
        self._schedule, self._eval_schedule = build_schedules(
            stages,
            num_stages,
            self.parallel.pp_schedule,
            num_microbatches(self.parallel.microbatches, num_stages),
            self.root_device,
            self.meshes["pp"].get_group(),
            self._pipeline_loss,
        )
        indices = [index for index, _ in stages]
        self._holds_first_stage = 0 in indices
        self._holds_last_stage = num_stages - 1 in indices

    def _pipeline_step(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        """Run the schedule on this rank's batch; return the global token-weighted mean loss.

        Training runs forward and backward of every microbatch here (Lightning's own
        backward is then skipped); validation runs forward only.
        """
        module = self.lightning_module
        inputs, labels = module.pipeline_batch(batch)
        loss_mesh = self.meshes["loss"]
        tokens = sum_over(count_tokens(labels), loss_mesh)
        trainer = module.trainer
        accumulate = trainer.accumulate_grad_batches if stage == "train" else 1
        if stage == "train" and batch_idx % accumulate == 0:  # first batch of an optimizer step
            for optimizer in self.optimizers:
                module.optimizer_zero_grad(trainer.current_epoch, batch_idx, optimizer)
        self._pipeline_loss.scale = loss_mesh.size() / (tokens.clamp(min=1) * accumulate).float()
        losses: list[Tensor] = []
        run = self._schedule.step if stage == "train" else self._eval_schedule.eval
        run(
            *((inputs,) if self._holds_first_stage else ()),
            target=labels if self._holds_last_stage else None,
            losses=losses,
            return_outputs=False,  # only the losses are needed, not the merged logits
        )
        # this rank's token-loss sum / global tokens, on the last stage only; then summed over
        # the loss mesh (→ the global mean) and over the pp mesh (→ on every stage)
        mean = torch.zeros((), dtype=torch.float64, device=self.root_device)
        if self._holds_last_stage:
            mean += torch.stack(losses).detach().double().sum() * accumulate / loss_mesh.size()
        sum_over(sum_over(mean, loss_mesh), self.meshes["pp"])
        global_loss = mean.float()
        module.record_loss(stage, global_loss, tokens)
        return global_loss

    # ------------------------------------------------------------------ steps
    def _loss_parallel_context(self) -> AbstractContextManager:
        return loss_parallel() if self.parallel.loss_parallel and self.dims.tp > 1 else nullcontext()

    def _shard_for_context_parallel(self, batch: Any) -> Any:
        if self.dims.cp == 1:
            return batch
        keys = getattr(self.lightning_module, "context_parallel_keys", ())
        return shard_batch(batch, self.meshes["cp"].get_local_rank(), self.dims.cp, keys)

    @override
    def training_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        batch = self._shard_for_context_parallel(batch)
        if self.dims.pp > 1:
            with self.precision_plugin.train_step_context():
                return self._pipeline_step(batch, batch_idx, "train")
        with self._loss_parallel_context():
            return super().training_step(batch, batch_idx, *args, **kwargs)

    @override
    def validation_step(self, batch: Any, batch_idx: int, *args: Any, **kwargs: Any) -> Any:
        batch = self._shard_for_context_parallel(batch)
        if self.dims.pp > 1:
            with self.precision_plugin.val_step_context():
                return self._pipeline_step(batch, batch_idx, "val")
        with self._loss_parallel_context():
            return super().validation_step(batch, batch_idx, *args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        with self._loss_parallel_context():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Any] = None, **kwargs: Any
    ) -> Any:
        """Forward and backward, then one agreed check of the loss and gradient norm on every rank,
        then (unless the step stops or is skipped) clipping and the optimizer update."""
        loss = closure()
        trainer = self.lightning_module.trainer
        params = list(self.precision_plugin.main_params(optimizer))
        reduce_partial_grads(params)
        norm, bad_loss, bad_grads = step_health(params, loss, self._ranks_per_stage, self.root_device)
        self.last_grad_norm = norm
        if self.nonfinite.should_skip(trainer.global_step, bad_loss, bad_grads):
            optimizer.zero_grad(set_to_none=True)
            result = None
        else:
            self._step_grad_norm = norm
            result = super().optimizer_step(optimizer, lambda: loss, model, **kwargs)
            self._step_grad_norm = None
        self._after_step(trainer.global_step + 1)
        return result

    def _after_step(self, steps_done: int) -> None:
        if self._heartbeat is not None:
            self._heartbeat.step = steps_done
        if not self._steady_timeouts and _distributed_is_initialized():
            # startup and the first step are done: from now on a long wait means a lost rank
            timeout = timedelta(seconds=self.parallel.timeout_s)
            for group in list(c10d._world.pg_map):
                c10d._set_pg_timeout(timeout, group)
            self._steady_timeouts = True

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Tell the other ranks this one failed and, after a failed collective, name the rank that broke the job."""
        self._failed = True
        if self._heartbeat is None or isinstance(exception, (NonFiniteError, KeyboardInterrupt)):
            return  # every rank raised the same error together, or the user stopped the run
        self._heartbeat.report_failure(exception)
        if is_communication_failure(exception):
            self.failure_report = self._heartbeat.wait_for_diagnosis()
            exception.add_note(f"lightning_3d (rank {self.global_rank}): {self.failure_report}")
        self._heartbeat.linger()

    # ------------------------------------------------------------------ checkpoints
    def _canonical(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return canonical_names(state, self._plan_root, self.dims.pp > 1)

    def _layout(self) -> dict[str, Any]:
        """What must match for RNG states to be restored rank by rank."""
        dims = self.dims
        return {
            "world_size": self.world_size,
            "dims": [dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp],
            "stages_per_rank": self.parallel.stages_per_rank,
            "pp_schedule": self.parallel.pp_schedule if dims.pp > 1 else None,
        }

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This rank's shards of the model, under the unsplit model's parameter names."""
        return self._canonical(get_model_state_dict(self.lightning_module))

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """This rank's shards of the optimizer state, flattened per parameter name."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer → torch optimizer
        return self._canonical(get_optimizer_state_dict(self.lightning_module, optimizer, options=_FLAT_OPTIMIZER))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        """Write the folder ``filepath``: DCP shards from every rank, then the trainer state and RNG
        states, then DCP's metadata last, so that an interrupted save is never taken for a checkpoint."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options (it writes with DCP)")
        path = Path(self.broadcast(str(filepath)))  # rank 0 names the folder for everyone
        self._finish_pending_save()
        if self.is_global_zero and path.exists():
            remove_folder(path)  # an interrupted save of the same step, or a file in the way
        self.barrier()
        (path / RNG_DIR).mkdir(parents=True, exist_ok=True)
        tensors = {MODEL_KEY: checkpoint.pop(MODEL_KEY)}
        tensors.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        checkpoint["layout"] = self._layout()
        checkpoint["model_root"] = self._plan_root
        checkpoint["nonfinite"] = self.nonfinite.state_dict()
        started = time.perf_counter()
        torch.save(rng_state(), rng_file(path, self.global_rank))
        if self.is_global_zero:
            write_atomically(checkpoint, path / TRAINER_STATE)
        writer = FileSystemWriter(path)
        if self.async_save:
            # returns once the states are staged in CPU memory; DCP writes .metadata when every rank is done
            self._pending_save = dcp.async_save(tensors, storage_writer=writer, process_group=self._checkpoint_group)
        else:
            dcp.save(tensors, storage_writer=writer)
        self.save_blocked_s.append(time.perf_counter() - started)

    def _finish_pending_save(self) -> None:
        """Wait for a background save, then delete what was waiting for it to complete."""
        if self._pending_save is not None:
            self._pending_save.result()
            self._pending_save = None
        if self.is_global_zero:
            for path in self._pending_removals:
                remove_folder(path)
        self._pending_removals.clear()

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        # never delete an older checkpoint while the newer one is still being written
        if self._pending_save is not None:
            self._pending_removals.append(Path(filepath))
        elif self.is_global_zero:
            remove_folder(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read the model (and, when fitting, the optimizer) states in place, resharded to this
        layout; return the rest of the checkpoint for Lightning to restore."""
        path = Path(self.broadcast(str(checkpoint_path)))
        self._finish_pending_save()
        started = time.perf_counter()
        module = self.lightning_module
        model_state = get_model_state_dict(module)
        tensors: dict[str, Any] = {MODEL_KEY: self._canonical(model_state)}
        self._check_checkpoint_fits(path, tensors[MODEL_KEY])
        trainer_state = load_trainer_state(path)
        saved = {key.partition(".")[0] for key in read_metadata(path).state_dict_metadata}
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        # a weights-only checkpoint has no optimizer entries: the optimizers keep their fresh state
        optimizers = [opt for i, opt in enumerate(self.optimizers) if fitting and f"optimizer_{i}" in saved]
        optimizer_keys = []
        for index, optimizer in enumerate(optimizers):
            state = get_optimizer_state_dict(module, optimizer, options=_FLAT_OPTIMIZER)
            optimizer_keys.append(list(state))
            tensors[f"optimizer_{index}"] = self._canonical(state)
        try:
            dcp.load(tensors, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
        except CheckpointException as error:
            raise ConfigError(f"checkpoint {path} could not be read (corrupted shard?): {error}") from error
        pipelined = self.dims.pp > 1
        set_model_state_dict(module, local_names(tensors[MODEL_KEY], model_state, self._plan_root, pipelined))
        for index, (optimizer, keys) in enumerate(zip(optimizers, optimizer_keys)):
            state = local_names(tensors[f"optimizer_{index}"], keys, self._plan_root, pipelined)
            set_optimizer_state_dict(module, optimizer, state, options=_FLAT_OPTIMIZER)
        if trainer_state.get("layout") == self._layout():
            set_rng_state(torch.load(rng_file(path, self.global_rank), weights_only=True))
        else:
            rank_zero_info(f"RNG states not restored: the checkpoint was written by layout {trainer_state.get('layout')}")
        self.nonfinite.load_state_dict(trainer_state.get("nonfinite", {}))
        self.load_s = time.perf_counter() - started
        return trainer_state

    def _check_checkpoint_fits(self, path: Path, model_state: Mapping[str, Any]) -> None:
        """The same verdict on every rank (shapes are gathered first), so a checkpoint that does
        not fit fails everywhere instead of hanging the ranks whose own part fits."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {name: tuple(tensor.shape) for name, tensor in model_state.items()})
        shapes = {name: shape for rank_shapes in gathered for name, shape in rank_shapes.items()}
        raise_if_problems(f"checkpoint {path} does not fit this model", fit_problems(path, shapes))

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint() already read the model state in place

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint() already read the optimizer state in place

    # ------------------------------------------------------------------ collectives
    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if not _distributed_is_initialized():
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.root_device.index])
        else:
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not _distributed_is_initialized():
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src)
        return holder[0]

    @override
    def reduce(
        self, tensor: Union[Tensor, Any], group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean"
    ) -> Union[Tensor, Any]:
        if isinstance(tensor, Tensor):
            return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)
        return tensor

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        if _distributed_is_initialized():
            try:
                self._finish_pending_save()
            except Exception as error:
                if not self._failed:
                    raise
                # the run already failed (a peer may be gone): the unfinished save has no metadata
                # and is never taken for a checkpoint; keep the original error
                rank_zero_warn(f"the background checkpoint save did not finish: {error}")
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: "StrategyRegistry") -> None:
        strategy_registry.register(cls.strategy_name, cls, description="4D parallel: FSDP2/HSDP/DDP × TP/SP")


ModelParallel4DStrategy.register_strategies(StrategyRegistry)
