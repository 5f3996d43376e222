"""StepGuard: what happens between backward and the optimizer update.

1. Gradients still pending a sum (``Partial`` DTensors under sequence parallel) are
   reduced once, so the norm is exact and AdamW does not reduce them at every read.
2. One all-reduce over every rank carries the squared gradient norm, each rank's
   non-finite flags, the ranks asked to stop (SIGTERM) and, for a deferred token-weighted
   loss, the step's token-loss sum and token count: every rank reaches the same verdict
   (go on, skip, stop) together.
3. A deferred loss was backpropagated as a token sum: the gradients are divided by the
   step's global token count here (as Megatron's per-token loss does), before any hook or
   the optimizer reads them, so no collective runs inside the forward pass.
4. Clipping reuses that norm instead of computing it again. When norm clipping is the only
   reader before the optimizer (``fold_into_clip``), the division waits for it: one pass
   over the gradients scales them by (1 / tokens) × the clip factor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

from lightning_3d.nonfinite import NonFiniteGuard, step_health
from lightning_3d.parallel.grad_clip import clip_grad_norm_, reduce_partial_grads, scale_grads


def clip_reads_gradients_first(trainer: "pl.Trainer", module: "pl.LightningModule") -> bool:
    """Whether Lightning's norm clipping (through :meth:`StepGuard.clip`) is the first to read the
    gradients after the step's check: clipping by norm is on and no ``on_before_optimizer_step``
    (module or callback) or ``configure_gradient_clipping`` of the module runs before it."""
    # Lightning clips by norm when no algorithm is named
    if not (module.automatic_optimization and trainer.gradient_clip_val and trainer.gradient_clip_algorithm in (None, "norm")):
        return False
    if is_overridden("on_before_optimizer_step", module) or is_overridden("configure_gradient_clipping", module):
        return False
    return not any(is_overridden("on_before_optimizer_step", callback, parent=pl.Callback) for callback in trainer.callbacks)


class StepGuard:
    """Args:
    on_nonfinite, max_skipped: the :class:`NonFiniteGuard` policy ("stop" / "skip").
    """

    def __init__(self, on_nonfinite: str = "stop", max_skipped: int = 5) -> None:
        self.nonfinite = NonFiniteGuard(on_nonfinite, max_skipped)
        self.last_grad_norm: Optional[Tensor] = None  # the last step's global norm, before clipping
        self._norm_for_clipping: Optional[Tensor] = None
        self._pending_factor: Optional[float] = None  # the token normalization left for clip()
        self._fold: tuple[Any, bool] = (None, False)  # (what the answer depends on, clip_reads_gradients_first)
        self.ranks_per_stage = 1
        self.device = torch.device("cpu")
        self.loss_mesh_size = 1
        self.counts_loss = True  # whether this rank's token-loss sums count (one rank per data shard)
        # (token-loss sum, token count) of this rank's deferred micro-batches in the current step
        self._deferred: Optional[Tensor] = None
        self.step_loss: Optional[tuple[Tensor, Tensor]] = None  # the last step's (global mean loss, tokens)
        self.stop_agreed = False  # the last check found a rank asked to stop (SIGTERM)

    def setup(self, ranks_per_stage: int, device: torch.device, loss_mesh_size: int = 1, counts_loss: bool = True) -> None:
        self.ranks_per_stage, self.device = ranks_per_stage, device
        self.loss_mesh_size, self.counts_loss = loss_mesh_size, counts_loss

    @torch.no_grad()
    def defer(self, summed: Tensor, tokens: Tensor) -> None:
        """Add a micro-batch's local token-loss sum and token count to the step's (reduced with the step's check)."""
        if self._deferred is None:
            self._deferred = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.counts_loss:
            self._deferred += torch.stack([summed.detach().double(), tokens.detach().double()])

    def folds_into_clip(self, trainer: "pl.Trainer", module: "pl.LightningModule") -> bool:
        """:func:`clip_reads_gradients_first`, looked at again only when the module, the callbacks or
        the clipping settings change (its override checks cost more than the rest of a step's check)."""
        key = (id(module), module.automatic_optimization, tuple(map(id, trainer.callbacks)),
               trainer.gradient_clip_val, trainer.gradient_clip_algorithm)
        if self._fold[0] != key:
            self._fold = (key, clip_reads_gradients_first(trainer, module))
        return self._fold[1]

    def should_skip(
        self,
        params: Iterable[Tensor],
        loss: Optional[Tensor],
        step: int,
        accumulate: int = 1,
        fold_into_clip: bool = False,
        stop_requested: bool = False,
    ) -> bool:
        """Reduce pending gradients, agree on the loss and gradient norm; raise on "stop",
        True on "skip" (the caller drops the update).

        ``accumulate``: the micro-batches of this step whose losses were divided by it (Lightning's
        gradient accumulation); a deferred token sum is then normalized by ``accumulate / tokens``.
        ``fold_into_clip``: the caller guarantees :meth:`clip` runs before anything else reads the
        gradients, so that normalization is applied there, in the same pass as clipping.
        ``stop_requested``: this rank was asked to stop; :attr:`stop_agreed` says whether any was.
        """
        params = list(params)
        reduce_partial_grads(params)
        deferred, self._deferred = self._deferred, None
        norm, bad_loss, bad_grads, sums, self.stop_agreed = step_health(
            params, loss, self.ranks_per_stage, self.device, deferred, stop_requested
        )
        self.step_loss = None
        self._pending_factor = None
        if sums is not None:
            loss_sum, tokens = sums.tolist()
            factor = accumulate / max(tokens, 1.0)
            if fold_into_clip:
                self._pending_factor = factor
            else:
                scale_grads(params, factor)
            norm = norm * factor
            self.step_loss = (torch.tensor(loss_sum / max(tokens, 1.0), device=self.device), torch.tensor(tokens, device=self.device))
        self.last_grad_norm = norm
        skip = self.nonfinite.should_skip(step, bad_loss, bad_grads)
        self._norm_for_clipping = None if skip else norm
        if skip:
            self._pending_factor = None  # the caller zeroes the gradients
        return skip

    def clip(self, params: Iterable[Tensor], max_norm: float) -> None:
        """Clip to ``max_norm`` by the global norm (the one agreed on in :meth:`should_skip`, if any),
        applying a normalization :meth:`should_skip` left for it in the same pass."""
        norm, self._norm_for_clipping = self._norm_for_clipping, None
        factor, self._pending_factor = self._pending_factor, None
        clip_grad_norm_(params, max_norm, self.ranks_per_stage, self.device, norm=norm, prescale=factor)

    def check_normalized(self) -> None:
        """Raise if a normalization left for :meth:`clip` was never applied (the optimizer then
        stepped on token-sum gradients)."""
        if self._pending_factor is not None:
            self._pending_factor = None
            raise RuntimeError("the step's token normalization was left for gradient clipping, but clipping did not run")

    def state_dict(self) -> dict[str, Any]:
        return self.nonfinite.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite.load_state_dict(state)
