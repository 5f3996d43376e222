"""From a :class:`~lightning_3d.config.DataConfig` to train and validation token arrays.

Text sources become byte tokens (see :class:`ByteTokenizer`), one eos after each document.
``.bin`` files are token ids already, mapped from disk rather than read into memory.
Everything here is a pure function of the config and the files, so every process of a
job computes the same arrays without talking to the others.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from lightning_3d.config import DataConfig
from lightning_3d.data.tokenizer import ByteTokenizer
from lightning_3d.errors import ConfigError

VALID_SOURCES = ("stdlib", "files")
VALID_TOKEN_DTYPES = ("uint16", "uint32")
# Directories of the stdlib folder that hold installed third-party packages, not the stdlib.
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")
# Buckets of the hash split: a document goes to validation when its bucket < val_fraction * this.
_SPLIT_BUCKETS = 10_000
# Elements per chunk when scanning a memmap for its largest id, so it is never read whole.
_MAX_SCAN_CHUNK = 1 << 24
# Leading uint16 elements scanned for uint32 ids: enough to be sure, cheap on any file.
_DTYPE_SCAN_ELEMENTS = 1 << 20
# Fewer elements than this could have all-zero odd positions by chance.
_DTYPE_SCAN_MIN_ELEMENTS = 64
# Bytes of a .jsonl file the pre-flight reads to see whether it holds any record.
_PROBE_BYTES = 1 << 16
_SPECIAL_FILE_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


@dataclass
class _Document:
    key: str  # stable name hashed by the split: a path relative to its root (plus ":line")
    data: bytes  # UTF-8 text
    origin: str  # file to name in error messages


@dataclass
class _DataFile:
    key: str  # what the split hashes: the path relative to its named folder, or the file name
    path: Path
    named: bool  # named directly in data.paths / data.val_paths rather than found in a folder


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


def data_file_problems(config: DataConfig) -> list[str]:
    """Every bad file of ``config.paths`` and ``config.val_paths``, one message each.

    A cheap check to run before any worker starts: it stats and opens each file, reads at
    most a bounded prefix and tokenizes nothing. The messages are the ones
    :func:`load_token_splits` raises. Problems found only by reading whole files (bad JSON
    lines, token ids past the vocabulary) are left to it.
    """
    if config.source != "files":
        return []
    problems: list[str] = []
    for entry in [*config.paths, *config.val_paths]:
        for file in _entry_files(entry, lambda error: problems.append(str(error))):
            try:
                if _keep_file(file):
                    _probe_file(file, config)
            except (OSError, ValueError) as error:
                problems.append(str(error))
    return problems


# ----------------------------------------------------------------------------- reading


def _check_config(config: DataConfig) -> None:
    if config.source not in VALID_SOURCES:
        raise ConfigError(f"data.source={config.source!r} is not one of {', '.join(VALID_SOURCES)}")
    if config.source == "files" and not config.paths:
        raise ConfigError("data.source='files' needs data.paths: a list of text, .jsonl or .bin files or folders")
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
    _check_max_bytes(config.max_bytes)


def _check_max_bytes(max_bytes: Optional[int]) -> None:
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"data.max_bytes={max_bytes} must be > 0 (or None for no cap)")


def _read_training_corpus(config: DataConfig) -> _Corpus:
    if config.source == "stdlib":
        documents = [
            _Document(relative, data, f"stdlib:{relative}") for relative, data in stdlib_documents(config.max_bytes)
        ]
        root = sysconfig.get_paths()["stdlib"]
        return _Corpus(documents, [], f"the Python standard library at {root}")
    return _read_files_corpus(config.paths, config)


def _read_files_corpus(paths: Iterable[str], config: DataConfig) -> _Corpus:
    text_files: list[_DataFile] = []
    streams: list[_TokenStream] = []
    for file in _expand_paths(paths):
        if file.path.suffix == ".bin":
            streams.append(_TokenStream(_open_token_file(file.path, config.token_dtype), str(file.path)))
        else:
            text_files.append(file)
    documents = list(_take_up_to(_iter_text_documents(text_files, config.text_key), config.max_bytes))
    return _Corpus(documents, streams, "paths " + ", ".join(str(p) for p in paths))


def _expand_paths(paths: Iterable[str]) -> list[_DataFile]:
    """The files to read for ``paths``; raises for the first bad one."""
    files: list[_DataFile] = []
    for entry in paths:
        files.extend(file for file in _entry_files(entry, _raise) if _keep_file(file))
    return files


def _raise(error: Exception) -> None:
    raise error


def _entry_files(entry: str, on_error: Callable[[Exception], None]) -> list[_DataFile]:
    """The file ``entry`` names, or every file under the folder it names (recursed, sorted).

    Errors go to ``on_error`` so that the pre-flight can collect them all; the files are
    not checked here (see :func:`_keep_file`).
    """
    path = Path(entry).expanduser()
    try:
        mode = _stat(path).st_mode
    except (OSError, ValueError) as error:
        on_error(error)
        return []
    if not stat.S_ISDIR(mode):
        return [_DataFile(path.name, path, named=True)]

    def folder_error(error: OSError) -> None:
        on_error(_unreadable(Path(error.filename), error, "folder"))

    # Like Path.rglob: symlinked folders are listed but not entered, so no walk can loop.
    found = [Path(folder) / name for folder, _, names in os.walk(path, onerror=folder_error) for name in names]
    return [_DataFile(p.relative_to(path).as_posix(), p, named=False) for p in sorted(found)]


def _keep_file(file: _DataFile) -> bool:
    """Whether to read ``file``; raises when it is missing, unreadable, special or named and empty.

    Only stats the file: a FIFO would block an open forever.
    """
    info = _stat(file.path)
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _SPECIAL_FILE_KINDS if test(info.st_mode)), "special file")
        raise ConfigError(
            f"data path {file.path} is not a regular file but a {kind}; "
            "data paths must be text, .jsonl or .bin files or folders of them"
        )
    if info.st_size == 0:
        if file.named:
            raise ConfigError(f"data file {file.path} is empty (0 bytes)")
        return False  # folders often hold empty files such as __init__.py
    return True


def _stat(path: Path) -> os.stat_result:
    """``os.stat`` whose errors name ``path`` and tell a missing path from an unreadable one."""
    try:
        return os.stat(path)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise _unreadable(path, error) from None
    if os.path.islink(path):
        raise FileNotFoundError(f"data path {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    raise FileNotFoundError(f"data path {path} does not exist")


def _unreadable(path: Path, error: OSError, kind: str = "file") -> ConfigError:
    return ConfigError(f"cannot read data {kind} {path}: {error.strerror or error}")


def _probe_file(file: _DataFile, config: DataConfig) -> None:
    """Raises for what a prefix of ``file`` shows: unreadable, a wrong .bin dtype, a blank .jsonl."""
    is_jsonl = file.path.suffix == ".jsonl"
    try:
        with open(file.path, "rb") as handle:
            head = handle.read(_PROBE_BYTES if is_jsonl else 1)
    except OSError as error:
        raise _unreadable(file.path, error) from None
    if file.path.suffix == ".bin" and config.token_dtype in VALID_TOKEN_DTYPES:
        _open_token_file(file.path, config.token_dtype)
    # A shorter read than asked for is the whole file.
    if is_jsonl and file.named and len(head) < _PROBE_BYTES and not head.decode("utf-8", "replace").strip():
        raise ConfigError(_no_records_message(file.path))


def _no_records_message(path: Path) -> str:
    return f"data file {path} holds no .jsonl records (only blank lines)"


def _iter_text_documents(files: list[_DataFile], text_key: str) -> Iterator[_Document]:
    # A generator, so that reading stops at the max_bytes cap instead of reading every file.
    for file in files:
        if file.path.suffix == ".jsonl":
            yield from _iter_jsonl_documents(file, text_key)
        else:
            data = _read_bytes(file.path)
            # Invalid UTF-8 becomes U+FFFD, so every document is valid text.
            yield _Document(file.key, data.decode("utf-8", errors="replace").encode("utf-8"), str(file.path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise _unreadable(path, error) from None


def _iter_jsonl_documents(file: _DataFile, text_key: str) -> Iterator[_Document]:
    path, records = file.path, 0
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    records += 1
                    text = _jsonl_text(path, line_number, line, text_key)
                    yield _Document(f"{file.key}:{line_number}", text.encode("utf-8"), f"{path} line {line_number}")
    except OSError as error:
        raise _unreadable(path, error) from None
    if not records and file.named:
        raise ConfigError(_no_records_message(path))


def _jsonl_text(path: Path, line_number: int, line: str, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} line {line_number} is not valid JSON: {error.msg}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} line {line_number} is a JSON {type(record).__name__}, not an object")
    if text_key not in record:
        raise ConfigError(
            f"{path} line {line_number} has no field {text_key!r} (data.text_key); fields there: {sorted(record)}"
        )
    text = record[text_key]
    if not isinstance(text, str):
        raise ConfigError(f"{path} line {line_number}: field {text_key!r} is a {type(text).__name__}, not a string")
    return text


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
    size = _stat(path).st_size
    if size % dtype.itemsize:
        raise ConfigError(
            f"{path} has {size} bytes, not a multiple of {dtype.itemsize} bytes per {token_dtype} token: "
            f"is data.token_dtype={token_dtype!r} the dtype it was written with?"
        )
    if size == 0:
        return np.empty(0, dtype=dtype)  # np.memmap cannot map an empty file
    try:
        tokens = np.memmap(path, dtype=dtype, mode="r")
    except OSError as error:
        raise _unreadable(path, error) from None
    _check_not_uint32_as_uint16(tokens, path)
    return tokens


def _check_not_uint32_as_uint16(tokens: np.ndarray, path: Path) -> None:
    """Raises when uint16 ``tokens`` look like uint32 ids read with the wrong dtype.

    Read as uint16, a little-endian uint32 id is its low half then its high half, and the
    high half is 0 for every id below 65536: so every odd element would be 0.
    """
    if tokens.dtype != np.uint16 or len(tokens) < _DTYPE_SCAN_MIN_ELEMENTS or len(tokens) % 2:
        return
    head = np.asarray(tokens[:_DTYPE_SCAN_ELEMENTS])
    if head[1::2].any() or not head[0::2].any():
        return
    raise ConfigError(
        f"{path} looks like uint32 tokens read as data.token_dtype='uint16': all {len(head) // 2} "
        f"odd-position elements of its first {len(head)} are 0, as the high halves of uint32 ids below "
        "65536 are; set data.token_dtype=uint32 if it was written as uint32"
    )


# ----------------------------------------------------------------------------- checks


def _check_not_empty(corpus: _Corpus) -> None:
    if not corpus.documents and not any(len(stream.tokens) for stream in corpus.streams):
        raise ConfigError(f"empty corpus: no documents and zero tokens found in {corpus.description}")


def _check_token_ids(corpus: _Corpus, vocab_size: int) -> None:
    tokenizer = ByteTokenizer()
    if corpus.documents and vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"{corpus.documents[0].origin} is text: byte tokens reach id {tokenizer.eos_id} (eos), "
            f"but vocab_size={vocab_size}; it needs vocab_size >= {tokenizer.vocab_size}"
        )
    for stream in corpus.streams:
        largest = _chunked_max(stream.tokens)
        if largest is not None and largest >= vocab_size:
            raise ConfigError(
                f"{stream.origin} holds token id {largest} (its max), not below vocab_size={vocab_size}"
                + _dtype_hint(stream.tokens.dtype, largest)
            )


def _dtype_hint(dtype: np.dtype, largest: int) -> str:
    # Read as uint32, a uint16 file pairs up its ids: the second of each pair lands in the high half.
    if dtype == np.uint32 and largest > np.iinfo(np.uint16).max:
        return (
            "; ids this large are what a file written as uint16 gives when read as uint32: "
            "is data.token_dtype=uint32 the dtype it was written with?"
        )
    return ""


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
        raise ConfigError(
            f"{origin} has {len(tokens)} tokens: too few to split into validation ({val_len} tokens) and "
            f"training (at least seq_len+1 = {window} tokens); add data, lower data.seq_len or set data.val_paths"
        )
    return tokens[:-val_len], tokens[-val_len:]
