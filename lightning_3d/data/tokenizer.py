"""Byte-level tokenizer: every UTF-8 byte is a token, plus one end-of-document id."""

from __future__ import annotations

from typing import Iterable, Union

import numpy as np
import torch


class ByteTokenizer:
    """Ids 0..255 are raw UTF-8 bytes; ``eos_id`` (256) ends each document.

    It needs no vocabulary file and no training, so any text corpus is usable at once.
    """

    eos_id: int = 256
    vocab_size: int = 257

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as uint16 (no eos appended)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Token ids of already-encoded bytes, without a Python loop over them."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Union[np.ndarray, torch.Tensor, Iterable[int]]) -> str:
        """Text of ``ids``; eos and any id outside a byte are skipped, bad UTF-8 replaced."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
        return byte_ids.tobytes().decode("utf-8", errors="replace")
