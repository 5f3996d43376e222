"""Fixed-length training windows cut from one long token stream, each checked against the vocabulary."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_3d.data.token_files import TokenFile, bad_id_message
from lightning_3d.data.token_stream import TokenStream
from lightning_3d.errors import ConfigError


class TokenWindowDataset(Dataset):
    """Non-overlapping windows of ``seq_len`` next-token-prediction pairs.

    Sample ``i`` reads ``tokens[i*seq_len : i*seq_len + seq_len + 1]``: its first ``seq_len``
    tokens are the inputs and its last ``seq_len`` the labels. Consecutive windows share one
    token (the last label of one is the first input of the next), so no token is wasted.
    ``tokens`` is an array or a :class:`TokenStream` over many files; a window that crosses
    a file boundary is read from both files.

    With ``vocab_size``, every window is checked as it is loaded: an id ``>= vocab_size``
    raises a :class:`ConfigError` naming the file and the token's offset in it (startup only
    samples the files, so this is where an id the sample missed is found).
    """

    def __init__(
        self, tokens: Union[np.ndarray, TokenStream], seq_len: int, name: str = "dataset", vocab_size: Optional[int] = None
    ) -> None:
        if seq_len <= 0:
            raise ConfigError(f"seq_len={seq_len} must be > 0")
        if np.ndim(tokens) != 1:
            raise ConfigError(f"the {name} tokens must be a 1-D array, got shape {np.shape(tokens)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.name = name
        self.vocab_size = vocab_size
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
        window = np.array(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)
        if self.vocab_size is not None and window.max() >= self.vocab_size:
            self._raise_bad_id(window, start)
        tensor = torch.from_numpy(window)
        return {"input_ids": tensor[:-1], "labels": tensor[1:]}

    def _raise_bad_id(self, window: np.ndarray, start: int) -> None:
        first = int(np.argmax(window >= self.vocab_size))
        position = start + first
        if isinstance(self.tokens, TokenStream):
            segment, offset = self.tokens.locate(position)
            is_file = isinstance(segment.source, TokenFile)
            origin, dtype = segment.origin, (segment.source.dtype if is_file else None)
        else:
            origin, offset, dtype = f"the {self.name} tokens", position, None
        raise ConfigError(bad_id_message(origin, offset, int(window[first]), self.vocab_size, dtype))
