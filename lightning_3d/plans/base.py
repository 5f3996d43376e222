from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.tensor.parallel import ParallelStyle


@dataclass
class ParallelPlan:
    """What the strategy needs to know about a model to parallelize it.

    All module names are relative to the LightningModule.

    Attributes:
        root: the module the LightningModule calls in its steps (``self.model`` → ``"model"``).
            FSDP's root unit; its forward starts the parameter all-gathers.
        blocks: the container (``nn.ModuleDict`` or ``nn.ModuleList``) of repeated
            transformer blocks; each block becomes one FSDP unit and gets ``block_tp``.
        block_tp: tensor-parallel style of each module inside a block, by name relative
            to the block (e.g. ``{"attention.wq": ColwiseParallel()}``).
        top_tp: tensor-parallel style of modules outside the blocks (embedding, final
            norm, output head), by name relative to the LightningModule.
        fsdp_units: extra FSDP units besides the blocks, sharded after them and before
            the root (e.g. ``[["model.norm", "model.output"]]``); modules listed in one
            inner list are sharded together.
        attention: the attention module inside a block (for context parallel).
    """

    root: str
    blocks: str
    block_tp: dict[str, ParallelStyle] = field(default_factory=dict)
    top_tp: dict[str, ParallelStyle] = field(default_factory=dict)
    fsdp_units: list[list[str]] = field(default_factory=list)
    attention: str = "attention"
