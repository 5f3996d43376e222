"""lightning_3d: a Lightning strategy for 4D-parallel transformer training."""

from lightning_3d.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    PerfConfig,
    TrainerConfig,
)
from lightning_3d.dims import ParallelDims
from lightning_3d.models.llama import Transformer
from lightning_3d.module import CausalLM
from lightning_3d.planner.api import plan
from lightning_3d.plans import ParallelPlan, llama_plan
from lightning_3d.strategy import ModelParallel4DStrategy
from lightning_3d.validation import check_layout

__all__ = [
    "CausalLM",
    "Config",
    "DataConfig",
    "ModelConfig",
    "ModelParallel4DStrategy",
    "OptimConfig",
    "ParallelConfig",
    "PerfConfig",
    "ParallelDims",
    "ParallelPlan",
    "TrainerConfig",
    "Transformer",
    "check_layout",
    "llama_plan",
    "plan",
]
