"""A local Hugging Face model folder, read as data: ``config.json``, safetensors weights, tokenizer files.

:class:`HFFolder` checks the whole folder when it is created, before any process group:
``config.json`` and a known architecture, the weights (``model.safetensors``, or the shards
named by ``model.safetensors.index.json``), each file's header against its size (a truncated
file is caught), and every tensor's name and shape against the model ``config.json``
describes. Pickled ``.bin`` weights are never read and no remote code is run.

Weights are read per parameter, and for a sharded parameter only the slice this rank holds
(safetensors slicing), so no rank ever holds the whole model: see :class:`FolderInit`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from torch import Tensor

from lightning_3d.config import ModelConfig
from lightning_3d.errors import ConfigError

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# copied through on export, when present
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


def _header(file: Path) -> dict[str, Any]:
    """A safetensors file's header, checked against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ConfigError(f"{file}: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise ConfigError(f"{file}: the header says {length} bytes of header, the file has {size} bytes in all (truncated)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise ConfigError(f"{file}: the safetensors header is not valid JSON ({error})") from error
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + data_end > size:
        raise ConfigError(f"{file}: its tensors need {8 + length + data_end} bytes, the file has {size} (truncated)")
    return header


class HFFolder:
    """A local model folder, checked; reads a tensor or a slice of one on demand."""

    def __init__(self, path: Union[str, Path]) -> None:
        from transformers import AutoConfig

        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"model folder {self.path}: no such folder")
        if not (self.path / CONFIG_FILE).is_file():
            raise ConfigError(f"model folder {self.path} has no {CONFIG_FILE}")
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=False)
        except (ValueError, KeyError, OSError) as error:
            raise ConfigError(f"{self.path / CONFIG_FILE}: the architecture cannot be built ({error})") from error
        self.files = self._weight_files()
        self._meta_model: Optional[torch.nn.Module] = None
        self._file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in self.files:
            for name, entry in _header(file).items():
                if name != "__metadata__":
                    self._file_of[name] = file
                    self.shapes[name] = tuple(entry["shape"])
        self._check_against_config()

    def _weight_files(self) -> list[Path]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise ConfigError(f"{index}: not a safetensors index (no weight_map: {error})") from error
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise ConfigError(f"{index} names {len(files)} shard files; missing: {missing}")
            return files
        if (self.path / SINGLE_FILE).is_file():
            return [self.path / SINGLE_FILE]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            raise ConfigError(
                f"model folder {self.path} has no {SINGLE_FILE} or {INDEX_FILE}"
                + (f" (pickled weights {bins} are not read: convert them to safetensors)" if bins else "")
            )
        return files

    def _check_against_config(self) -> None:
        """Every parameter the config's model has is in the files, with its shape."""
        expected = {name: tuple(param.shape) for name, param in self.meta_model().state_dict().items()}
        problems = []
        tied = getattr(self.config, "tie_word_embeddings", False)
        for name, shape in expected.items():
            if name not in self.shapes:
                if not (tied and name.endswith("lm_head.weight")):  # a tied head is stored as the embedding
                    problems.append(f"{name} (shape {shape}) is in no weight file")
            elif self.shapes[name] != shape:
                problems.append(f"{name} has shape {self.shapes[name]} in {self._file_of[name].name}, {shape} from {CONFIG_FILE}")
        if problems:
            raise ConfigError(f"model folder {self.path}: the weights do not fit {CONFIG_FILE}: " + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))

    def meta_model(self) -> torch.nn.Module:
        """The model ``config.json`` describes, on the meta device (built once: the checks and the
        pre-flight's plan read it, nothing changes it)."""
        from transformers import AutoModelForCausalLM

        if self._meta_model is None:
            with torch.device("meta"):
                self._meta_model = AutoModelForCausalLM.from_config(self.config)
        return self._meta_model

    def head_alias(self, name: str) -> tuple[Optional[str], str]:
        """(the embedding's name, ``name``) when ``name`` is a head tied to the embedding."""
        if name.endswith("lm_head.weight") and getattr(self.config, "tie_word_embeddings", False):
            return next((n for n in self.shapes if n.endswith("embed_tokens.weight")), None), name
        return None, name

    def _source(self, name: str) -> str:
        if name in self._file_of:
            return name
        embedding, _ = self.head_alias(name)
        if embedding is None:
            raise ConfigError(f"model folder {self.path}: no tensor {name!r}")
        return embedding

    def tensor(self, name: str) -> Tensor:
        source = self._source(name)
        with safe_open(self._file_of[source], framework="pt") as handle:
            return handle.get_tensor(source)

    def slice(self, name: str, index: tuple[slice, ...]) -> Tensor:
        """Only the part ``index`` of a tensor is read from disk."""
        source = self._source(name)
        with safe_open(self._file_of[source], framework="pt") as handle:
            return handle.get_slice(source)[index]

    @property
    def size_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.files)

    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    def initializer(self, root: str) -> "FolderInit":
        return FolderInit(self, root)


class FolderInit:
    """``init_parameter`` that reads the folder's weights: a parameter named ``<root>.<hf name>``
    gets the tensor ``<hf name>``; a sharded parameter (DTensor) reads only its own slice
    (:meth:`read_shard`, used by :func:`lightning_3d.parallel.materialize.materialize`)."""

    def __init__(self, folder: HFFolder, root: str) -> None:
        self.folder, self.prefix = folder, f"{root}." if root else ""

    def _name(self, name: str) -> str:
        return name.removeprefix(self.prefix)

    def __call__(self, name: str, full: Tensor, generator: torch.Generator) -> None:
        full.copy_(self.folder.tensor(self._name(name)))

    def read_shard(self, name: str, index: tuple[slice, ...]) -> Tensor:
        return self.folder.slice(self._name(name), index)


def model_config_of(folder: HFFolder, model: ModelConfig) -> ModelConfig:
    """``model`` with its shape fields read from the folder's ``config.json`` (for the pre-flight
    checks, the FLOPs per token and the data pipeline's vocabulary check)."""
    text = folder.config.get_text_config()
    heads = text.num_attention_heads
    return replace(
        model,
        n_layers=text.num_hidden_layers,
        dim=text.hidden_size,
        n_heads=heads,
        n_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        vocab_size=text.vocab_size,
        ffn_dim=getattr(text, "intermediate_size", None),
        max_seq_len=getattr(text, "max_position_embeddings", None) or model.max_seq_len,
        norm_eps=getattr(text, "rms_norm_eps", None) or model.norm_eps,
        tie_embeddings=bool(getattr(folder.config, "tie_word_embeddings", False)),
    )
