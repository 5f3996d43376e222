"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), readable under any layout.

One checkpoint is a folder ``step-<N>``:

- ``__<rank>_<i>.distcp``: DCP shards of the model and optimizer states (each rank writes its own);
- ``trainer_state.pt``: the rest of Lightning's checkpoint dict (loops, LR schedulers,
  callbacks, data position, hyper-parameters, the layout that wrote it) — plain data;
- ``rng/rank-<k>.pt``: the RNG states of rank ``k``;
- ``.metadata``: DCP's index, written last and atomically (temp file + rename) once every
  rank has written its shards. A folder counts as a checkpoint only when it exists.

Tensors are stored under layout-independent names: the parameter's name in the unsplit
model (pipeline stages drop their index in the stage list) with its global shape. DCP
reads back whatever slice each rank of the new layout owns, so a checkpoint written by
any mesh loads into any other.

Loading never unpickles arbitrary objects: the metadata goes through an allow-listed
unpickler, non-tensor values and ``trainer_state.pt`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from lightning_3d.errors import ConfigError

STEP_PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"
RNG_DIR = "rng"
DCP_METADATA = ".metadata"
MODEL_KEY = "state_dict"  # Lightning's name for the model's entry in a checkpoint dict


def is_complete(path: str | Path) -> bool:
    """True when DCP's metadata (written last) and the trainer state are both there."""
    path = Path(path)
    return (path / DCP_METADATA).is_file() and (path / TRAINER_STATE).is_file()


def complete_checkpoints(directory: str | Path) -> list[Path]:
    """The complete ``step-<N>`` folders of ``directory``, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = re.fullmatch(rf"{STEP_PREFIX}(\d+)", child.name)
        if match and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: Optional[str], directory: str | Path) -> Optional[str]:
    """``resume`` as a checkpoint folder: ``auto`` is the latest complete one in ``directory``
    (None when there is none: a fresh start); a path must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(directory)
        return str(found[-1]) if found else None
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such checkpoint folder")
    if not path.is_dir() or not (path / DCP_METADATA).is_file():
        raise ConfigError(
            f"resume={resume} is not a checkpoint: a checkpoint is a folder {STEP_PREFIX}<N> holding "
            f"{DCP_METADATA} (written last; missing after an interrupted save)"
        )
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"resume={resume}: the checkpoint has no {TRAINER_STATE}; it was not written by lightning_3d")
    return str(path)


# ----------------------------------------------------------------------------- names

def canonical_names(state: Mapping[str, Any], root: str, pipelined: bool) -> dict[str, Any]:
    """Rename ``<root>.<stage index>.x`` to ``<root>.x``: under pipeline parallel the root is a
    list of this rank's stages, and each stage keeps the unsplit model's names below it.
    Works for model keys and for flattened optimizer keys (``state.<fqn>.exp_avg``)."""
    if not pipelined:
        return dict(state)
    pattern = re.compile(rf"(^|\.){re.escape(root)}\.\d+\.")
    renamed = {pattern.sub(rf"\g<1>{root}.", key, count=1): value for key, value in state.items()}
    if len(renamed) != len(state):
        raise ConfigError(f"pipeline stages under {root!r} share parameter names; each stage must own distinct parameters")
    return renamed


def local_names(canonical: Mapping[str, Any], local_keys: Iterable[str], root: str, pipelined: bool) -> dict[str, Any]:
    """Inverse of :func:`canonical_names` for the keys this rank has."""
    keys = list(local_keys)
    mapping = dict(zip(canonical_names(dict.fromkeys(keys), root, pipelined), keys))
    return {mapping[key]: value for key, value in canonical.items()}


# ----------------------------------------------------------------------------- safe reading

def _is_torch_dtype(module: str, name: str) -> bool:
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # looks a tensor layout up by name
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's metadata is a pickle: allow its own classes and plain values, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint.") or (module, name) in _ALLOWED_GLOBALS or _is_torch_dtype(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


def read_metadata(path: str | Path) -> Metadata:
    path = Path(path)
    try:
        with open(path / DCP_METADATA, "rb") as handle:
            return _MetadataUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
        raise ConfigError(f"checkpoint {path}: unreadable {DCP_METADATA} ({error})") from error


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata goes through the allow-listed unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor values (e.g. optimizer hyper-parameters) are read with ``weights_only=True``."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        plain = torch.load(value, weights_only=True)  # raises on anything but plain data
        buffer = io.BytesIO()
        torch.save(plain, buffer)
        buffer.seek(0)
        super().load_bytes(read_item, buffer)


def check_shards(path: str | Path, metadata: Metadata) -> None:
    """Every shard file is there and long enough for the index: catches truncated copies."""
    path = Path(path)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise ConfigError(f"checkpoint {path}: shard {name} is missing")
        actual = file.stat().st_size
        if actual < size:
            raise ConfigError(f"checkpoint {path}: shard {name} is truncated: {actual} bytes, the index needs {size}")


def fit_problems(path: str | Path, expected: Mapping[str, Iterable[int]], prefix: str = MODEL_KEY) -> list[str]:
    """Why checkpoint ``path`` cannot be loaded into a model with these full parameter shapes
    (first mismatch first); empty when it can. Reads only the metadata and file sizes."""
    path = Path(path)
    if not is_complete(path):
        return [f"{path} is not a complete checkpoint (no {DCP_METADATA} or {TRAINER_STATE})"]
    try:
        metadata = read_metadata(path)
        check_shards(path, metadata)
    except ValueError as error:
        return [str(error)]
    saved = {
        key[len(prefix) + 1 :]: tuple(item.size)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix + ".") and isinstance(item, TensorStorageMetadata)
    }
    problems = []
    for name, shape in expected.items():
        shape = tuple(shape)
        if name not in saved:
            problems.append(f"parameter {name} (shape {shape}) is not in the checkpoint")
        elif saved[name] != shape:
            problems.append(f"parameter {name} has shape {saved[name]} in the checkpoint but {shape} in the model")
    unexpected = sorted(set(saved) - set(expected))
    if unexpected:
        problems.append(f"the checkpoint has parameters the model lacks: {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
    return problems


def raise_if_problems(what: str, problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{what}: {problems[0]}{more}")


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path) / TRAINER_STATE, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which
        raise ConfigError(f"checkpoint {path}: cannot read {TRAINER_STATE} ({type(error).__name__}: {error})") from error


def write_atomically(obj: Any, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(target)


def remove_folder(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(path: str | Path, rank: int) -> Path:
    return Path(path) / RNG_DIR / f"rank-{rank}.pt"


# ----------------------------------------------------------------------------- consolidated weights

def load_model_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full model tensors of a checkpoint (names relative to the model root) and its trainer
    state, on one process without any process group."""
    path = Path(path)
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint (no {DCP_METADATA} or {TRAINER_STATE})")
    trainer_state = load_trainer_state(path)
    metadata = read_metadata(path)
    check_shards(path, metadata)
    prefix = f"{MODEL_KEY}.{trainer_state.get('model_root', 'model')}."
    state = {
        key: torch.empty(tuple(item.size), dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
    }
    dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(), no_dist=True)
    return {key[len(prefix) :]: tensor for key, tensor in state.items()}, trainer_state


class SafetensorsWeights:
    """Named tensors of one ``.safetensors`` file or of every such file in a folder, read on demand."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
        elif path.is_file():
            files = [path]
        else:
            raise ConfigError(f"model.init_from={path}: no such file or folder")
        if not files:
            raise ConfigError(f"model.init_from={path}: the folder holds no .safetensors file")
        self.path = path
        self._file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for file in files:
            try:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():
                        self._file_of[name] = file
                        self.shapes[name] = tuple(handle.get_slice(name).get_shape())
            except Exception as error:  # safetensors raises its own error types for bad headers
                raise ConfigError(f"model.init_from: cannot read {file} ({error})") from error

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file_of[name], framework="pt") as handle:
            return handle.get_tensor(name)
