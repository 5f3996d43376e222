"""From a :class:`~lightning_3d.config.DataConfig` to train and validation token arrays.

Text sources become byte tokens (see :class:`ByteTokenizer`), one eos after each document.
``.bin`` files are token ids already, mapped from disk rather than read into memory.
Everything here is a pure function of the config and the files, so every process of a
job computes the same arrays without talking to the others.
"""

from __future__ import annotations

import json
import math
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from lightning_3d.config import DataConfig
from lightning_3d.data.tokenizer import ByteTokenizer

VALID_SOURCES = ("stdlib", "files")
VALID_TOKEN_DTYPES = ("uint16", "uint32")
# Directories of the stdlib folder that hold installed third-party packages, not the stdlib.
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")
# Buckets of the hash split: a document goes to validation when its bucket < val_fraction * this.
_SPLIT_BUCKETS = 10_000
# Elements per chunk when scanning a memmap for its largest id, so it is never read whole.
_MAX_SCAN_CHUNK = 1 << 24


@dataclass
class _Document:
    key: str  # stable name hashed by the split: a path relative to its root (plus ":line")
    data: bytes  # UTF-8 text
    origin: str  # file to name in error messages


@dataclass
class _TokenStream:
    tokens: np.ndarray  # read-only memmap of a .bin file
    origin: str


@dataclass
class _Corpus:
    documents: list[_Document]
    streams: list[_TokenStream]
    description: str  # what was read, for the empty-corpus message


def stdlib_documents(max_bytes: Optional[int]) -> list[tuple[str, bytes]]:
    """The running interpreter's standard library ``.py`` files as ``(relative path, bytes)``.

    Sorted by relative path so every process sees the same order; third-party packages
    installed inside the stdlib folder are left out. Reading stops once ``max_bytes`` bytes
    are collected (the last file is cut short); ``None`` reads everything.
    """
    _check_max_bytes(max_bytes)
    root = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"the Python standard library folder {root} does not exist")
    # Plain strings rather than pathlib: ~1,800 files, and this runs in every process at once.
    relative_paths = []
    for folder, subfolders, files in os.walk(root):
        # Pruning in place stops os.walk from descending into third-party packages.
        subfolders[:] = [name for name in subfolders if name not in _THIRD_PARTY_DIRS]
        relative_folder = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".py"):
                relative = name if relative_folder == "." else f"{relative_folder}/{name}"
                relative_paths.append(relative.replace(os.sep, "/"))
    relative_paths.sort()

    def read_all() -> Iterator[_Document]:
        for relative in relative_paths:
            full_path = os.path.join(root, relative)
            with open(full_path, "rb") as file:
                yield _Document(relative, file.read(), full_path)

    return [(doc.key, doc.data) for doc in _take_up_to(read_all(), max_bytes)]


def load_token_splits(config: DataConfig, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_tokens, val_tokens)``: 1-D integer arrays described by ``config``.

    Validation comes from ``config.val_paths`` when given. Otherwise documents are split
    by a hash of their relative path (the same split in every process and every run);
    a single document, or a ``.bin`` token stream, gives its last ``val_fraction`` of
    tokens (at least ``seq_len + 1``) to validation.
    """
    _check_config(config)
    train_corpus = _read_training_corpus(config)
    val_corpus = _read_files_corpus(config.val_paths, config) if config.val_paths else None

    for corpus in (train_corpus, val_corpus):
        if corpus is not None:
            _check_not_empty(corpus)
            _check_token_ids(corpus, vocab_size)

    if val_corpus is not None:
        return _tokens_of(train_corpus), _tokens_of(val_corpus)
    return _split(train_corpus, config)


# ----------------------------------------------------------------------------- reading


def _check_config(config: DataConfig) -> None:
    if config.source not in VALID_SOURCES:
        raise ValueError(f"data.source={config.source!r} is not one of {', '.join(VALID_SOURCES)}")
    if config.source == "files" and not config.paths:
        raise ValueError("data.source='files' needs data.paths: a list of text, .jsonl or .bin files or folders")
    if config.source == "stdlib" and config.paths:
        # Silently ignoring the paths would train on the wrong corpus.
        raise ValueError(
            f"data.paths={list(config.paths)} is set but data.source='stdlib' ignores it; set data.source=files"
        )
    if config.token_dtype not in VALID_TOKEN_DTYPES:
        raise ValueError(
            f"data.token_dtype={config.token_dtype!r} is not one of {', '.join(VALID_TOKEN_DTYPES)}"
        )
    if config.seq_len <= 0:
        raise ValueError(f"data.seq_len={config.seq_len} must be > 0")
    if not config.val_paths and not 0.0 <= config.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={config.val_fraction} must be in [0, 1)")
    _check_max_bytes(config.max_bytes)


def _check_max_bytes(max_bytes: Optional[int]) -> None:
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"data.max_bytes={max_bytes} must be > 0 (or None for no cap)")


def _read_training_corpus(config: DataConfig) -> _Corpus:
    if config.source == "stdlib":
        documents = [
            _Document(relative, data, f"stdlib:{relative}") for relative, data in stdlib_documents(config.max_bytes)
        ]
        root = sysconfig.get_paths()["stdlib"]
        return _Corpus(documents, [], f"the Python standard library at {root}")
    return _read_files_corpus(config.paths, config)


def _read_files_corpus(paths: Iterable[str], config: DataConfig) -> _Corpus:
    text_files: list[tuple[str, Path]] = []
    streams: list[_TokenStream] = []
    for key, path in _expand_paths(paths):
        if path.suffix == ".bin":
            streams.append(_TokenStream(_open_token_file(path, config.token_dtype), str(path)))
        else:
            text_files.append((key, path))
    documents = list(_take_up_to(_iter_text_documents(text_files, config.text_key), config.max_bytes))
    return _Corpus(documents, streams, "paths " + ", ".join(str(p) for p in paths))


def _expand_paths(paths: Iterable[str]) -> list[tuple[str, Path]]:
    """Files named by ``paths`` (folders recursed, sorted) with the key the split hashes.

    The key is relative to the named folder, or the file name for a file named directly, so
    the split does not depend on the working directory or on absolute paths.
    """
    files: list[tuple[str, Path]] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            files.extend((p.relative_to(path).as_posix(), p) for p in found)
        elif path.is_file():
            files.append((path.name, path))
        else:
            raise FileNotFoundError(f"data path {entry} does not exist")
    return files


def _iter_text_documents(files: list[tuple[str, Path]], text_key: str) -> Iterator[_Document]:
    # A generator, so that reading stops at the max_bytes cap instead of reading every file.
    for key, path in files:
        if path.suffix == ".jsonl":
            yield from _iter_jsonl_documents(key, path, text_key)
        else:
            data = path.read_bytes()
            # Invalid UTF-8 becomes U+FFFD, so every document is valid text.
            yield _Document(key, data.decode("utf-8", errors="replace").encode("utf-8"), str(path))


def _iter_jsonl_documents(key: str, path: Path, text_key: str) -> Iterator[_Document]:
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {line_number} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path} line {line_number} is a JSON {type(record).__name__}, not an object")
            if text_key not in record:
                raise ValueError(
                    f"{path} line {line_number} has no field {text_key!r} (data.text_key); "
                    f"fields there: {sorted(record)}"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path} line {line_number}: field {text_key!r} is a {type(text).__name__}, not a string"
                )
            yield _Document(f"{key}:{line_number}", text.encode("utf-8"), f"{path} line {line_number}")


def _take_up_to(documents: Iterable[_Document], max_bytes: Optional[int]) -> Iterator[_Document]:
    """Non-empty documents until ``max_bytes`` bytes are taken; the last one is cut to fit."""
    taken = 0
    for doc in documents:
        if not doc.data:
            continue  # an empty file would add a lone eos and count as a document
        if max_bytes is not None:
            room = max_bytes - taken
            if len(doc.data) >= room:
                yield _Document(doc.key, doc.data[:room], doc.origin)
                return
        taken += len(doc.data)
        yield doc


def _open_token_file(path: Path, token_dtype: str) -> np.ndarray:
    dtype = np.dtype(token_dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(
            f"{path} has {size} bytes, not a multiple of {dtype.itemsize} bytes per {token_dtype} token: "
            f"is data.token_dtype={token_dtype!r} the dtype it was written with?"
        )
    if size == 0:
        return np.empty(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


# ----------------------------------------------------------------------------- checks


def _check_not_empty(corpus: _Corpus) -> None:
    if not corpus.documents and not any(len(stream.tokens) for stream in corpus.streams):
        raise ValueError(f"empty corpus: no documents and zero tokens found in {corpus.description}")


def _check_token_ids(corpus: _Corpus, vocab_size: int) -> None:
    tokenizer = ByteTokenizer()
    if corpus.documents and vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"{corpus.documents[0].origin} is text: byte tokens reach id {tokenizer.eos_id} (eos), "
            f"but vocab_size={vocab_size}; it needs vocab_size >= {tokenizer.vocab_size}"
        )
    for stream in corpus.streams:
        largest = _chunked_max(stream.tokens)
        if largest is not None and largest >= vocab_size:
            raise ValueError(
                f"{stream.origin} holds token id {largest} (its max), not below vocab_size={vocab_size}"
            )


def _chunked_max(tokens: np.ndarray) -> Optional[int]:
    if len(tokens) == 0:
        return None
    return max(int(tokens[start : start + _MAX_SCAN_CHUNK].max()) for start in range(0, len(tokens), _MAX_SCAN_CHUNK))


# ----------------------------------------------------------------------------- tokens and split


def _tokenize(documents: list[_Document]) -> np.ndarray:
    """Byte tokens of ``documents``, each followed by eos, filled into one preallocated array."""
    total = sum(len(doc.data) for doc in documents) + len(documents)
    tokens = np.empty(total, dtype=np.uint16)
    position = 0
    for doc in documents:
        end = position + len(doc.data)
        tokens[position:end] = np.frombuffer(doc.data, dtype=np.uint8)
        tokens[end] = ByteTokenizer.eos_id
        position = end + 1
    return tokens


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    parts = [part for part in parts if len(part)]
    if len(parts) == 1:
        return parts[0]  # keep a memmap a memmap instead of copying it
    if not parts:
        return np.empty(0, dtype=np.uint16)
    return np.concatenate(parts)


def _tokens_of(corpus: _Corpus) -> np.ndarray:
    return _concatenate([_tokenize(corpus.documents)] + [stream.tokens for stream in corpus.streams])


def _is_validation(key: str, val_fraction: float) -> bool:
    # crc32, unlike hash(), is the same in every process and every Python run.
    return zlib.crc32(key.encode("utf-8")) % _SPLIT_BUCKETS < val_fraction * _SPLIT_BUCKETS


def _split(corpus: _Corpus, config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    documents = corpus.documents
    if len(documents) == 1:
        train, val = _tail_split(_tokenize(documents), config, documents[0].origin)
        train_parts.append(train)
        val_parts.append(val)
    elif documents:
        train_docs, val_docs = [], []
        for doc in documents:
            (val_docs if _is_validation(doc.key, config.val_fraction) else train_docs).append(doc)
        # Tiny corpora can hash every document to one side; keep both sides non-empty.
        if not val_docs:
            val_docs, train_docs = train_docs[-1:], train_docs[:-1]
        if not train_docs:
            train_docs, val_docs = val_docs[:1], val_docs[1:]
        train_parts.append(_tokenize(train_docs))
        val_parts.append(_tokenize(val_docs))
    for stream in corpus.streams:
        if len(stream.tokens):
            train, val = _tail_split(stream.tokens, config, stream.origin)
            train_parts.append(train)
            val_parts.append(val)
    return _concatenate(train_parts), _concatenate(val_parts)


def _tail_split(tokens: np.ndarray, config: DataConfig, origin: str) -> tuple[np.ndarray, np.ndarray]:
    """The last ``val_fraction`` of ``tokens`` (at least one window) is validation."""
    window = config.seq_len + 1
    val_len = max(math.ceil(len(tokens) * config.val_fraction), window)
    if len(tokens) - val_len < window:
        raise ValueError(
            f"{origin} has {len(tokens)} tokens: too few to split into validation ({val_len} tokens) and "
            f"training (at least seq_len+1 = {window} tokens); add data, lower data.seq_len or set data.val_paths"
        )
    return tokens[:-val_len], tokens[-val_len:]
