"""Parallel plans: what to parallelize in one architecture, and how."""

from lightning_3d.plans.base import ParallelPlan
from lightning_3d.plans.llama import llama_plan

__all__ = ["ParallelPlan", "llama_plan"]
