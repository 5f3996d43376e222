from lightning_3d.callbacks.checkpoint import StepCheckpoint
from lightning_3d.callbacks.summary import RunSummary

__all__ = ["RunSummary", "StepCheckpoint"]
