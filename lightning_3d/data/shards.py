"""Token shards from documents: text, jsonl, json, parquet or arrow files tokenized into ``.bin`` files with sidecars.

Each input file becomes the shards ``<input number>-<shard number>.bin`` of at most
``shard_tokens`` tokens, each with its sidecar ``.bin.json`` (dtype, token count, largest
id, tokenizer), in input order. Input files are tokenized in parallel by worker processes,
each batch of documents by the tokenizer's own threads. jsonl, json, parquet and arrow files
are read through Hugging Face ``datasets`` (memory-mapped Arrow, no hub); any other file is
one text document. Each document is followed by the tokenizer's end-of-sequence id; empty
documents are skipped. Used by ``python -m lightning_3d.data.prepare`` and by the token
cache of ``data.source=hf``.
"""

from __future__ import annotations

import functools
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np

from lightning_3d.data.paths import unreadable
from lightning_3d.data.token_files import write_sidecar
from lightning_3d.data.tokenizer import Tokenizer, load_tokenizer, token_dtype_for, tokenize_documents
from lightning_3d.errors import ConfigError

if TYPE_CHECKING:
    import datasets

# Readers of Hugging Face `datasets` by file suffix; any other file is one text document.
DATASET_READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
DEFAULT_SHARD_TOKENS = 1 << 30
# Documents tokenized at once: enough for the tokenizer's threads, little memory.
_BATCH_DOCUMENTS = 1024
_PARTIAL = ".partial"


def prepare(
    files: Sequence[Path],
    out: Union[str, Path],
    tokenizer: str,
    eos_token: Optional[str] = None,
    text_key: str = "text",
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
) -> list[Path]:
    """Tokenize ``files`` into shards in ``out``; returns the shards in order (input order, then shard order).

    ``tokenizer`` / ``eos_token`` as ``data.tokenizer`` / ``data.eos_token``. A shard is
    written as ``.partial`` and renamed once whole, after its sidecar, so an interrupted run
    leaves no shard that looks complete.
    """
    if shard_tokens <= 0:
        raise ConfigError(f"shard_tokens={shard_tokens} must be > 0")
    if workers <= 0:
        raise ConfigError(f"workers={workers} must be > 0")
    load_tokenizer(tokenizer, eos_token)  # a bad tokenizer fails here, not in every worker
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.bin")):
        # shards of an earlier run would be read along with the new ones
        raise ConfigError(f"the output folder {out} already holds .bin files; choose an empty or new folder")
    with tempfile.TemporaryDirectory(dir=out, prefix=".arrow-") as arrow_cache:
        jobs = [(index, Path(file), out, tokenizer, eos_token, text_key, shard_tokens, arrow_cache) for index, file in enumerate(files)]
        if workers == 1 or len(jobs) <= 1:
            shards = [_tokenize_file(*job) for job in jobs]
        else:
            # spawn: a forked copy of a process that runs threads (a Trainer's, the tokenizer's) can deadlock
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=get_context("spawn")) as pool:
                shards = list(pool.map(_tokenize_file, *zip(*jobs)))
    return [shard for file_shards in shards for shard in file_shards]


@functools.lru_cache(maxsize=4)
def _tokenizer(spec: str, eos_token: Optional[str]) -> Tokenizer:
    return load_tokenizer(spec, eos_token)


def _tokenize_file(
    index: int, path: Path, out: Path, spec: str, eos_token: Optional[str], text_key: str, shard_tokens: int, arrow_cache: str
) -> list[Path]:
    tokenizer = _tokenizer(spec, eos_token)
    writer = _ShardWriter(out, f"{index:05d}", token_dtype_for(tokenizer.vocab_size), shard_tokens, tokenizer.name)
    for texts in read_documents(path, text_key, arrow_cache):
        texts = [text for text in texts if text]
        if texts:
            writer.write(tokenize_documents(tokenizer, texts))
    return writer.close()


def read_documents(path: Path, text_key: str, arrow_cache: str) -> Iterator[list[Union[str, bytes]]]:
    """Batches of the documents of ``path``: the ``text_key`` column of a dataset file, or the whole of a text file."""
    reader = DATASET_READERS.get(path.suffix)
    if reader is None:
        try:
            yield [path.read_bytes()]
        except OSError as error:
            raise unreadable(path, error) from None
        return
    dataset = open_dataset(path, reader, arrow_cache)
    if text_key not in dataset.column_names:
        raise ConfigError(f"{path} has no column {text_key!r} (data.text_key); its columns: {dataset.column_names}")
    row = 0
    for batch in dataset.select_columns([text_key]).iter(batch_size=_BATCH_DOCUMENTS):
        texts = batch[text_key]
        for offset, text in enumerate(texts):
            if text is not None and not isinstance(text, str):
                raise ConfigError(f"{path} row {row + offset}: column {text_key!r} is a {type(text).__name__}, not a string")
        yield [text or "" for text in texts]
        row += len(texts)


def open_dataset(path: Path, reader: str, arrow_cache: str) -> "datasets.Dataset":
    """``path`` as a memory-mapped Arrow ``datasets.Dataset`` (an ``.arrow`` file is mapped where it is)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"reading {path} needs the datasets package: pip install 'lightning-3d[hf]'") from None
    try:
        if reader == "arrow":
            return datasets.Dataset.from_file(str(path))
        if reader == "parquet":
            return datasets.Dataset.from_parquet(str(path), cache_dir=arrow_cache)
        return datasets.Dataset.from_json(str(path), cache_dir=arrow_cache)
    except Exception as error:  # pyarrow's and datasets' many error types for a file they cannot parse
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(f"cannot read {path} as {reader} with datasets: {type(error).__name__}: {first_line}") from error


class _ShardWriter:
    """Appends tokens to ``<prefix>-<n>.bin`` shards of ``shard_tokens`` tokens each, with their sidecars."""

    def __init__(self, out: Path, prefix: str, dtype: np.dtype, shard_tokens: int, tokenizer: str) -> None:
        self.out, self.prefix, self.dtype, self.shard_tokens, self.tokenizer = out, prefix, dtype, shard_tokens, tokenizer
        self.shards: list[Path] = []
        self._file = None
        self._count = 0
        self._max_id = -1

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            piece, tokens = tokens[:room], tokens[room:]
            piece.tofile(self._file)
            self._count += len(piece)
            self._max_id = max(self._max_id, int(piece.max()))
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[Path]:
        if self._file is not None:
            self._finish()
        return self.shards

    def _open(self) -> None:
        path = self.out / f"{self.prefix}-{len(self.shards):04d}.bin"
        self._file = open(path.with_name(path.name + _PARTIAL), "wb")
        self.shards.append(path)
        self._count, self._max_id = 0, -1

    def _finish(self) -> None:
        self._file.close()
        self._file = None
        path = self.shards[-1]
        write_sidecar(path, self._count, self.dtype, self._max_id, tokenizer=self.tokenizer)
        os.replace(path.with_name(path.name + _PARTIAL), path)
