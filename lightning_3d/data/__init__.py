"""Data pipeline: text or token files to one token stream, fixed windows, global-order batches."""

from lightning_3d.data.datamodule import TextDataModule
from lightning_3d.data.dataset import TokenWindowDataset
from lightning_3d.data.sampler import GlobalOrderSampler
from lightning_3d.data.sources import load_token_splits
from lightning_3d.data.token_stream import TokenStream
from lightning_3d.data.tokenizer import ByteTokenizer, FileTokenizer

__all__ = [
    "ByteTokenizer",
    "FileTokenizer",
    "TokenStream",
    "TokenWindowDataset",
    "GlobalOrderSampler",
    "TextDataModule",
    "load_token_splits",
]
