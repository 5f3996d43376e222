from lightning_3d.callbacks.summary import RunSummary

__all__ = ["RunSummary"]
