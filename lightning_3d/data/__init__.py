"""Data pipeline: byte tokens from text or .bin files, fixed windows, global-order batches."""

from lightning_3d.data.datamodule import TextDataModule
from lightning_3d.data.dataset import TokenWindowDataset
from lightning_3d.data.sampler import GlobalOrderSampler
from lightning_3d.data.sources import load_token_splits
from lightning_3d.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "TokenWindowDataset", "GlobalOrderSampler", "TextDataModule", "load_token_splits"]
