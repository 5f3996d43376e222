"""Which plan a LightningModule gets, and how its weights are drawn — with no plan code.

In order:

1. the module parallelized itself in ``configure_model`` (DTensor parameters or FSDP2
   units, Lightning ``ModelParallelStrategy`` style): nothing is applied on top;
2. the module defines ``parallel_plan(parallel_config)``: that plan (and its
   ``init_parameter`` if it has one);
3. a transformers model among the module's attributes: the plan its classes declare
   (:mod:`lightning_3d.plans.hf`), weights drawn by the model's own ``_init_weights`` — or,
   for a model built from a local folder with safetensors weights (``from_pretrained``),
   read from that folder, each rank its own shards;
4. any other model: data parallel only (FSDP2 / HSDP / DDP-style), one unit per repeated
   block of its largest ``ModuleList`` / ``ModuleDict``, weights drawn by each module's
   ``reset_parameters``. tp / pp / cp > 1 need a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_3d.config import ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.materialize import InitFn, owner_init
from lightning_3d.plans.base import ParallelPlan
from lightning_3d.plans.hf import (
    context_parallel_problems,
    find_hf_root,
    hf_plan,
    hf_shape_problems,
    init_rule,
    pipeline_problems,
)
from lightning_3d.pretrained import HFFolder


@dataclass
class ModelPlan:
    """``plan`` is None for a module that parallelized itself."""

    kind: str  # "self", "own", "transformers" or "generic"
    plan: Optional[ParallelPlan]
    init_fn: Optional[InitFn]
    problems: list[str]


def parallelized_itself(module: nn.Module) -> bool:
    """Whether ``configure_model`` already applied tensor parallel or FSDP2 itself."""
    return any(isinstance(p, DTensor) for p in module.parameters()) or any(isinstance(m, FSDPModule) for m in module.modules())


def _largest_block_list(module: nn.Module) -> Optional[str]:
    """The ModuleList / ModuleDict of two or more children holding the most parameters."""
    best, best_size = None, 0
    for name, child in module.named_modules():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and len(child) >= 2:
            size = sum(p.numel() for p in child.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


def generic_plan(module: nn.Module, dims: ParallelDims) -> ParallelPlan:
    """Data-parallel plan for a model that declares nothing: its repeated blocks are the FSDP units."""
    name = type(module).__name__
    asked = {k: v for k, v in (("tp", dims.tp), ("pp", dims.pp), ("cp", dims.cp)) if v > 1}
    if asked:
        raise ConfigError(
            f"{name}: {', '.join(f'{k}={v}' for k, v in asked.items())} needs a plan, and the module holds no transformers "
            "model with a declared tp/pp plan: define `parallel_plan(parallel_config)` returning a ParallelPlan "
            "(docs/your-model.md), or use data parallel only (tp=pp=cp=1)"
        )
    blocks = _largest_block_list(module)
    if blocks is None:
        return ParallelPlan(root="", blocks="")
    root, _, rest = blocks.partition(".")
    # the root is the attribute the step calls (self.model); blocks directly on the module: the module itself
    return ParallelPlan(root=root, blocks=rest) if rest else ParallelPlan(root="", blocks=blocks)


def model_plan(module: nn.Module, parallel: ParallelConfig, dims: ParallelDims) -> ModelPlan:
    """The plan and weight init for ``module`` after ``configure_model`` (parameters on meta)."""
    if parallelized_itself(module):
        return ModelPlan("self", None, None, [])
    own_init = getattr(module, "init_parameter", None)
    if hasattr(module, "parallel_plan"):
        plan = module.parallel_plan(parallel)
        if not isinstance(plan, ParallelPlan):
            raise TypeError(f"{type(module).__name__}.parallel_plan() returned {type(plan).__name__}, not a ParallelPlan")
        init = own_init or owner_init(module.get_submodule(plan.root), plan.root)
        return ModelPlan("own", plan, init, [])
    root = find_hf_root(module)
    if root is not None:
        model = module.get_submodule(root)
        try:
            plan = hf_plan(model, root, dims.tp)
        except ConfigError:
            if dims.tp == dims.pp == dims.cp == 1:  # no declared structure: data parallel still works
                return _generic(module, dims, own_init)
            raise
        problems = hf_shape_problems(model, dims.tp, plan)
        init = own_init or _folder_weights(model, root) or owner_init(model, root, init_rule(model))
        if parallel.loss_parallel and dims.tp > 1:
            problems.append(
                f"parallel.loss_parallel=true: {type(model).__name__}'s plan gathers the logits (its head is "
                "colwise_gather_output), so there are no vocab-sharded logits to compute the loss on; set it to false"
            )
        if dims.cp > 1:
            problems += context_parallel_problems(model, dims.cp)
        if dims.pp > 1:
            problems += pipeline_problems(model, dims.pp)
        return ModelPlan("transformers", plan, init, problems)
    return _generic(module, dims, own_init)


def _folder_weights(model: nn.Module, root: str) -> Optional[InitFn]:
    """A model built from a local folder (``from_pretrained`` in ``configure_model()``, whose weights
    the meta device dropped, or ``from_config`` of its config): its weights, read shard by shard."""
    source = getattr(model.config, "_name_or_path", "") or ""
    if not source or not any(param.is_meta for param in model.parameters()):
        return None  # not from a folder, or built with real weights (outside configure_model): kept as they are
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{type(model).__name__} was built from {source!r}, which is not a local folder: the strategy creates the "
            "parameters on the meta device and reads weights from local safetensors only. Download the model to a "
            "folder and build from it, or build with from_config(config) to start from random weights"
        )
    if not any(folder.glob("*.safetensors")):
        return None  # a config only: random weights, as from_config asks
    rank_zero_info(f"{type(model).__name__}: weights are read from {folder}, each rank its own shards")
    return HFFolder(folder).initializer(root)


def _generic(module: nn.Module, dims: ParallelDims, own_init: Any) -> ModelPlan:
    plan = generic_plan(module, dims)
    return ModelPlan("generic", plan, own_init or owner_init(module.get_submodule(plan.root), plan.root), [])
