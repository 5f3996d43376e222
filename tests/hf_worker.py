"""Worker for tests/test_any_model.py: user modules with no plan code, one torchrun group, many cases.

The modules are written as a user would write them: a LightningModule around a transformers
model built from its config (no hub), a plain nn.Module GPT, and a module that parallelizes
itself the way Lightning's ModelParallelStrategy tutorial does. Every case trains a few steps
and records the per-step logged losses (and, on request, the full weights).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from case_harness import run_cases
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, DistributedSampler

from lightning_3d.strategy import ModelParallel4DStrategy

VOCAB, SEQ, BATCH = 96, 16, 8


# ----------------------------------------------------------------------------- transformers models


def hf_config(arch: str, **overrides: Any) -> Any:
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
        "phi3": transformers.Phi3Config,
        "olmo2": transformers.Olmo2Config,
    }
    extra = {
        "qwen3": {"head_dim": 8}, "gemma": {"head_dim": 8}, "mistral": {"sliding_window": None},
        "phi3": {"pad_token_id": 0}, "olmo2": {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None},
    }.get(arch, {})
    return classes[arch](**{**common, **extra, **overrides})


class LitLM(L.LightningModule):
    """The module from the README: configure_model builds the model, training_step calls it with labels."""

    def __init__(self, arch: str = "llama", **config: Any) -> None:
        super().__init__()
        self.arch, self.config_overrides = arch, config
        self.model = None

    def configure_model(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.model is None:
            self.model = AutoModelForCausalLM.from_config(hf_config(self.arch, **self.config_overrides))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class LossOutsideLM(LitLM):
    """Computes its loss from the logits outside the model call: not pipelinable."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(input_ids=batch["input_ids"]).logits
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


# ----------------------------------------------------------------------------- a plain nn.Module GPT


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        # no bias: a key bias has a zero gradient (softmax ignores it), so AdamW turns the pure
        # rounding noise it gets into full-size steps that differ between layouts
        self.attn = nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(SEQ, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class LogitsLit(L.LightningModule):
    """A module whose model returns logits: the loss is computed in training_step, a plain per-rank mean."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self.model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


class LitGPT(LogitsLit):
    def __init__(self) -> None:
        super().__init__()
        self.model = None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = GPT()



# ----------------------------------------------------------------------------- Lightning ModelParallelStrategy style


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TutorialModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList(FeedForward(32, 64) for _ in range(2))
        self.head = nn.Linear(32, VOCAB, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class LitTutorial(LogitsLit):
    """Written as Lightning's TP + FSDP2 tutorial writes it: it parallelizes itself with the device mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TutorialModel()

    def configure_model(self) -> None:
        from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if isinstance(self.model.head.weight, DTensor) or hasattr(self.model, "reshard"):
            return
        tp_mesh = self.device_mesh["tensor_parallel"]
        dp_mesh = self.device_mesh["data_parallel"]
        if tp_mesh.size() > 1:
            plan = {"w1": ColwiseParallel(), "w2": RowwiseParallel(), "w3": ColwiseParallel()}
            for layer in self.model.layers:
                parallelize_module(layer, tp_mesh, plan)
        if dp_mesh.size() > 1:
            for layer in self.model.layers:
                fully_shard(layer, mesh=dp_mesh)
            fully_shard(self.model, mesh=dp_mesh)



# ----------------------------------------------------------------------------- data and runs


def loader(batch_size: int = BATCH, batches: int = 4, padded: bool = False) -> DataLoader:
    """The user's own DataLoader of per-device batches (Lightning's convention): the strategy's
    distributed sampler hands each data-parallel rank its share of the same samples."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (BATCH * batches, SEQ), generator=generator)
    labels = tokens.clone()
    if padded:  # uneven numbers of scored tokens per sequence
        for row in range(labels.shape[0]):
            labels[row, SEQ - 1 - row % (SEQ // 2) :] = -100
    return DataLoader([{"input_ids": t, "labels": y} for t, y in zip(tokens, labels)], batch_size=batch_size)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def _module(kind: str, options: dict[str, Any]) -> L.LightningModule:
    return {"hf": LitLM, "loss_outside": LossOutsideLM, "gpt": LitGPT, "tutorial": LitTutorial}[kind](**options)


def full_weights(module: L.LightningModule) -> dict[str, Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    strategy = module.trainer.strategy
    if getattr(strategy, "checkpointer", None) is not None:
        state = strategy.checkpointer.canonical(state)
    return {k: v.detach().cpu().float().clone() for k, v in state.items()}


def run(case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    module = _module(case.get("module", "hf"), case.get("options", {}))
    world = int(os.environ["WORLD_SIZE"])
    layout = case["layout"]
    if case.get("lightning"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=layout["dp"], tensor_parallel_size=layout["tp"])
        devices = layout["dp"] * layout["tp"]
    else:
        strategy = ModelParallel4DStrategy(**layout)
        devices = world
    # the same global batch of BATCH sequences per step on every layout
    model_ranks = layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1)
    batch_size = BATCH // (world // model_ranks)
    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=case.get("steps", 3), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[recorder], default_root_dir=str(out_dir), **case.get("trainer", {}),
    )
    trainer.fit(module, loader(batch_size, padded=case.get("padded", False)))
    result: dict[str, Any] = {"losses": recorder.losses}
    if case.get("validate"):
        logged = trainer.validate(module, loader(batch_size, batches=1), verbose=False)
        result["val_loss"] = float(logged[0]["val_loss"])
    if case.get("weights"):
        result["weights"] = full_weights(module)
    if "reshard_to" in case:
        result.update(reshard(case, module, trainer, out_dir))
    return result


def all_full_weights(module: L.LightningModule) -> dict[str, Tensor]:
    """The whole model's weights under their unsplit names, from every pipeline stage."""
    parts: list[dict[str, Tensor]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, full_weights(module))
    return {name: tensor for part in parts for name, tensor in part.items()}


def reshard(case: dict[str, Any], module: L.LightningModule, trainer: L.Trainer, out_dir: Path) -> dict[str, Any]:
    """Save a checkpoint, load it into a new module under another layout (no further step): same weights."""
    saved = all_full_weights(module)
    checkpoint = out_dir / "checkpoint"
    trainer.save_checkpoint(checkpoint)
    resumed = _module(case.get("module", "hf"), case.get("options", {}))
    second = L.Trainer(
        accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=ModelParallel4DStrategy(**case["reshard_to"]),
        max_steps=trainer.global_step, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out_dir),
    )
    second.fit(resumed, loader(), ckpt_path=checkpoint)
    loaded = all_full_weights(resumed)
    return {"saved_names": sorted(saved), "loaded_names": sorted(loaded), "max_difference": max((saved[k] - loaded[k]).abs().max().item() for k in saved)}


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------- pretrained folders


def _pretrained_batches(vocab: int, batches: int, batch_size: int) -> list[dict[str, Tensor]]:
    """Pre-shifted samples, as the project's data pipeline gives them to HFCausalLM."""
    tokens = torch.randint(0, vocab, (batches * batch_size, SEQ + 1), generator=torch.Generator().manual_seed(2))
    return [{"input_ids": t[:-1], "labels": t[1:]} for t in tokens]


def _hf_loss(model: nn.Module, batch: dict[str, Tensor]) -> float:
    logits = model(input_ids=batch["input_ids"]).logits.float()
    return float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))


def roundtrip(case: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Load a saved folder under a layout, compare with transformers, train, export, reload."""
    from transformers import AutoModelForCausalLM

    from lightning_3d.config import OptimConfig
    from lightning_3d.export import export
    from lightning_3d.models.hf import HFCausalLM

    torch.manual_seed(0)
    folder, layout, steps = case["folder"], case["layout"], case.get("steps", 3)
    world = int(os.environ["WORLD_SIZE"])
    dp = world // (layout.get("tp", 1) * layout.get("pp", 1) * layout.get("cp", 1))
    module = HFCausalLM(folder, OptimConfig(lr=1e-3, warmup_steps=1, weight_decay=0.0))
    if case.get("from_pretrained"):  # as a user writes it: from_pretrained in configure_model, no init hook
        del module.init_parameter

        def configure_model() -> None:
            if module.model is None:
                module.model = AutoModelForCausalLM.from_pretrained(folder)

        module.configure_model = configure_model
    vocab = module.folder.config.vocab_size
    samples = _pretrained_batches(vocab, steps, BATCH)
    fixed = {key: torch.stack([s[key] for s in samples[:BATCH]]) for key in ("input_ids", "labels")}  # global batch 0
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    pipelined = layout.get("pp", 1) > 1
    result: dict[str, Any] = {}
    with torch.no_grad():
        result["reference_logits"] = reference(input_ids=fixed["input_ids"]).logits
        result["reference_loss"] = _hf_loss(reference, fixed)

    class FirstLogits(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if not pipelined:
                with torch.no_grad():
                    result["loaded_logits"] = pl_module.model(input_ids=fixed["input_ids"]).logits.detach().clone()

    recorder = LossRecorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=ModelParallel4DStrategy(**layout), max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[recorder, FirstLogits()], default_root_dir=str(out_dir),
    )
    # in order (Lightning would shuffle a training loader it shards), so that batch 0 is `fixed`
    dp_rank = (rank() // (layout.get("cp", 1) * layout.get("tp", 1))) % dp

    def in_order(data: list) -> DataLoader:
        return DataLoader(data, batch_size=BATCH // dp, sampler=DistributedSampler(data, num_replicas=dp, rank=dp_rank, shuffle=False))

    trainer.fit(module, in_order(samples))
    result["losses"] = recorder.losses
    if pipelined:  # the model call gives the loss only: compare losses of the fixed batch
        logged = trainer.validate(module, in_order(samples[:BATCH]), verbose=False)
        result["trained_loss"] = float(logged[0]["val_loss"])
    else:
        with torch.no_grad():
            result["trained_logits"] = module.model(input_ids=fixed["input_ids"]).logits.detach().clone()
    checkpoint = out_dir / "checkpoint"
    trainer.save_checkpoint(checkpoint)
    dist.barrier()
    if rank() == 0:
        exported = out_dir / "exported"
        export(checkpoint, exported, max_shard_mb=case.get("max_shard_mb", 2000))
        result["exported_files"] = sorted(p.name for p in exported.iterdir())
        reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
        with torch.no_grad():
            result["exported_logits"] = reloaded(input_ids=fixed["input_ids"]).logits
            result["exported_loss"] = _hf_loss(reloaded, fixed)
    dist.barrier()
    return result


if __name__ == "__main__":
    run_cases(lambda name, case, out_dir: (roundtrip if case.get("kind") == "roundtrip" else run)(case, out_dir))
