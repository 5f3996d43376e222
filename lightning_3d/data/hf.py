"""``data.source=hf``: local jsonl / json / parquet / arrow files read through Hugging Face ``datasets``,
tokenized once into a cache of token files, then served like ``.bin`` files.

The cache of a list of paths is a folder of shards with sidecars (written by
:func:`lightning_3d.data.shards.prepare`) under ``data.cache_dir``, named by a fingerprint
of the input files (path, size, modification time), ``data.text_key`` and the tokenizer:
a changed input or tokenizer makes a new cache, an unchanged one is reused. Under a Trainer
it is built in ``prepare_data`` by one process per node while the others wait; a folder
appears only once whole (built aside, then renamed), so racing builders cannot mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable, Optional

from lightning_3d.config import DataConfig
from lightning_3d.data.paths import DataFile, entry_files, expand_paths, keep_file
from lightning_3d.data.shards import DATASET_READERS, prepare
from lightning_3d.data.tokenizer import Tokenizer, load_tokenizer
from lightning_3d.errors import ConfigError

DEFAULT_CACHE_DIR = "~/.cache/lightning_3d/tokens"
# Suffixes taken from folders and globs: a plain .json there is more often metadata
# (a saved dataset's dataset_info.json, state.json) than data, so it must be named.
_FOLDER_SUFFIXES = (".jsonl", ".parquet", ".arrow")
_CACHE_VERSION = 1
_MANIFEST = "manifest.json"


def input_files(paths: Iterable[str]) -> list[DataFile]:
    """The dataset files of ``paths``, in order; raises for a bad one or a folder / glob with none."""
    paths = list(paths)
    files = [file for file in expand_paths(paths) if _is_input(file)]
    for file in files:
        if file.named and file.path.suffix not in DATASET_READERS:
            raise ConfigError(_suffix_message(file.path))
    if not files:
        raise ConfigError(f"no {', '.join(_FOLDER_SUFFIXES)} file found in data paths {', '.join(paths)}")
    return files


def _is_input(file: DataFile) -> bool:
    return file.named or file.path.suffix in _FOLDER_SUFFIXES


def _suffix_message(path: Path) -> str:
    return f"data.source=hf reads {', '.join(DATASET_READERS)} files, not {path} (use data.source=files for text and .bin files)"


def cache_folder(files: list[DataFile], config: DataConfig, tokenizer: Tokenizer) -> Path:
    """Where the token cache of ``files`` lives: named by what its tokens depend on."""
    inputs = []
    for file in files:
        info = file.path.stat()
        inputs.append([str(file.path.resolve()), info.st_size, info.st_mtime_ns])
    key = json.dumps([_CACHE_VERSION, inputs, config.text_key, tokenizer.fingerprint])
    root = Path(config.cache_dir or DEFAULT_CACHE_DIR).expanduser()
    return root / hashlib.sha256(key.encode("utf-8")).hexdigest()[:24]


def build_cache(paths: Iterable[str], config: DataConfig, tokenizer: Optional[Tokenizer] = None) -> Path:
    """The token cache of ``paths``, tokenized now unless it already exists."""
    tokenizer = tokenizer or load_tokenizer(config.tokenizer, config.eos_token)
    files = input_files(paths)
    folder = cache_folder(files, config, tokenizer)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    aside = folder.with_name(f".{folder.name}.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    try:
        shards = prepare([file.path for file in files], aside, config.tokenizer, config.eos_token, config.text_key)
        manifest = {"inputs": [str(file.path) for file in files], "text_key": config.text_key, "tokenizer": tokenizer.name}
        manifest["shards"] = [shard.name for shard in shards]
        (aside / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(aside, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # another process finished the same cache first: its tokens are the same
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    return folder


def token_files(paths: Iterable[str], config: DataConfig, tokenizer: Tokenizer) -> list[Path]:
    """The shards of the token cache of ``paths`` in order, building it first if needed."""
    folder = build_cache(paths, config, tokenizer)
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        return [folder / name for name in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"the token cache {folder} is damaged ({error}); delete it to tokenize again") from None


def file_problems(config: DataConfig) -> list[str]:
    """What a glance at each file shows (the pre-flight): missing, special, empty, a suffix
    ``datasets`` does not read, or a parquet / arrow schema without ``data.text_key``."""
    problems: list[str] = []
    try:
        import datasets  # noqa: F401
    except ImportError:
        problems.append("data.source=hf needs the datasets package: pip install 'lightning-3d[hf]'")
    for entry in [*config.paths, *config.val_paths]:
        found = entry_files(entry, lambda error: problems.append(str(error)))
        files = [file for file in found if _is_input(file)]
        if found and not files:
            problems.append(f"no {', '.join(_FOLDER_SUFFIXES)} file found in data path {entry}")
        for file in files:
            try:
                if not keep_file(file):
                    continue
                if file.path.suffix not in DATASET_READERS:
                    raise ConfigError(_suffix_message(file.path))
                _check_schema(file.path, config.text_key)
            except (OSError, ValueError) as error:
                problems.append(str(error))
    return problems


def _check_schema(path: Path, text_key: str) -> None:
    """Raises when a parquet or arrow file's schema (read from its header or footer) has no ``text_key`` column."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return  # said above: no datasets, hence no pyarrow
    try:
        if path.suffix == ".parquet":
            names = pyarrow.parquet.read_schema(path).names
        elif path.suffix == ".arrow":
            with pyarrow.memory_map(str(path)) as source:
                names = pyarrow.ipc.open_stream(source).schema.names
        else:
            return
    except (OSError, pyarrow.ArrowException) as error:
        raise ConfigError(f"cannot read the schema of {path}: {error}") from None
    if text_key not in names:
        raise ConfigError(f"{path} has no column {text_key!r} (data.text_key); its columns: {names}")
