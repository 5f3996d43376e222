"""Text documents read into memory: the standard library's ``.py`` files, text files, ``.jsonl`` records.

For small corpora and first runs: every process reads and tokenizes them at startup. A large
text corpus is tokenized once instead, by ``python -m lightning_3d.data.prepare`` or
``data.source=hf``, and read from token files.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

from lightning_3d.data.paths import DataFile, unreadable
from lightning_3d.errors import ConfigError

# Directories of the stdlib folder that hold installed third-party packages, not the stdlib.
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


@dataclass
class Document:
    key: str  # stable name hashed by the split: a path relative to its root (plus ":line")
    data: bytes  # UTF-8 text
    origin: str  # file to name in error messages


def check_max_bytes(max_bytes: Optional[int]) -> None:
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"data.max_bytes={max_bytes} must be > 0 (or None for no cap)")


def stdlib_documents(max_bytes: Optional[int]) -> list[tuple[str, bytes]]:
    """The running interpreter's standard library ``.py`` files as ``(relative path, bytes)``.

    Sorted by relative path so every process sees the same order; third-party packages
    installed inside the stdlib folder are left out. Reading stops once ``max_bytes`` bytes
    are collected (the last file is cut short); ``None`` reads everything.
    """
    check_max_bytes(max_bytes)
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

    def read_all() -> Iterator[Document]:
        for relative in relative_paths:
            full_path = os.path.join(root, relative)
            with open(full_path, "rb") as file:
                yield Document(relative, file.read(), full_path)

    return [(doc.key, doc.data) for doc in take_up_to(read_all(), max_bytes)]


def no_records_message(path: Path) -> str:
    return f"data file {path} holds no .jsonl records (only blank lines)"


def iter_text_documents(files: list[DataFile], text_key: str) -> Iterator[Document]:
    # A generator, so that reading stops at the max_bytes cap instead of reading every file.
    for file in files:
        if file.path.suffix == ".jsonl":
            yield from _iter_jsonl_documents(file, text_key)
        else:
            data = _read_bytes(file.path)
            # Invalid UTF-8 becomes U+FFFD, so every document is valid text.
            yield Document(file.key, data.decode("utf-8", errors="replace").encode("utf-8"), str(file.path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise unreadable(path, error) from None


def _iter_jsonl_documents(file: DataFile, text_key: str) -> Iterator[Document]:
    path, records = file.path, 0
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    records += 1
                    text = _jsonl_text(path, line_number, line, text_key)
                    yield Document(f"{file.key}:{line_number}", text.encode("utf-8"), f"{path} line {line_number}")
    except OSError as error:
        raise unreadable(path, error) from None
    if not records and file.named:
        raise ConfigError(no_records_message(path))


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


def take_up_to(documents: Iterable[Document], max_bytes: Optional[int]) -> Iterator[Document]:
    """Non-empty documents until ``max_bytes`` bytes are taken; the last one is cut to fit."""
    taken = 0
    for doc in documents:
        if not doc.data:
            continue  # an empty file would add a lone eos and count as a document
        if max_bytes is not None:
            room = max_bytes - taken
            if len(doc.data) >= room:
                yield Document(doc.key, doc.data[:room], doc.origin)
                return
        taken += len(doc.data)
        yield doc
