"""Non-finite loss or gradient norm: every rank agrees, then the step stops or is skipped.

One all-reduce per step carries the squared gradient norm (needed for clipping anyway),
one flag per rank for "my loss is not finite" and "my gradients are not finite", the
step's other scalars (the token-loss sum and token count of a deferred token-weighted loss)
and the count of ranks asked to stop (SIGTERM, :mod:`lightning_3d.runtime.stop_signal`).
Every rank then holds the same verdict, so all of them stop together or all skip the
update; none can go on into a collective the others left.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_3d.errors import ConfigError
from lightning_3d.parallel.grad_clip import local_grad_square_sum

POLICIES = ("stop", "skip")


class NonFiniteError(RuntimeError):
    """Raised on every rank at once, before the optimizer step, when training stops on a non-finite value."""


def policy_problems(on_nonfinite: str, max_skipped: int) -> list[str]:
    problems = []
    if on_nonfinite not in POLICIES:
        problems.append(f"training.on_nonfinite={on_nonfinite!r} is not one of {list(POLICIES)}")
    if max_skipped < 0:
        problems.append(f"training.max_skipped={max_skipped} must be >= 0")
    return problems


class StepHealth(NamedTuple):
    """What every rank agreed on in :func:`step_health`."""

    norm: Tensor  # the global gradient norm
    bad_loss: list[int]  # ranks whose loss is not finite
    bad_grads: list[int]  # ranks whose gradients are not finite
    sums: Optional[Tensor]  # step_sums summed over every rank
    stop: bool  # some rank was asked to stop (SIGTERM)


@torch.no_grad()
def step_health(
    parameters: Iterable[Tensor],
    loss: Optional[Tensor],
    ranks_per_stage: int,
    device: torch.device,
    step_sums: Optional[Tensor] = None,
    stop_requested: bool = False,
) -> StepHealth:
    """One all-reduce (float64, so token counts stay exact) of the squared gradient norm, the
    step's sums, this rank's stop request and its non-finite flags."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    square_sum = local_grad_square_sum(parameters, ranks_per_stage, device)
    extra = 0 if step_sums is None else step_sums.numel()
    # [norm², step sums..., stop requests, loss flag per rank..., grad flag per rank...];
    # filled on the device: the only host sync is reading the reduced flags
    values = torch.zeros(2 + extra + 2 * world_size, dtype=torch.float64, device=device)
    values[0] = square_sum
    if step_sums is not None:
        values[1 : 1 + extra] = step_sums
    stop = 1 + extra
    flags = stop + 1
    values[stop] = float(stop_requested)
    if loss is not None:
        values[flags + rank] = (~torch.isfinite(loss.detach())).any().double()
    values[flags + world_size + rank] = (~torch.isfinite(square_sum)).double()
    if world_size > 1:
        dist.all_reduce(values)
    reduced = values.cpu()
    read = reduced[stop:].tolist()  # one read of every flag, not one tensor index each
    stop_agreed, read = read[0] > 0, read[1:]
    bad_loss = [r for r in range(world_size) if read[r] > 0]
    bad_grads = [r for r in range(world_size) if read[world_size + r] > 0]
    sums = reduced[1 : 1 + extra] if step_sums is not None else None
    return StepHealth(values[0].sqrt().float(), bad_loss, bad_grads, sums, stop_agreed)


class NonFiniteGuard:
    """Decides, from the agreed flags, whether a step stops the run, is skipped, or goes on.

    ``policy="stop"`` raises :class:`NonFiniteError`; ``"skip"`` drops the update and goes on,
    until more than ``max_skipped`` steps in a row were skipped. A skipped step still counts
    as a step (the data, the LR schedule and ``global_step`` move on), as in torchtitan and
    Megatron.
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 5) -> None:
        problems = policy_problems(policy, max_skipped)
        if problems:
            raise ConfigError("; ".join(problems))
        self.policy = policy
        self.max_skipped = max_skipped
        self.skipped_in_a_row = 0
        self.skipped_total = 0

    def should_skip(self, step: int, bad_loss: list[int], bad_grads: list[int]) -> bool:
        if not bad_loss and not bad_grads:
            self.skipped_in_a_row = 0
            return False
        what = "; ".join(
            f"non-finite {name} on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            for name, ranks in (("loss", bad_loss), ("gradient norm", bad_grads))
            if ranks
        )
        if self.policy == "stop":
            raise NonFiniteError(
                f"step {step}: {what}. Stopped before the optimizer step: no update was applied and no checkpoint "
                "was written for this step (earlier checkpoints are intact; resume=auto continues from the latest). "
                "training.on_nonfinite=skip skips such steps instead"
            )
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.skipped_in_a_row > self.max_skipped:
            raise NonFiniteError(
                f"step {step}: {what}, {self.skipped_in_a_row} steps in a row, more than training.max_skipped="
                f"{self.max_skipped}; stopped before the optimizer step (earlier checkpoints are intact)"
            )
        rank_zero_warn(
            f"step {step}: {what}; update skipped ({self.skipped_in_a_row} in a row, {self.skipped_total} in all)"
        )
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_in_a_row": self.skipped_in_a_row, "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
