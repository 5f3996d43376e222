"""Fixed-length training windows cut from one long token array."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_3d.errors import ConfigError


class TokenWindowDataset(Dataset):
    """Non-overlapping windows of ``seq_len`` next-token-prediction pairs.

    Sample ``i`` reads ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: its first ``seq_len``
    tokens are the inputs and its last ``seq_len`` the labels. Consecutive windows share one
    token (the last label of one is the first input of the next), so no token is wasted.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, name: str = "dataset") -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len={seq_len} must be > 0")
        if np.ndim(tokens) != 1:
            raise ConfigError(f"the {name} tokens must be a 1-D array, got shape {np.shape(tokens)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self._length = (len(tokens) - 1) // seq_len if len(tokens) else 0
        if self._length == 0:
            raise ConfigError(
                f"the {name} split has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1} "
                "needed for one sample"
            )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} is out of range for {self._length} {self.name} samples")
        index %= self._length
        start = index * self.seq_len
        # int64 copy: torch has no uint16/uint32 tensors for embedding lookups, and a memmap
        # slice must not be shared with the returned tensor.
        window = torch.from_numpy(np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return {"input_ids": window[:-1], "labels": window[1:]}
