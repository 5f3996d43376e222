"""Pre-tokenized ``.bin`` files: their metadata sidecar, their checks, a memory map on demand.

A ``.bin`` file is a flat array of little-endian token ids, uint16 or uint32 (the format
Megatron, nanoGPT, litdata and torchtitan users already have). Nothing here reads a whole
file: the checks read its size, its sidecar ``<name>.bin.json`` (written by
``python -m lightning_3d.data.prepare``) and at most a bounded sample of its tokens, so
startup costs the same for a 40 MB corpus as for a 4 TB one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from lightning_3d.data.paths import stat_path, unreadable
from lightning_3d.errors import ConfigError

VALID_TOKEN_DTYPES = ("uint16", "uint32")
SIDECAR_FORMAT = "lightning_3d.tokens/1"
# Leading uint16 elements scanned for uint32 ids: enough to be sure, cheap on any file.
DTYPE_SCAN_ELEMENTS = 1 << 16
# Fewer elements than this could have all-zero odd positions by chance.
_DTYPE_SCAN_MIN_ELEMENTS = 64
# Tokens read from each end of a file without a sidecar to check its ids against the vocabulary at startup.
SAMPLE_TOKENS = 1 << 15


@dataclass(frozen=True)
class TokenFile:
    """One checked ``.bin`` file: where it is, its dtype and token count, and its max id when a sidecar gives it."""

    path: Path
    dtype: np.dtype
    count: int
    max_id: Optional[int] = None

    def map(self) -> np.ndarray:
        """A read-only memory map of the tokens (pages are read only when touched)."""
        if self.count == 0:
            return np.empty(0, dtype=self.dtype)  # np.memmap cannot map an empty file
        try:
            return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))
        except OSError as error:
            raise unreadable(self.path, error) from None


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")  # x.bin → x.bin.json (paths.SIDECAR_SUFFIX)


def open_token_file(path: Path, token_dtype: str) -> TokenFile:
    """``path`` checked by its size, its sidecar (whose dtype wins over ``token_dtype``) and a bounded prefix."""
    size = stat_path(path).st_size
    meta = read_sidecar(path)
    dtype = np.dtype(meta["dtype"] if meta else token_dtype)
    if size % dtype.itemsize:
        hint = (
            f"its sidecar {sidecar_path(path)} says {dtype.name}; was the file cut short?"
            if meta
            else f"is data.token_dtype={dtype.name!r} the dtype it was written with?"
        )
        raise ConfigError(f"{path} has {size} bytes, not a multiple of {dtype.itemsize} bytes per {dtype.name} token: {hint}")
    count = size // dtype.itemsize
    if meta is None:
        token_file = TokenFile(path, dtype, count)
        _check_not_uint32_as_uint16(token_file)
        return token_file
    if meta["tokens"] != count:
        raise ConfigError(
            f"{path} has {count} {dtype.name} tokens but its sidecar {sidecar_path(path)} says {meta['tokens']}: "
            "the file was cut short or changed after the sidecar was written"
        )
    return TokenFile(path, dtype, count, meta["max_id"])


def read_sidecar(path: Path) -> Optional[dict[str, Any]]:
    """The sidecar of token file ``path`` (checked), or None when there is none."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the sidecar {side} of {path}: {error}") from None
    problem = _sidecar_problem(meta)
    if problem:
        raise ConfigError(f"the sidecar {side} of {path} {problem}")
    return meta


def _sidecar_problem(meta: Any) -> Optional[str]:
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        return f"is not a {SIDECAR_FORMAT!r} sidecar (a JSON object with \"format\": {json.dumps(SIDECAR_FORMAT)})"
    if meta.get("dtype") not in VALID_TOKEN_DTYPES:
        return f"has dtype {meta.get('dtype')!r}, not one of {', '.join(VALID_TOKEN_DTYPES)}"
    if not isinstance(meta.get("tokens"), int) or meta["tokens"] < 0:
        return f"has tokens={meta.get('tokens')!r}, not a count"
    if meta.get("max_id") is not None and not isinstance(meta["max_id"], int):
        return f"has max_id={meta['max_id']!r}, not an integer or null"
    return None


def write_sidecar(path: Path, tokens: np.ndarray | int, dtype: np.dtype, max_id: Optional[int], **details: Any) -> Path:
    """Write the sidecar of token file ``path``: its dtype, token count and largest id (plus ``details``)."""
    count = tokens if isinstance(tokens, int) else len(tokens)
    meta = {"format": SIDECAR_FORMAT, "dtype": np.dtype(dtype).name, "tokens": int(count), "max_id": max_id, **details}
    side = sidecar_path(path)
    partial = side.with_name(side.name + ".partial")
    partial.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, side)  # a reader never sees half a sidecar
    return side


def _check_not_uint32_as_uint16(file: TokenFile) -> None:
    """Raises when a uint16 file looks like uint32 ids read with the wrong dtype.

    Read as uint16, a little-endian uint32 id is its low half then its high half, and the
    high half is 0 for every id below 65536: so every odd element would be 0.
    """
    if file.dtype != np.uint16 or file.count < _DTYPE_SCAN_MIN_ELEMENTS or file.count % 2:
        return
    head = _read(file, 0, DTYPE_SCAN_ELEMENTS)
    if head[1::2].any() or not head[0::2].any():
        return
    raise ConfigError(
        f"{file.path} looks like uint32 tokens read as data.token_dtype='uint16': all {len(head) // 2} "
        f"odd-position elements of its first {len(head)} are 0, as the high halves of uint32 ids below "
        "65536 are; set data.token_dtype=uint32 if it was written as uint32"
    )


def _read(file: TokenFile, start: int, count: int) -> np.ndarray:
    """``count`` tokens from ``start`` with one read, without mapping the file."""
    start = max(0, min(start, file.count))
    count = max(0, min(count, file.count - start))
    try:
        with open(file.path, "rb") as handle:
            handle.seek(start * file.dtype.itemsize)
            data = handle.read(count * file.dtype.itemsize)
    except OSError as error:
        raise unreadable(file.path, error) from None
    return np.frombuffer(data, dtype=file.dtype)


def check_ids_sample(file: TokenFile, vocab_size: int) -> None:
    """Raises when ``file`` holds an id ``>= vocab_size``: by its sidecar's max id, or else in a
    bounded sample (its first and last :data:`SAMPLE_TOKENS` tokens). Batches are checked as
    they are loaded, so an id the sample misses is still found before training on it."""
    if file.max_id is not None:
        if file.max_id >= vocab_size:
            raise ConfigError(
                f"{file.path} holds token id {file.max_id} (its max, from {sidecar_path(file.path)}), "
                f"not below vocab_size={vocab_size}" + dtype_hint(file.dtype, file.max_id)
            )
        return
    for start in sorted({0, max(0, file.count - SAMPLE_TOKENS)}):
        chunk = _read(file, start, SAMPLE_TOKENS)
        bad = np.flatnonzero(chunk >= vocab_size)
        if bad.size:
            raise ConfigError(bad_id_message(str(file.path), start + int(bad[0]), int(chunk[bad[0]]), vocab_size, file.dtype))


def bad_id_message(origin: str, offset: int, token_id: int, vocab_size: int, dtype: Optional[np.dtype]) -> str:
    """What to say about id ``token_id`` at token ``offset`` of ``origin`` (a file when ``dtype`` is given)."""
    byte = f" (byte {offset * np.dtype(dtype).itemsize})" if dtype is not None else ""
    return (
        f"{origin} holds token id {token_id} at token offset {offset}{byte}, not below vocab_size={vocab_size}"
        + (dtype_hint(dtype, token_id) if dtype is not None else "")
    )


def dtype_hint(dtype: np.dtype, token_id: int) -> str:
    # Read as uint32, a uint16 file pairs up its ids: the second of each pair lands in the high half.
    if np.dtype(dtype) == np.uint32 and token_id > np.iinfo(np.uint16).max:
        return (
            "; ids this large are what a file written as uint16 gives when read as uint32: "
            "is data.token_dtype=uint32 the dtype it was written with?"
        )
    return ""
