"""HFCausalLM: fine-tune a pretrained Hugging Face causal LM from a local folder, under any layout."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
from torch import Tensor
from typing_extensions import override

from lightning_3d.config import OptimConfig
from lightning_3d.pretrained import HFFolder

HF_CONFIG_KEY = "hf_config"  # the model's config.json, kept in every checkpoint for export


class HFCausalLM(L.LightningModule):
    """Next-token prediction with the transformers model of a local folder (``config.json`` +
    safetensors), its weights read shard by shard into whatever layout the strategy builds.

    The folder is checked when the module is created, before any process group. Batches are
    dicts with ``input_ids`` and ``labels`` *already shifted* (``labels[t]`` is the token after
    ``input_ids[t]``, ``-100`` ignored), as the project's data pipeline gives them; they reach
    the model as ``shift_labels``. The logged ``train_loss`` / ``val_loss`` are the global
    token-weighted means.
    """

    def __init__(self, path: Union[str, Path], optim: Optional[OptimConfig] = None) -> None:
        super().__init__()
        self.folder = HFFolder(path)
        self.optim_config = optim or OptimConfig()
        self.save_hyperparameters({"hf_path": str(Path(path).resolve()), "optim": asdict(self.optim_config)})
        self.model = None
        self.init_parameter = self.folder.initializer("model")

    @override
    def configure_model(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.model is None:
            # fp32 weights whatever dtype the folder was saved in: the trainer's precision decides
            # what runs in bf16 (parameters are still on the meta device here: nothing is copied)
            self.model = AutoModelForCausalLM.from_config(self.folder.config).float()

    def _loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"]).loss

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, sync_dist=True)
        return loss

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[HF_CONFIG_KEY] = self.folder.config.to_dict()

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        from lightning_3d.module import adamw_optimizer_config

        return adamw_optimizer_config(self.parameters(), self.optim_config, self.trainer.max_steps)
