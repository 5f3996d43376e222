"""What the strategy adds to a transformers model's call, so the user's step stays unchanged.

- **Global token weighting.** transformers averages its loss over this rank's tokens; data
  parallel then averages the ranks, which is the global mean only when every rank holds as
  many tokens. A forward pre-hook passes ``num_items_in_batch`` = global tokens ÷ the
  ``loss``-mesh size, so each rank's loss is its token sum scaled exactly as the strategy's
  own loss rule, and the averaged gradient is that of the global token-weighted mean.
- **Context parallel.** transformers' attention interface gets the ring attention under a
  name of its own (no edit of the model); the hook passes positions that follow this rank's
  chunks, and labels shifted *before* the sequence was cut (``shift_labels``), so the loss
  equals the unsharded one exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_3d.errors import ConfigError
from lightning_3d.loss import sum_over
from lightning_3d.parallel.context_parallel import ContextParallelAttention, balanced_positions, shard_sequence
from lightning_3d.plans.hf import count_shifted_tokens, shift_labels


class ShiftedLabels:
    """Labels shifted before the context-parallel cut, found again by the cut tensor they belong to.

    The strategy cuts the batch; the module's step then passes ``labels=batch["labels"]`` (or
    ``labels=batch["input_ids"]``) to its model. Each cut integer entry is remembered with its
    shifted-then-cut twin, so the model call can score the token after a chunk's last one,
    which lives on another rank.
    """

    def __init__(self, rank: int, cp: int) -> None:
        self.rank, self.cp = rank, cp
        self._twins: dict[int, tuple[Tensor, Tensor]] = {}

    def remember(self, full: dict[str, Any], cut: dict[str, Any]) -> None:
        self._twins = {
            id(cut[key]): (cut[key], shard_sequence(shift_labels(value), self.rank, self.cp))
            for key, value in full.items()
            if isinstance(value, Tensor) and value.ndim == 2 and not value.is_floating_point() and cut[key] is not value
        }

    def shifted(self, labels: Tensor) -> Tensor:
        twin = self._twins.get(id(labels))
        if twin is None or twin[0] is not labels:
            raise ConfigError(
                f"context parallel (cp={self.cp}): the labels given to the model (shape {tuple(labels.shape)}) are not an "
                "entry of the step's batch, so they cannot be shifted before the sequence cut; pass "
                "`labels=batch[<key>]` unchanged (the model shifts them), or give the module a parallel_plan()"
            )
        return twin[1]


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> Optional[Tensor]:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *(args[:1])):
        if isinstance(value, Tensor):
            return value
    return None


class ModelCallHook:
    """Forward pre-hook (with kwargs) on the transformers model the module's step calls."""

    def __init__(self, loss_mesh: DeviceMesh, cp_rank: int, cp: int, shifted_labels: Optional[ShiftedLabels]) -> None:
        self.loss_mesh, self.cp_rank, self.cp = loss_mesh, cp_rank, cp
        self.shifted_labels = shifted_labels

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        labels = kwargs.get("labels")
        # labels the caller shifted already (shift_labels) are cut like input_ids: they stay right under cp
        shifted = kwargs.get("shift_labels") is not None
        if self.cp > 1:
            tokens_in = _first_tensor(args, kwargs)
            mask = kwargs.get("attention_mask")
            if mask is not None and not bool((mask == 1).all()):
                raise ConfigError(f"context parallel (cp={self.cp}) needs unpadded causal sequences; the attention_mask has padding")
            kwargs["attention_mask"] = None
            if kwargs.get("position_ids") is None and tokens_in is not None:
                kwargs["position_ids"] = balanced_positions(tokens_in.shape[1], self.cp_rank, self.cp, tokens_in.device)
            if labels is not None and not shifted:
                kwargs["shift_labels"] = self.shifted_labels.shifted(labels)
                shifted = True
        if labels is not None and kwargs.get("num_items_in_batch") is None:
            target = kwargs["shift_labels"] if shifted else labels
            tokens = sum_over(count_shifted_tokens(target, shifted), self.loss_mesh)
            kwargs["num_items_in_batch"] = (tokens.clamp(min=1) / self.loss_mesh.size()).float()
        return args, kwargs


def use_ring_attention(model: nn.Module, group: torch.distributed.ProcessGroup, backend: str) -> None:
    """Route the model's attention through the context-parallel attention (transformers' attention interface)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    core = ContextParallelAttention(group, backend)
    name = f"lightning_3d_cp_{id(group)}_{backend}"

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, scaling: Optional[float] = None, dropout: float = 0.0, **_: Any) -> tuple[Tensor, None]:
        # transformers: (batch, heads, seq, head_dim) in, (batch, seq, heads, head_dim) out
        return core(query, key, value, scaling).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, lambda *args, **kwargs: None)  # causal inside the ring; no mask tensor
    model.config._attn_implementation = name
