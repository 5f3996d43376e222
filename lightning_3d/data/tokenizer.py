"""Tokenizers for text: byte-level (no vocabulary file), or a Hugging Face ``tokenizer.json``.

``data.tokenizer`` chooses: ``byte`` (ids 0..255 are UTF-8 bytes, 256 ends a document), or
the path of a ``tokenizer.json`` (or of a folder holding one, as a Hugging Face model folder
does) read by the ``tokenizers`` library. Either way a document's ids are followed by the
end-of-document id, and no other special token is added.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from lightning_3d.errors import ConfigError

BYTE = "byte"
TOKENIZER_FILE = "tokenizer.json"
# Files of a Hugging Face model folder that may name the end-of-sequence token.
_EOS_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class ByteTokenizer:
    """Ids 0..255 are raw UTF-8 bytes; ``eos_id`` (256) ends each document.

    It needs no vocabulary file and no training, so any text corpus is usable at once.
    """

    eos_id: int = 256
    vocab_size: int = 257
    name: str = BYTE
    fingerprint: str = BYTE

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as uint16 (no eos appended)."""
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Token ids of already-encoded bytes, without a Python loop over them."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def encode_batch(self, texts: Sequence[Union[str, bytes]]) -> list[np.ndarray]:
        """Ids of each text; ``bytes`` are taken as they are (text read from a file stays byte for byte)."""
        return [self.encode_bytes(text) if isinstance(text, bytes) else self.encode(text) for text in texts]

    def decode(self, ids: Union[np.ndarray, torch.Tensor, Iterable[int]]) -> str:
        """Text of ``ids``; eos and any id outside a byte are skipped, bad UTF-8 replaced."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        byte_ids = ids[(ids >= 0) & (ids < 256)].astype(np.uint8)
        return byte_ids.tobytes().decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from ``path`` (a ``tokenizer.json`` or a folder with one).

    The end-of-document token is ``eos_token`` or, when None, the ``eos_token`` of the
    folder's ``tokenizer_config.json`` / ``special_tokens_map.json``.
    """

    def __init__(self, path: Union[str, Path], eos_token: Optional[str] = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                f"data.tokenizer={path} needs the tokenizers package: pip install 'lightning-3d[hf]'"
            ) from None
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise ConfigError(f"data.tokenizer={path}: {file} is not a file (expected a {TOKENIZER_FILE} or a folder with one)")
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as error:  # the Rust library raises its own Exception type for a bad file
            raise ConfigError(f"data.tokenizer={path}: {file} is not a tokenizers file: {error}") from None
        self.path = file
        self.name = str(file)
        # ids need not be contiguous (added tokens): the model needs an embedding row for the largest
        self.vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        eos = eos_token if eos_token is not None else _configured_eos(file.parent)
        if eos is None:
            added = [token.content for token in self._tokenizer.get_added_tokens_decoder().values() if token.special]
            raise ConfigError(
                f"data.tokenizer={path} names no end-of-sequence token (no eos_token in {' or '.join(_EOS_CONFIG_FILES)} "
                f"next to it): set data.eos_token, e.g. to one of its special tokens {added}"
            )
        eos_id = self._tokenizer.token_to_id(eos)
        if eos_id is None:
            raise ConfigError(f"data.eos_token={eos!r} is not a token of the tokenizer {file}")
        self.eos_id = int(eos_id)
        canonical = self._tokenizer.to_str().encode("utf-8")
        self.fingerprint = f"{hashlib.sha256(canonical).hexdigest()}:{self.eos_id}"

    def encode_batch(self, texts: Sequence[Union[str, bytes]]) -> list[np.ndarray]:
        """Ids of each text (no special tokens added), encoded in parallel by the library's threads."""
        strings = [text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text for text in texts]
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)  # the fast one: tokenizers >= 0.21
        return [np.asarray(encoding.ids, dtype=np.uint32) for encoding in encode(strings, add_special_tokens=False)]


Tokenizer = Union[ByteTokenizer, FileTokenizer]


def load_tokenizer(spec: str, eos_token: Optional[str] = None) -> Tokenizer:
    """The tokenizer ``data.tokenizer`` / ``data.eos_token`` choose."""
    if spec == BYTE:
        if eos_token is not None:
            raise ConfigError(
                f"data.eos_token={eos_token!r} is for a tokenizer file; the byte tokenizer ends documents with id "
                f"{ByteTokenizer.eos_id}"
            )
        return ByteTokenizer()
    return FileTokenizer(spec, eos_token)


def _configured_eos(folder: Path) -> Optional[str]:
    for name in _EOS_CONFIG_FILES:
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        eos = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(eos, dict):  # {"content": "</s>", "lstrip": false, ...}
            eos = eos.get("content")
        if isinstance(eos, str):
            return eos
    return None


def token_dtype_for(vocab_size: int) -> np.dtype:
    """The narrowest dtype of a token file for ids below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenize_documents(tokenizer: Tokenizer, texts: Sequence[Union[str, bytes]]) -> np.ndarray:
    """The ids of ``texts``, each document followed by eos, in one array of :func:`token_dtype_for`'s dtype."""
    encoded = tokenizer.encode_batch(texts)
    tokens = np.empty(sum(len(ids) + 1 for ids in encoded), dtype=token_dtype_for(tokenizer.vocab_size))
    position = 0
    for ids in encoded:
        end = position + len(ids)
        tokens[position:end] = ids
        tokens[end] = tokenizer.eos_id
        position = end + 1
    return tokens
