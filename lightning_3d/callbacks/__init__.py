from lightning_3d.callbacks.checkpoint import StepCheckpoint
from lightning_3d.callbacks.comm import CommAccounting
from lightning_3d.callbacks.performance import PerformanceMonitor
from lightning_3d.callbacks.summary import RunSummary

__all__ = ["CommAccounting", "PerformanceMonitor", "RunSummary", "StepCheckpoint"]
