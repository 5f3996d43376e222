"""From a :class:`~lightning_3d.config.DataConfig` to the train and validation token streams.

- ``stdlib`` and text files / ``.jsonl`` (``data.source=files``): documents read and
  tokenized in memory by ``data.tokenizer``, one eos after each (small corpora).
- ``.bin`` files (``data.source=files``): token ids already, read through an index of file
  offsets (:class:`TokenStream`); nothing is concatenated, and startup reads sizes,
  sidecars and a bounded sample, never a whole file.
- ``data.source=hf``: local jsonl / parquet / arrow tokenized once into a cache of token
  files (:mod:`lightning_3d.data.hf`), then read like ``.bin`` files.

Everything here is a pure function of the config and the files, so every process of a
job computes the same streams without talking to the others.
"""

from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import dataclass
from typing import Iterable, Optional

from lightning_3d.config import DataConfig
from lightning_3d.data import hf
from lightning_3d.data.documents import (
    Document,
    check_max_bytes,
    iter_text_documents,
    no_records_message,
    stdlib_documents,
    take_up_to,
)
from lightning_3d.data.paths import DataFile, entry_files, expand_paths, keep_file, unreadable
from lightning_3d.data.token_files import VALID_TOKEN_DTYPES, TokenFile, check_ids_sample, open_token_file
from lightning_3d.data.token_stream import Segment, TokenStream
from lightning_3d.data.tokenizer import BYTE, ByteTokenizer, Tokenizer, load_tokenizer, tokenize_documents
from lightning_3d.errors import ConfigError

__all__ = ["load_token_splits", "data_file_problems", "stdlib_documents", "check_tokenizer_vocab"]

VALID_SOURCES = ("stdlib", "files", "hf")
# Buckets of the hash split: a document goes to validation when its bucket < val_fraction * this.
_SPLIT_BUCKETS = 10_000
# Bytes of a .jsonl file the pre-flight reads to see whether it holds any record.
_PROBE_BYTES = 1 << 16


@dataclass
class _Corpus:
    documents: list[Document]
    files: list[TokenFile]
    description: str  # what was read, for the empty-corpus message


def load_token_splits(config: DataConfig, vocab_size: int) -> tuple[TokenStream, TokenStream]:
    """``(train_tokens, val_tokens)``: token streams described by ``config``.

    Validation comes from ``config.val_paths`` when given. Otherwise text documents are
    split by a hash of their relative path (the same split in every process and every
    run); a single document and each ``.bin`` file give their last ``val_fraction`` of tokens
    (at least ``seq_len + 1``) to validation, and so does the token cache of ``data.source=hf``
    as a whole.
    """
    check_config(config)
    tokenizer = load_tokenizer(config.tokenizer, config.eos_token)
    if config.source == "hf":
        check_tokenizer_vocab(tokenizer, vocab_size)
    train_corpus = _read_stdlib(config) if config.source == "stdlib" else _read_corpus(config.paths, config, tokenizer)
    val_corpus = _read_corpus(config.val_paths, config, tokenizer) if config.val_paths else None

    for corpus in (train_corpus, val_corpus):
        if corpus is not None:
            _check_not_empty(corpus)
            if corpus.documents:
                check_tokenizer_vocab(tokenizer, vocab_size, corpus.documents[0].origin)
            for file in corpus.files:
                check_ids_sample(file, vocab_size)

    if val_corpus is not None:
        return _stream_of(train_corpus, tokenizer), _stream_of(val_corpus, tokenizer)
    if config.source == "hf":
        stream = _stream_of(train_corpus, tokenizer)
        return _tail_split(stream, config, f"the token cache of {train_corpus.description}")
    return _split(train_corpus, config, tokenizer)


def data_file_problems(config: DataConfig, vocab_size: Optional[int] = None) -> list[str]:
    """Every bad file of ``config.paths`` and ``config.val_paths``, one message each.

    A cheap check to run before any worker starts: it stats and opens each file, reads its
    sidecar or a bounded prefix (parquet and arrow: the schema) and tokenizes nothing. The
    messages are the ones :func:`load_token_splits` raises. Problems found only by reading
    whole files (bad JSON lines, token ids past the vocabulary) are left to it. With
    ``vocab_size`` (the model's), a tokenizer file with more ids is a problem too.
    """
    problems: list[str] = []
    if config.tokenizer != BYTE:
        try:
            tokenizer = load_tokenizer(config.tokenizer, config.eos_token)
            if vocab_size is not None:
                check_tokenizer_vocab(tokenizer, vocab_size)
        except (OSError, ValueError) as error:
            problems.append(str(error))
    if config.source == "hf":
        return problems + hf.file_problems(config)
    if config.source not in VALID_SOURCES:
        return problems
    for entry in [*config.paths, *config.val_paths] if config.source == "files" else config.val_paths:
        for file in entry_files(entry, lambda error: problems.append(str(error))):
            try:
                if keep_file(file):
                    _probe_file(file, config)
            except (OSError, ValueError) as error:
                problems.append(str(error))
    return problems


def check_tokenizer_vocab(tokenizer: Tokenizer, vocab_size: int, origin: Optional[str] = None) -> None:
    """Raises when ``tokenizer`` makes ids the model has no embedding for."""
    if tokenizer.vocab_size <= vocab_size:
        return
    if isinstance(tokenizer, ByteTokenizer):
        raise ConfigError(
            f"{origin} is text: byte tokens reach id {tokenizer.eos_id} (eos), "
            f"but vocab_size={vocab_size}; it needs vocab_size >= {tokenizer.vocab_size}"
        )
    raise ConfigError(
        f"the tokenizer {tokenizer.name} (data.tokenizer) makes ids up to {tokenizer.vocab_size - 1}, "
        f"but vocab_size={vocab_size}; the model needs vocab_size >= {tokenizer.vocab_size}"
    )


# ----------------------------------------------------------------------------- reading


def check_config(config: DataConfig) -> None:
    """Raises for a data option out of range (the files themselves are checked as they are read)."""
    if config.source not in VALID_SOURCES:
        raise ConfigError(f"data.source={config.source!r} is not one of {', '.join(VALID_SOURCES)}")
    if config.source in ("files", "hf") and not config.paths:
        kinds = "text, .jsonl or .bin files" if config.source == "files" else ".jsonl, .json, .parquet or .arrow files"
        raise ConfigError(f"data.source={config.source!r} needs data.paths: a list of {kinds}, folders or globs")
    if config.source == "stdlib" and config.paths:
        # Silently ignoring the paths would train on the wrong corpus.
        raise ConfigError(
            f"data.paths={list(config.paths)} is set but data.source='stdlib' ignores it; set data.source=files"
        )
    if config.token_dtype not in VALID_TOKEN_DTYPES:
        raise ConfigError(
            f"data.token_dtype={config.token_dtype!r} is not one of {', '.join(VALID_TOKEN_DTYPES)}"
        )
    if config.seq_len <= 0:
        raise ConfigError(f"data.seq_len={config.seq_len} must be > 0")
    if not config.val_paths and not 0.0 <= config.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={config.val_fraction} must be in [0, 1)")
    if config.num_workers < 0:
        raise ConfigError(f"data.num_workers={config.num_workers} must be >= 0 (0: load batches in the training process)")
    check_max_bytes(config.max_bytes)


def _read_stdlib(config: DataConfig) -> _Corpus:
    documents = [Document(relative, data, f"stdlib:{relative}") for relative, data in stdlib_documents(config.max_bytes)]
    root = sysconfig.get_paths()["stdlib"]
    return _Corpus(documents, [], f"the Python standard library at {root}")


def _read_corpus(paths: Iterable[str], config: DataConfig, tokenizer: Tokenizer) -> _Corpus:
    """The documents and token files of ``paths`` (validation paths of a stdlib run are read as files)."""
    paths = list(paths)
    description = "paths " + ", ".join(str(p) for p in paths)
    if config.source == "hf":
        shards = hf.token_files(paths, config, tokenizer)
        return _Corpus([], [open_token_file(shard, config.token_dtype) for shard in shards], description)
    text_files: list[DataFile] = []
    token_files: list[TokenFile] = []
    for file in expand_paths(paths):
        if file.path.suffix == ".bin":
            token_files.append(open_token_file(file.path, config.token_dtype))
        else:
            text_files.append(file)
    documents = list(take_up_to(iter_text_documents(text_files, config.text_key), config.max_bytes))
    return _Corpus(documents, token_files, description)


def _probe_file(file: DataFile, config: DataConfig) -> None:
    """Raises for what a prefix of ``file`` shows: unreadable, a wrong .bin dtype or sidecar, a blank .jsonl."""
    is_jsonl = file.path.suffix == ".jsonl"
    try:
        with open(file.path, "rb") as handle:
            head = handle.read(_PROBE_BYTES if is_jsonl else 1)
    except OSError as error:
        raise unreadable(file.path, error) from None
    if file.path.suffix == ".bin" and config.token_dtype in VALID_TOKEN_DTYPES:
        open_token_file(file.path, config.token_dtype)
    # A shorter read than asked for is the whole file.
    if is_jsonl and file.named and len(head) < _PROBE_BYTES and not head.decode("utf-8", "replace").strip():
        raise ConfigError(no_records_message(file.path))


def _check_not_empty(corpus: _Corpus) -> None:
    if not corpus.documents and not any(file.count for file in corpus.files):
        raise ConfigError(f"empty corpus: no documents and zero tokens found in {corpus.description}")


# ----------------------------------------------------------------------------- streams and split


def _text_stream(documents: list[Document], tokenizer: Tokenizer) -> TokenStream:
    if not documents:
        return TokenStream([])
    return TokenStream.of(tokenize_documents(tokenizer, [doc.data for doc in documents]), "the text documents")


def _stream_of(corpus: _Corpus, tokenizer: Tokenizer) -> TokenStream:
    files = [Segment.of(file) for file in corpus.files]
    return TokenStream.concatenate([_text_stream(corpus.documents, tokenizer), TokenStream(files)])


def _is_validation(key: str, val_fraction: float) -> bool:
    # crc32, unlike hash(), is the same in every process and every Python run.
    return zlib.crc32(key.encode("utf-8")) % _SPLIT_BUCKETS < val_fraction * _SPLIT_BUCKETS


def _split(corpus: _Corpus, config: DataConfig, tokenizer: Tokenizer) -> tuple[TokenStream, TokenStream]:
    train_parts: list[TokenStream] = []
    val_parts: list[TokenStream] = []
    documents = corpus.documents
    if len(documents) == 1:
        train, val = _tail_split(_text_stream(documents, tokenizer), config, documents[0].origin)
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
        train_parts.append(_text_stream(train_docs, tokenizer))
        val_parts.append(_text_stream(val_docs, tokenizer))
    for file in corpus.files:
        if file.count:
            train, val = _tail_split(TokenStream([Segment.of(file)]), config, str(file.path))
            train_parts.append(train)
            val_parts.append(val)
    return TokenStream.concatenate(train_parts), TokenStream.concatenate(val_parts)


def _tail_split(tokens: TokenStream, config: DataConfig, origin: str) -> tuple[TokenStream, TokenStream]:
    """The last ``val_fraction`` of ``tokens`` (at least one window) is validation."""
    window = config.seq_len + 1
    val_len = max(math.ceil(len(tokens) * config.val_fraction), window)
    if len(tokens) - val_len < window:
        raise ConfigError(
            f"{origin} has {len(tokens)} tokens: too few to split into validation ({val_len} tokens) and "
            f"training (at least seq_len+1 = {window} tokens); add data, lower data.seq_len or set data.val_paths"
        )
    return tokens.split(len(tokens) - val_len)
