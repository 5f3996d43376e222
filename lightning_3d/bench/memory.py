"""Peak bytes autograd holds for backward (activation memory), measured with a hook."""

from __future__ import annotations

from typing import Any

import torch


class SavedTensorBytes:
    """Context manager: counts the bytes of tensors saved for backward; ``peak`` is the maximum alive.

    A saved tensor counts from when autograd packs it until its graph is freed.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> "_Held":
        return _Held(self, tensor)


class _Held:
    def __init__(self, counter: SavedTensorBytes, tensor: torch.Tensor) -> None:
        self.counter, self.tensor = counter, tensor
        self.size = tensor.numel() * tensor.element_size()
        counter.live += self.size
        counter.peak = max(counter.peak, counter.live)

    def __del__(self) -> None:  # freed with the autograd graph that saved it
        self.counter.live -= self.size
