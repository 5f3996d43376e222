"""StepGuard: what happens between backward and the optimizer update.

1. Gradients still pending a sum (``Partial`` DTensors under sequence parallel) are
   reduced once, so the norm is exact and AdamW does not reduce them at every read.
2. One all-reduce over every rank carries the squared gradient norm and each rank's
   non-finite flags: every rank reaches the same verdict (go on, skip, stop) together.
3. Clipping reuses that norm instead of computing it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_3d.nonfinite import NonFiniteGuard, step_health
from lightning_3d.parallel.grad_clip import clip_grad_norm_, reduce_partial_grads


class StepGuard:
    """Args:
    on_nonfinite, max_skipped: the :class:`NonFiniteGuard` policy ("stop" / "skip").
    """

    def __init__(self, on_nonfinite: str = "stop", max_skipped: int = 5) -> None:
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_skipped)
        self.last_grad_norm: Optional[Tensor] = None  # the last step's global norm, before clipping
        self._norm_for_clipping: Optional[Tensor] = None
        self.ranks_per_stage = 1
        self.device = torch.device("cpu")

    def setup(self, ranks_per_stage: int, device: torch.device) -> None:
        self.ranks_per_stage, self.device = ranks_per_stage, device

    def should_skip(self, params: Iterable[Tensor], loss: Optional[Tensor], step: int) -> bool:
        """Reduce pending gradients, agree on the loss and gradient norm; raise on "stop",
        True on "skip" (the caller drops the update)."""
        params = list(params)
        reduce_partial_grads(params)
        norm, bad_loss, bad_grads = step_health(params, loss, self.ranks_per_stage, self.device)
        self.last_grad_norm = norm
        skip = self.nonfinite.should_skip(step, bad_loss, bad_grads)
        self._norm_for_clipping = None if skip else norm
        return skip

    def clip(self, params: Iterable[Tensor], max_norm: float) -> None:
        """Clip to ``max_norm`` by the global norm (the one agreed on in :meth:`should_skip`, if any)."""
        norm, self._norm_for_clipping = self._norm_for_clipping, None
        clip_grad_norm_(params, max_norm, self.ranks_per_stage, self.device, norm=norm)

    def state_dict(self) -> dict[str, Any]:
        return self.nonfinite.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(state)
