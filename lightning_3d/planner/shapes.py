"""The shapes the planner reasons about: the reference model's config, or a Hugging Face ``config.json``.

Only ``config.json`` is read (no weights, no transformers model is built), so a folder
holding nothing else is enough to plan a 70B run. A multimodal config's ``text_config``
is the decoder that is trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any, Optional

from lightning_3d.config import ModelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.flops import decoder_flops_per_token, decoder_matmul_params

# config.json keys every decoder must give (a missing one is named in the error)
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder: every size the memory, FLOP and traffic counts need.

    ``source`` is ``reference`` (lightning_3d.models.llama, planned with sequence and loss
    parallel) or ``hf`` (a transformers model: its derived plan has neither).
    """

    n_layers: int
    dim: int
    n_heads: int
    kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    source: str = "reference"
    name: str = ""

    @classmethod
    def of_config(cls, config: ModelConfig, name: str = "") -> "ModelShape":
        return cls(
            n_layers=config.n_layers,
            dim=config.dim,
            n_heads=config.n_heads,
            kv_heads=config.kv_heads,
            head_dim=config.head_dim,
            ffn_dim=config.hidden_dim,
            vocab_size=config.vocab_size,
            tie_embeddings=config.tie_embeddings,
            max_seq_len=config.max_seq_len,
            source="reference",
            name=name,
        )

    @classmethod
    def of_hf_folder(cls, path: str | Path) -> "ModelShape":
        """Read the decoder's sizes from ``<path>/config.json``."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"model.path={path}: no config.json there (the planner reads only that file)")
        try:
            raw = json.loads(file.read_text())
        except ValueError as error:
            raise ConfigError(f"{file}: not valid JSON ({error})") from error
        return cls.of_hf_config(raw, str(file))

    @classmethod
    def of_hf_config(cls, raw: dict[str, Any], where: str = "config.json") -> "ModelShape":
        text = raw.get("text_config") or raw
        missing = [key for key in _REQUIRED if not isinstance(text.get(key), int)]
        if missing:
            raise ConfigError(f"{where}: the planner needs {missing} (integers) to size the model; they are missing")
        heads = text["num_attention_heads"]
        dim = text["hidden_size"]
        ffn: Optional[int] = text.get("intermediate_size")
        return cls(
            n_layers=text["num_hidden_layers"],
            dim=dim,
            n_heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or dim // heads,
            ffn_dim=ffn if isinstance(ffn, int) else 4 * dim,
            vocab_size=text["vocab_size"],
            tie_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            max_seq_len=text.get("max_position_embeddings") or 8192,
            source="hf",
            name=str(raw.get("model_type") or text.get("model_type") or "hf"),
        )

    @property
    def sequence_parallel(self) -> bool:
        """Whether the strategy's plan for this model shards norms and residuals over tp."""
        return self.source == "reference"

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` the project's validation checks layouts against."""
        return ModelConfig(
            n_layers=self.n_layers,
            dim=self.n_heads * self.head_dim,  # the validation's head arithmetic, for any head_dim
            n_heads=self.n_heads,
            n_kv_heads=self.kv_heads,
            vocab_size=self.vocab_size,
            ffn_dim=self.ffn_dim,
            max_seq_len=self.max_seq_len,
            tie_embeddings=self.tie_embeddings,
            source=self.source,
        )

    # ------------------------------------------------------------------ parameters

    def block_parameters(self) -> list[tuple[str, tuple[int, int] | tuple[int], str]]:
        """(name, full shape, tensor-parallel split) of one block's parameters, in module order.

        Split: ``col`` (dim 0 over tp), ``row`` (dim 1 over tp) or ``rep`` (whole on every tp rank).
        """
        q, kv = self.n_heads * self.head_dim, self.kv_heads * self.head_dim
        return [
            ("attention_norm", (self.dim,), "rep"),
            ("wq", (q, self.dim), "col"),
            ("wk", (kv, self.dim), "col"),
            ("wv", (kv, self.dim), "col"),
            ("wo", (self.dim, q), "row"),
            ("ffn_norm", (self.dim,), "rep"),
            ("w1", (self.ffn_dim, self.dim), "col"),
            ("w2", (self.dim, self.ffn_dim), "row"),
            ("w3", (self.ffn_dim, self.dim), "col"),
        ]

    def table_split(self) -> str:
        """How tp splits the embedding and head tables: over the vocabulary, except a transformers
        model's tied head, which its plan keeps whole."""
        return "rep" if self.source == "hf" and self.tie_embeddings else "col"

    @property
    def block_size(self) -> int:
        """Parameters of one block."""
        return sum(prod(shape) for _, shape, _ in self.block_parameters())

    @property
    def num_parameters(self) -> int:
        tables = (1 if self.tie_embeddings else 2) * self.vocab_size * self.dim
        return self.n_layers * self.block_size + tables + self.dim

    def matmul_parameters(self) -> int:
        """Weights used in a matmul per token (lightning_3d.flops, for any head_dim)."""
        return decoder_matmul_params(
            self.n_layers, self.dim, self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.ffn_dim, self.vocab_size
        )

    def flops_per_token(self, seq_len: int) -> int:
        """Forward + backward FLOPs of one token (lightning_3d.flops' rule)."""
        return decoder_flops_per_token(self.matmul_parameters(), self.n_layers, self.n_heads * self.head_dim, seq_len)

    def describe(self) -> str:
        billions = self.num_parameters / 1e9
        size = f"{billions:.1f}B" if billions >= 1 else f"{self.num_parameters / 1e6:.1f}M"
        return (
            f"{self.name or 'model'}: {size} parameters, {self.n_layers} layers, dim {self.dim}, "
            f"{self.n_heads} heads ({self.kv_heads} kv), ffn {self.ffn_dim}, vocab {self.vocab_size}"
            + (", tied embeddings" if self.tie_embeddings else "")
        )
