"""Checkpointer: sharded DCP checkpoints that any layout can load.

A checkpoint is a folder ``step-N``: DCP shards of the model and optimizer states under the
unsplit model's names and global shapes, ``trainer_state.pt`` (Lightning's loop state),
``rng/rank-k.pt`` and DCP's ``.metadata`` — written last, so a folder without it is never
taken for a checkpoint. Loading reshards to the current layout; RNG states are restored
only when the layout is the one that wrote them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

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
from lightning_3d.config import ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError

# optimizer states are saved flattened (one entry per parameter), which is what lets DCP reshard them
_FLAT_OPTIMIZER = StateDictOptions(flatten_optimizer_state_dict=True)


def layout_of(dims: ParallelDims, parallel: ParallelConfig) -> dict[str, Any]:
    """What must match for RNG states to be restored rank by rank."""
    return {
        "world_size": dims.world_size,
        "dims": [dims.pp, dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp],
        "stages_per_rank": parallel.stages_per_rank,
        "pp_schedule": parallel.pp_schedule if dims.pp > 1 else None,
    }


class Checkpointer:
    """Save, load and remove checkpoint folders for one parallelized module.

    Args:
        root: the plan root (``"model"``): names are saved relative to the unsplit model.
        pipelined: whether the root is a list of pipeline stages.
        layout: what must match for per-rank RNG states to be restored.
        rank, world_size: this rank and the job's size.
        io_group: the group checkpoint I/O runs on (it keeps the startup timeout).
        async_save: write in a background thread, on ``async_group`` (its collectives run
            while training runs its own, so it needs a group of its own).
    """

    def __init__(
        self,
        root: str,
        pipelined: bool,
        layout: dict[str, Any],
        rank: int,
        world_size: int,
        io_group: Optional[dist.ProcessGroup] = None,
        async_save: bool = False,
        async_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        self.root, self.pipelined, self.layout = root, pipelined, layout
        self.rank, self.world_size = rank, world_size
        self.io_group, self.async_save, self.async_group = io_group, async_save, async_group
        self._pending_save: Optional[Future] = None
        self._pending_removals: list[Path] = []
        self.save_blocked_s: list[float] = []  # seconds each save held up the training loop
        self.load_s: Optional[float] = None  # seconds the last load took

    def canonical(self, state: Mapping[str, Any]) -> dict[str, Any]:
        return canonical_names(state, self.root, self.pipelined)

    def model_state(self, module: "pl.LightningModule") -> dict[str, Any]:
        """This rank's shards of the model, under the unsplit model's parameter names."""
        return self.canonical(get_model_state_dict(module))

    def optimizer_state(self, module: "pl.LightningModule", optimizer: Optimizer) -> dict[str, Any]:
        """This rank's shards of the optimizer state, flattened per parameter name."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer → torch optimizer
        return self.canonical(get_optimizer_state_dict(module, optimizer, options=_FLAT_OPTIMIZER))

    def save(self, checkpoint: dict[str, Any], path: Path, extra_state: dict[str, Any], barrier: Callable[[], None]) -> None:
        """Write the folder ``path`` (already agreed on by every rank): DCP shards from every rank,
        then the trainer state and RNG states, then DCP's metadata last."""
        self.finish_pending()
        if self.rank == 0 and path.exists():
            remove_folder(path)  # an interrupted save of the same step, or a file in the way
        barrier()
        (path / RNG_DIR).mkdir(parents=True, exist_ok=True)
        tensors = {MODEL_KEY: checkpoint.pop(MODEL_KEY)}
        tensors.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        checkpoint.update(layout=self.layout, model_root=self.root, **extra_state)
        started = time.perf_counter()
        torch.save(rng_state(), rng_file(path, self.rank))
        if self.rank == 0:
            write_atomically(checkpoint, path / TRAINER_STATE)
        writer = FileSystemWriter(path)
        if self.async_save:
            # returns once the states are staged in CPU memory; DCP writes .metadata when every rank is done
            self._pending_save = dcp.async_save(tensors, storage_writer=writer, process_group=self.async_group)
        else:
            dcp.save(tensors, storage_writer=writer, process_group=self.io_group)
        self.save_blocked_s.append(time.perf_counter() - started)

    def finish_pending(self) -> None:
        """Wait for a background save, then delete what was waiting for it to complete."""
        if self._pending_save is not None:
            self._pending_save.result()
            self._pending_save = None
        if self.rank == 0:
            for path in self._pending_removals:
                remove_folder(path)
        self._pending_removals.clear()

    def remove(self, path: Path) -> None:
        # never delete an older checkpoint while the newer one is still being written
        if self._pending_save is not None:
            self._pending_removals.append(path)
        elif self.rank == 0:
            remove_folder(path)

    def load(self, module: "pl.LightningModule", optimizers: list[Optimizer], path: Path) -> dict[str, Any]:
        """Read the model (and, when fitting, the optimizer) states in place, resharded to this
        layout; return the rest of the checkpoint for Lightning to restore."""
        self.finish_pending()
        started = time.perf_counter()
        model_state = get_model_state_dict(module)
        tensors: dict[str, Any] = {MODEL_KEY: self.canonical(model_state)}
        self._check_fits(path, tensors[MODEL_KEY])
        trainer_state = load_trainer_state(path)
        saved = {key.partition(".")[0] for key in read_metadata(path).state_dict_metadata}
        fitting = module.trainer.state.fn == TrainerFn.FITTING
        # a weights-only checkpoint has no optimizer entries: the optimizers keep their fresh state
        optimizers = [opt for i, opt in enumerate(optimizers) if fitting and f"optimizer_{i}" in saved]
        optimizer_keys = []
        for index, optimizer in enumerate(optimizers):
            state = get_optimizer_state_dict(module, optimizer, options=_FLAT_OPTIMIZER)
            optimizer_keys.append(list(state))
            tensors[f"optimizer_{index}"] = self.canonical(state)
        try:
            dcp.load(tensors, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), process_group=self.io_group)
        except CheckpointException as error:
            raise ConfigError(f"checkpoint {path} could not be read (corrupted shard?): {error}") from error
        set_model_state_dict(module, local_names(tensors[MODEL_KEY], model_state, self.root, self.pipelined))
        for index, (optimizer, keys) in enumerate(zip(optimizers, optimizer_keys)):
            state = local_names(tensors[f"optimizer_{index}"], keys, self.root, self.pipelined)
            set_optimizer_state_dict(module, optimizer, state, options=_FLAT_OPTIMIZER)
        if trainer_state.get("layout") == self.layout:
            set_rng_state(torch.load(rng_file(path, self.rank), weights_only=True))
        else:
            rank_zero_info(f"RNG states not restored: the checkpoint was written by layout {trainer_state.get('layout')}")
        self.load_s = time.perf_counter() - started
        return trainer_state

    def _check_fits(self, path: Path, model_state: Mapping[str, Any]) -> None:
        """The same verdict on every rank (shapes are gathered first), so a checkpoint that does
        not fit fails everywhere instead of hanging the ranks whose own part fits."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, {name: tuple(t.shape) for name, t in model_state.items()}, group=self.io_group)
        shapes = {name: shape for rank_shapes in gathered for name, shape in rank_shapes.items()}
        raise_if_problems(f"checkpoint {path} does not fit this model", fit_problems(path, shapes))
