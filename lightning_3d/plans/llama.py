"""Plan for the reference Llama decoder (``lightning_3d.models.llama``)."""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_3d.config import ModelConfig, ParallelConfig
from lightning_3d.plans.base import ParallelPlan


def llama_plan(model_config: ModelConfig, parallel: ParallelConfig, root: str = "model") -> ParallelPlan:
    """Megatron-style TP: q/k/v, w1/w3 column-wise, wo/w2 row-wise.

    With sequence parallel the residual stream between the blocks' matmuls is sharded on
    the sequence dim (Shard(1)): norms run on 1/tp of the tokens, and the all-reduce of a
    row-wise layer becomes a reduce-scatter plus an all-gather at the next block input.
    With loss parallel the logits stay sharded on the vocabulary dim for the loss.
    """
    sp = parallel.sequence_parallel
    residual = Shard(1) if sp else Replicate()
    logits = Shard(-1) if parallel.loss_parallel else Replicate()
    block_tp = {
        "attention": PrepareModuleInput(input_layouts=(residual, None), desired_input_layouts=(Replicate(), None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=residual),
        "feed_forward": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=residual),
    }
    top_tp = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(
            input_layouts=residual, output_layouts=logits, use_local_output=not parallel.loss_parallel
        ),
    }
    if sp:
        block_tp["attention_norm"] = SequenceParallel()
        block_tp["ffn_norm"] = SequenceParallel()
        top_tp["norm"] = SequenceParallel()
    # A tied embedding/output weight is one parameter: it must live in a single FSDP unit,
    # so it stays with the root instead of getting units of its own.
    fsdp_units = [] if model_config.tie_embeddings else [["tok_embeddings"], ["norm", "output"]]
    return ParallelPlan(
        root=root,
        blocks="layers",
        block_tp=block_tp,
        top_tp=top_tp,
        fsdp_units=fsdp_units,
        first_stage=["tok_embeddings"],
        last_stage=["norm", "output"],
        random_free_blocks=True,  # no dropout: checkpointing need not restore the RNG state
    )
