"""ModelParallel4DStrategy: Lightning's hooks for data × tensor × pipeline × context parallel.

Each hook delegates to one piece: :class:`ParallelDims` (layout and mesh),
:func:`lightning_3d.parallel.parallelize` (the fixed apply order), and the runtime pieces in
:mod:`lightning_3d.runtime` (pipeline runner, step guard, checkpointer, fault monitor, value sync).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only
from torch import Tensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_3d.compat import (
    _PATH,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _materialize_distributed_module,
    _optimizers_to_device,
)
from lightning_3d.config import ParallelConfig, PerfConfig, TrainerConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.launcher import SubprocessLauncher
from lightning_3d.parallel import parallelize
from lightning_3d.parallel.context_parallel import shard_batch
from lightning_3d.parallel.data_parallel import accumulating
from lightning_3d.parallel.materialize import meta_parameters
from lightning_3d.parallel.tied import tied_aliases
from lightning_3d.plans.auto import model_plan
from lightning_3d.runtime import (
    Checkpointer,
    Collectives,
    FaultMonitor,
    Parallelized,
    PipelinedModel,
    StepGuard,
    StopSignal,
    layout_of,
    parallelized,
    wire_model_call,
)
from lightning_3d.validation import check_strategy, module_problems, raise_problems, self_parallelized_problems

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

_PARALLEL_FIELDS = tuple(f.name for f in fields(ParallelConfig))
_PERF_FIELDS = tuple(f.name for f in fields(PerfConfig))


class ModelParallel4DStrategy(ParallelStrategy):
    """Train with FSDP2/HSDP/DDP data parallel, tensor + sequence, pipeline and context parallel from one DeviceMesh.

    Args:
        parallel: a full :class:`ParallelConfig`; or give its fields as keywords
            (``ModelParallel4DStrategy(dp_shard=2, tp=2)``), which override it.
        perf: the speed levers (:class:`PerfConfig`); its fields may also be given as keywords.
        init_seed: seed of the initial weights, drawn per parameter name so that every
            layout starts from the same full model.
        process_group_backend: ``gloo`` / ``nccl``; default from the device.
        async_save: write checkpoints in a background thread.
        on_nonfinite: ``"stop"`` raises on every rank when any rank's loss or gradient norm is
            not finite, before the optimizer step; ``"skip"`` drops that update.
        max_skipped: with ``"skip"``, the number of skipped steps in a row tolerated.

    The LightningModule creates its model in ``configure_model()`` (parameters on the meta
    device). The plan is derived from the model (a transformers model's declared plans, or
    data parallel over the repeated blocks of any other model); a module may return its own
    :class:`ParallelPlan` from ``parallel_plan(parallel_config)`` and fill full parameter
    tensors in ``init_parameter(name, tensor, generator)``, or parallelize itself with
    ``self.device_mesh`` as under Lightning's ``ModelParallelStrategy``; see docs/your-model.md.
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
        self.async_save = async_save
        self.num_nodes = 1
        self._process_group_backend = process_group_backend
        self._guard = StepGuard(on_nonfinite, max_skipped)
        self._stop = StopSignal()
        self._faults = FaultMonitor(self.parallel)
        self._state: Optional[Parallelized] = None
        self._dims: Optional[ParallelDims] = None
        self._checkpointer: Optional[Checkpointer] = None
        self._collectives: Optional[Collectives] = None

    # ------------------------------------------------------------------ layout
    @property
    def dims(self) -> ParallelDims:
        if self._dims is None:
            raise RuntimeError("the parallel layout is resolved in setup_environment(); it is not known yet")
        return self._dims

    @property
    def device_mesh(self) -> "DeviceMesh":
        return self._parallelized().mesh

    @property
    def meshes(self) -> dict[str, "DeviceMesh"]:
        """Views of the mesh by name: pp, dp_replicate, dp_shard, cp, tp, dp, fsdp, loss (and hsdp with dp_replicate > 1)."""
        return self._parallelized().meshes

    def _parallelized(self) -> Parallelized:
        if self._state is None:
            raise RuntimeError("the device mesh is built in setup_environment(); it does not exist yet")
        return self._state

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def is_distributed(self) -> bool:
        # Lightning syncs `self.log(..., sync_dist=True)` only for strategies that say so
        return True

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

    # read by callbacks, the CLI, benchmarks and tests
    nonfinite = property(lambda self: self._guard.nonfinite, doc="the non-finite policy and its skip counts")
    last_grad_norm = property(lambda self: self._guard.last_grad_norm, doc="the last step's global gradient norm")
    failure_report = property(lambda self: self._faults.failure_report, doc="which ranks broke the job, if known")
    checkpointer = property(lambda self: self._checkpointer, doc="the DCP checkpointer (after setup)")

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
            plugin.clip_grad_by_norm = lambda optimizer, value: self._guard.clip(plugin.main_params(optimizer), float(value))  # type: ignore[method-assign]
        self._precision_plugin = plugin

    # ------------------------------------------------------------------ setup
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if not self.cluster_environment.creates_processes_externally:
            self._launcher = SubprocessLauncher(self.cluster_environment, self.num_processes, self.num_nodes)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = utils_rank_zero_only.rank = self.global_rank
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        # Validate before any process group exists, so a bad layout never hangs.
        self._dims = check_strategy(
            module, self.parallel, self.perf, self.world_size,
            TrainerConfig(self.root_device.type, self.num_processes, self.num_nodes, str(self.precision_plugin.precision)),
            trainer.accumulate_grad_batches if trainer is not None else 1,
        )
        self._state = parallelized(module, self._dims)
        reset_seed()
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        dump_dir = str(Path(trainer.default_root_dir if trainer is not None else ".") / "nccl_traces")
        self._faults.connect(self.cluster_environment, backend, self.root_device, self.global_rank, self.world_size, dump_dir, self.async_save)
        if self._state is None:
            # a module with its own plan does not parallelize itself: it needs no Lightning-named dims
            mesh, meshes = self._dims.build_mesh(self.root_device.type, lightning_names=not hasattr(module, "parallel_plan"))
            self._state = Parallelized(self._dims, mesh, meshes)
        self._collectives = Collectives(self._state.meshes, self._faults.io_group, self.root_device)
        self._faults.watch([mesh.get_group() for mesh in self._state.meshes.values() if mesh.ndim == 1])
        if module is not None:
            module._device_mesh = self._state.mesh

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
        state = self._parallelized()
        if not state.stages:  # validate/test/predict after fit, or a new Trainer, reuse the parallelized module
            self._parallelize(module, state)
        self._checkpointer = Checkpointer(
            state.root, self.dims.pp > 1, layout_of(self.dims, self.parallel), self.global_rank, self.world_size,
            self._faults.io_group, self.async_save, self._faults.async_group,
        )
        self._collectives.attach_metrics(module)
        if state.pipeline is not None:
            state.pipeline.attach(trainer)
            state.pipeline.defer = self._guard.defer
        # a token-loss sum counts once per data shard: on the first tp rank of the stage holding the loss
        holds_loss = state.pipeline is None or state.pipeline.holds_last_stage
        counts_loss = holds_loss and self.meshes["tp"].get_local_rank() == 0
        self._guard.setup(self.world_size // self.dims.pp, self.root_device, self.meshes["loss"].size(), counts_loss)
        if trainer.state.fn == TrainerFn.FITTING and self.world_size > 1:
            # SIGTERM agreed on in the step check, not broadcast every batch
            self._stop.attach(trainer)
        else:
            self._stop.detach()
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self._reset_optimizers_and_schedulers()
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _parallelize(self, module: "pl.LightningModule", state: Parallelized) -> None:
        derived = model_plan(module, self.parallel, self.dims)
        if derived.plan is None:  # configure_model() applied its own TP / FSDP2 (ModelParallelStrategy style)
            raise_problems(self_parallelized_problems(module, self.dims))
            _materialize_distributed_module(module, self.root_device)
            state.stages = [(0, module)]
            state.attach(module)
            return
        plan = derived.plan
        if derived.kind == "transformers" and self.perf.activation_checkpoint == "op":
            # per-op selective checkpointing replays each op; transformers' attention takes other
            # branches on recompute than in forward (torch then fails in backward)
            derived.problems.append(
                "perf.activation_checkpoint=op is not supported for transformers models (their attention does not replay "
                "op for op); use full or selective"
            )
        raise_problems(derived.problems + module_problems(module, plan, self.parallel, self.dims))
        self.model = self.precision_plugin.convert_module(self.model)
        state.root = plan.root
        aliases = tied_aliases(module.get_submodule(plan.root), plan.root)
        calls_model = self.dims.pp > 1 and not hasattr(module, "pipeline_batch")
        state.stages = parallelize(
            module, plan, state.meshes, self.dims, self.parallel,
            precision=str(self.precision_plugin.precision), device=self.root_device,
            init_fn=derived.init_fn, seed=self.init_seed, perf=self.perf,
            stage_list=PipelinedModel if calls_model else torch.nn.ModuleList,
        )
        wire_model_call(module, state, plan, self.parallel, self.root_device, aliases, hook=derived.kind == "transformers")
        state.attach(module)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    # ------------------------------------------------------------------ steps
    def _step_context(self) -> AbstractContextManager:
        return loss_parallel() if self.parallel.loss_parallel and self.dims.tp > 1 else nullcontext()

    def _cut(self, batch: Any) -> Any:
        if self.dims.cp == 1:
            return batch
        keys = getattr(self.lightning_module, "context_parallel_keys", ())
        cut = shard_batch(batch, self.meshes["cp"].get_local_rank(), self.dims.cp, keys)
        shifted_labels = self._parallelized().shifted_labels
        if shifted_labels is not None:  # the model shifts labels inside: shift them before the cut
            shifted_labels.remember(batch, cut)
        return cut

    def _run_step(self, stage: str, context: AbstractContextManager, step: Callable[..., Any], batch: Any, *args: Any, **kwargs: Any) -> Any:
        """A step on this rank's part of the batch: the pipeline schedule under PP, else the module's own step."""
        batch = self._cut(batch)
        pipeline = self._parallelized().pipeline
        if pipeline is not None:
            if stage == "predict":
                raise ConfigError(f"predict is not supported with pipeline parallel (pp={self.dims.pp}); predict with pp=1")
            batch_idx = args[0] if args else kwargs["batch_idx"]
            with context:
                if hasattr(self.lightning_module, "pipeline_batch"):
                    return pipeline.step(self.lightning_module, batch, batch_idx, stage)
                # the module's own step; its model call runs the schedule (PipelinedModel)
                pipeline.begin(self.lightning_module, stage, batch_idx)
                output = step(batch, *args, **kwargs)
                pipeline.end()
                return output
        with context, self._step_context():
            return step(batch, *args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_step("train", self.precision_plugin.train_step_context(), self.lightning_module.training_step, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_step("val", self.precision_plugin.val_step_context(), self.lightning_module.validation_step, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_step("test", self.precision_plugin.test_step_context(), self.lightning_module.test_step, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._run_step("predict", self.precision_plugin.predict_step_context(), self.lightning_module.predict_step, *args, **kwargs)

    def token_sum_loss(self, summed: Tensor, tokens: Tensor) -> Tensor:
        """The loss to backward for a token-weighted mean over the whole optimizer step, with no
        collective in the forward pass.

        ``summed``: this rank's summed token losses of the micro-batch; ``tokens``: how many
        tokens it scored. Returns ``summed`` × (ranks the data is spread over). After backward,
        the step's check (one all-reduce) adds up the sums and counts of every micro-batch and
        rank; the gradients are then divided by the global token count before any hook or the
        optimizer sees them, and ``record_loss("train", global_mean, tokens)`` is called on the
        module (which must define it).
        """
        self._guard.defer(summed, tokens)
        return summed * self.meshes["loss"].size()

    @override
    def backward(self, closure_loss: Tensor, optimizer: Optional[Optimizer], *args: Any, **kwargs: Any) -> Tensor:
        with self._step_context():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    @contextmanager
    @override
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning runs every micro-batch of an optimizer step but the last inside this: the
        data-parallel gradient reductions wait for the last one (:func:`accumulating`). Under
        PP the schedule reduces at the end of each of its steps itself (docs/parallelism.md)."""
        if self.dims.pp > 1:
            yield
            return
        with accumulating(self.lightning_module, self.parallel.zero_stage):
            yield

    @override
    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Optional[Any] = None, **kwargs: Any) -> Any:
        """Forward and backward, then one agreed check of the loss and gradient norm on every rank,
        then (unless the step stops or is skipped) clipping and the optimizer update."""
        loss = closure()
        module = self.lightning_module
        trainer = module.trainer
        step = trainer.global_step
        fold = self._guard.folds_into_clip(trainer, module)
        params = self.precision_plugin.main_params(optimizer)
        skip = self._guard.should_skip(params, loss, step, trainer.accumulate_grad_batches, fold, self._stop.requested)
        self._stop.agreed(self._guard.stop_agreed)
        if self._guard.step_loss is not None:  # a deferred token loss: its global mean is known now
            module.record_loss("train", *self._guard.step_loss)
        if skip:
            optimizer.zero_grad(set_to_none=True)
            result = None
        else:
            result = super().optimizer_step(optimizer, lambda: loss, model, **kwargs)
            self._guard.check_normalized()
        self._faults.step_done(step + 1)
        return result

    # validation, test and predict wait with the startup timeout: only training steps get the short one
    @override
    def on_validation_start(self) -> None:
        self._faults.pause()

    @override
    def on_test_start(self) -> None:
        self._faults.pause()

    @override
    def on_predict_start(self) -> None:
        self._faults.pause()

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._faults.on_exception(self.global_rank, exception)

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self.checkpointer.model_state(self.lightning_module)

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return self.checkpointer.optimizer_state(self.lightning_module, optimizer)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options (it writes with DCP)")
        path = Path(self.broadcast(str(filepath)))  # rank 0 names the folder for everyone
        self.checkpointer.save(checkpoint, path, {"nonfinite": self._guard.state_dict()}, self.barrier)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        self.checkpointer.remove(Path(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        trainer_state = self.checkpointer.load(self.lightning_module, self.optimizers, path)
        self._guard.load_state_dict(trainer_state.get("nonfinite", {}))
        return trainer_state

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint() already read the model state in place

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint() already read the optimizer state in place

    # ------------------------------------------------------------------ collectives
    @override
    def barrier(self, name: Optional[str] = None) -> None:
        if self._collectives is not None:
            self._collectives.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return self._collectives.broadcast(obj, src) if self._collectives is not None else obj

    @override
    def reduce(self, tensor: Union[Tensor, Any], group: Optional[Any] = None, reduce_op: Optional[Union[ReduceOp, str]] = "mean") -> Union[Tensor, Any]:
        """Over the ranks that hold distinct data (dp × cp), as the last pipeline stage has it (see :class:`Collectives`)."""
        return self._collectives.reduce(tensor, group, reduce_op) if self._collectives is not None and isinstance(tensor, Tensor) else tensor

    @override
    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        """From the ranks that hold distinct data (dp × cp), as the last pipeline stage has them."""
        return self._collectives.all_gather(tensor, group, sync_grads) if self._collectives is not None else tensor

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return self._collectives.vote(decision, all) if self._collectives is not None else decision

    @override
    def teardown(self) -> None:
        assert self.cluster_environment is not None and self.accelerator is not None
        if _distributed_is_initialized() and self._checkpointer is not None:
            try:
                self._checkpointer.finish_pending()
            except Exception as error:
                if not self._faults.failed:
                    raise
                # the run already failed (a peer may be gone): the unfinished save has no metadata
                # and is never taken for a checkpoint; keep the original error
                rank_zero_warn(f"the background checkpoint save did not finish: {error}")
        self._faults.stop()
        self._stop.detach()
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: "StrategyRegistry") -> None:
        strategy_registry.register(cls.strategy_name, cls, description="4D parallel: FSDP2/HSDP/DDP × TP/SP × PP × CP")


ModelParallel4DStrategy.register_strategies(StrategyRegistry)
