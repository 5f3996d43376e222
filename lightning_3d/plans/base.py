from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle


@dataclass
class ParallelPlan:
    """What the strategy needs to know about a model to parallelize it.

    Attributes:
        root: the attribute of the LightningModule that holds the model its steps call
            (``self.model`` → ``"model"``). Every other name below is relative to it, so the
            plan applies unchanged to each pipeline stage cut from the model.
        blocks: the ``nn.ModuleList`` or ``nn.ModuleDict`` of repeated transformer blocks
            (a pipeline stage keeps its blocks under their original indices or keys); each
            block becomes one FSDP unit and gets ``block_tp``.
        block_tp: tensor-parallel style of each module inside a block, by name relative
            to the block (e.g. ``{"attention.wq": ColwiseParallel()}``).
        top_tp: tensor-parallel styles of modules outside the blocks (embedding, final
            norm, output head).
        fsdp_units: extra FSDP units besides the blocks, sharded after them and before the
            root; the modules of one inner list are sharded together. In forward order: the
            last one (the head) is not resharded after forward, since backward starts with it.
        first_stage: modules that only the first pipeline stage keeps (embedding).
        last_stage: modules that only the last pipeline stage keeps (final norm, head).
            Other stages set them to ``None``; the model's forward must tolerate that.
        attention: the attention module inside a block (for context parallel).
        prepare_stage: called on each cut pipeline stage as ``(stage, is_first, is_last)``
            to give it a forward from the previous stage's output tensor to the next one's
            input (transformers models); None when the model's forward already is one.
        pipeline_loss: ``(last stage, logits, labels, shifted) -> token-loss sum``: the
            model's own loss under pipeline parallel, for modules whose training_step calls
            the model with labels; None: summed cross entropy of already shifted labels.
        shifts_labels: the model shifts labels inside (transformers convention): the pipeline
            loss counts the tokens after the shift, and under context parallel the labels a
            pipelined or transformers model is called with are shifted before the cut.
        random_free_blocks: the blocks draw no random numbers (no dropout) in training, so
            activation checkpointing may skip saving and restoring the RNG state around each
            block's recomputation. Leave False when unsure: a wrong True gives wrong gradients.
    """

    root: str
    blocks: str
    block_tp: dict[str, ParallelStyle] = field(default_factory=dict)
    top_tp: dict[str, ParallelStyle] = field(default_factory=dict)
    fsdp_units: list[list[str]] = field(default_factory=list)
    first_stage: list[str] = field(default_factory=list)
    last_stage: list[str] = field(default_factory=list)
    attention: str = "attention"
    random_free_blocks: bool = False
    prepare_stage: Optional[Callable[[nn.Module, bool, bool], None]] = None
    pipeline_loss: Optional[Callable[[nn.Module, Tensor, Tensor, bool], Tensor]] = None
    shifts_labels: bool = False
