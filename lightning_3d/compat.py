"""Every private torch / Lightning API the project touches, in one place.

Each was checked on torch 2.13.0 and lightning 2.6.6 (the versions CI installs); the
comment on each names what it is for and, where known, since when it exists. When a new
release moves one of them, this is the only file to change.
"""

from __future__ import annotations

# ruff: noqa: F401, I001 — re-exports, grouped by library and purpose rather than sorted

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.distributed_c10d as c10d

# torch ≥ 2.6: resolve a functional collective's group name to its ProcessGroup (comm accounting)
from torch._C._distributed_c10d import _resolve_process_group
# torch ≥ 2.9: FSDP2-based replicate() for DDP-style data parallel (composable with TP and fully_shard)
from torch.distributed._composable.replicate_with_fsdp import replicate
# torch ≥ 2.1: the local tensor of an async DTensor collective, and the wait that finishes it (its
# backward is the identity): compiled blocks get finished inputs (parallel/compile.py)
from torch.distributed._functional_collectives import AsyncCollectiveTensor, wait_tensor
# torch ≥ 2.4: a DTensor's sharding spec (mesh, placements, global shape / stride), built once and
# reused: wrapping a gradient with a known spec skips DTensor.from_local's checks (local TP compute)
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
# torch ≥ 2.4: which block of the global tensor a DTensor's local shard is (pretrained weights read only it)
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
# torch ≥ 2.0: wraps a block in torch.utils.checkpoint (activation checkpointing), keeping parameter names
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper
# torch ≥ 2.6: pipeline schedule internals — the lowered action table of runtime schedules (forward-only pass)
from torch.distributed.pipelining.schedules import (
    FORWARD,
    OVERLAP_F_B,
    RECV_F,
    RESHARD,
    SEND_F,
    UNSHARD,
    _Action,
    _PipelineSchedule,
    _PipelineScheduleRuntime,
)
# torch ≥ 2.0: TorchDispatchMode (comm accounting sees every collective op)
from torch.utils._python_dispatch import TorchDispatchMode

# lightning 2.6: process-group bootstrap and collectives, as Lightning's own strategies do them
from lightning.fabric.utilities.distributed import (
    _all_gather_ddp_if_available,
    _distributed_is_initialized,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _sync_ddp_if_available,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
# lightning 2.6: how ModelParallelStrategy materializes a module that parallelized itself (to_empty + reset_parameters)
from lightning.fabric.strategies.model_parallel import _materialize_distributed_module
from lightning.fabric.utilities.types import _PATH
# lightning 2.6: Lightning's precision aliases ("bf16", 32) → the unified names
from lightning.fabric.connector import _convert_precision_to_unified_args
# lightning 2.6: the subprocess launcher (our observer gives rank 0 time to report a failure)
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver, _set_num_threads_if_needed
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

if TYPE_CHECKING:
    import lightning.pytorch as pl
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh


# torch ≥ 2.0: the type of a dispatched ATen / c10d op (comm accounting reads its schema and name)
OpOverload = torch._ops.OpOverload


def op_arguments(func: OpOverload) -> list[Any]:
    """The schema's declared arguments of an op (``OpOverload._schema.arguments``)."""
    return func._schema.arguments


def op_name(func: OpOverload) -> str:
    """An op's name without its namespace and overload (``OpOverload._opname``)."""
    return func._opname


def dynamo_supported() -> bool:
    """Whether torch.compile can run here (``torch._dynamo.is_dynamo_supported``)."""
    return torch._dynamo.is_dynamo_supported()


def compile_backends() -> list[str]:
    """The torch.compile backends this install knows (``torch._dynamo.list_backends``)."""
    return torch._dynamo.list_backends(exclude_tags=())


def flatten_mesh(mesh: "DeviceMesh", name: str) -> "DeviceMesh":
    """A 1-D view over several mesh dims (torch ≥ 2.6 ``DeviceMesh._flatten``; kept by name, never re-sliced)."""
    return mesh._flatten(name)


def dtensor_spec(tensor: "torch.distributed.tensor.DTensor") -> "DTensorSpec":
    """A DTensor's sharding spec (``DTensor._spec``)."""
    return tensor._spec


def dtensor_with_spec(local: torch.Tensor, spec: "DTensorSpec") -> "torch.distributed.tensor.DTensor":
    """A DTensor of ``local`` with a known ``spec``, no checks, no autograd (the ``DTensor``
    constructor, which ``from_local`` calls after them; a few µs instead of tens)."""
    from torch.distributed.tensor import DTensor

    return DTensor(local, spec, requires_grad=False)


def set_group_timeout(group: "dist.ProcessGroup", timeout: timedelta) -> None:
    """Change a live group's collective timeout (torch ≥ 2.4 ``c10d._set_pg_timeout``)."""
    c10d._set_pg_timeout(timeout, group)


def skip_lightning_backward(trainer: "pl.Trainer", skip: bool) -> None:
    """Switch off Lightning's backward and zero-grad in the training closure (``fit_loop._skip_backward``,
    the switch Lightning's own StochasticWeightAveraging callback uses): the pipeline schedule runs backward."""
    trainer.fit_loop._skip_backward = skip


def is_accumulating(trainer: "pl.Trainer") -> bool:
    """Whether this batch is not the last of an optimizer step (``fit_loop._should_accumulate``)."""
    return trainer.fit_loop._should_accumulate()


def take_over_sigterm(trainer: "pl.Trainer", on_signal: Callable[[int, Any], None]) -> Callable[[], None]:
    """Replace Lightning's SIGTERM agreement for this trainer; return what undoes it.

    ``on_signal`` stands in for ``_SignalConnector._sigterm_notifier_fn`` (bound when the
    trainer registers its signal handlers, so this runs before that, e.g. in ``Strategy.setup``);
    the per-batch broadcast of rank 0's flag (``_TrainingEpochLoop._broadcast_sigterm_tensor``,
    lightning ≥ 2.5.2) becomes a no-op. Both are instance attributes, removed by the undo."""
    connector, epoch_loop = trainer._signal_connector, trainer.fit_loop.epoch_loop
    connector._sigterm_notifier_fn = on_signal
    epoch_loop._broadcast_sigterm_tensor = lambda: None

    def undo() -> None:
        vars(connector).pop("_sigterm_notifier_fn", None)
        vars(epoch_loop).pop("_broadcast_sigterm_tensor", None)

    return undo


def lightning_sigterm_broadcast(trainer: "pl.Trainer") -> None:
    """Run Lightning's own per-batch broadcast of rank 0's SIGTERM flag once (the class's
    ``_TrainingEpochLoop._broadcast_sigterm_tensor``, which :func:`take_over_sigterm` replaces on
    the instance): ``bench.sigterm`` measures what it costs."""
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    _TrainingEpochLoop._broadcast_sigterm_tensor(trainer.fit_loop.epoch_loop)


def agree_on_sigterm(trainer: "pl.Trainer") -> None:
    """Set the flag Lightning's loops check at the end of a batch (``trainer.received_sigterm``)."""
    trainer._signal_connector.received_sigterm = True


def logs_this_step(trainer: "pl.Trainer") -> bool:
    """Whether loggers are written at this step (``trainer._logger_connector.should_update_logs``)."""
    return trainer._logger_connector.should_update_logs


def split_pipeline_actions(action: Any) -> tuple[Any, ...]:
    """The computations of one lowered schedule action (an overlapped F/B pair holds two)."""
    return action.sub_actions if action.computation_type == OVERLAP_F_B else (action,)


def fsdp_parameters(module: "torch.nn.Module") -> list[tuple[Any, Any, Any]]:
    """(sharded parameter, gathered parameter or None, fp32 accumulated gradient or None) of every
    parameter FSDP2's ``fully_shard`` / ``replicate`` manages under ``module`` (torch 2.13
    ``FSDPModule._get_fsdp_state()._fsdp_param_groups[*].fsdp_params``, ``FSDPParam._unsharded_param``):
    what the ZeRO benchmark's memory probe reads."""
    from torch.distributed.fsdp import FSDPModule

    states = {id(state): state for unit in module.modules() if isinstance(unit, FSDPModule) for state in [unit._get_fsdp_state()]}
    # a unit of several modules (fully_shard([norm, output])) is one state, seen from each of them
    return [
        (p.sharded_param, getattr(p, "_unsharded_param", None), p.unsharded_accumulated_grad)
        for state in states.values() for group in state._fsdp_param_groups for p in group.fsdp_params
    ]
