"""From the entries of ``data.paths`` (files, folders, globs) to the files to read, checked by ``stat`` alone.

Nothing here opens a data file: a FIFO named by mistake would block an open forever, and
listing hundreds of files must not read them.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from lightning_3d.errors import ConfigError

# The metadata next to a token file ``x.bin``: ``x.bin.json``; it describes data, it is not data.
SIDECAR_SUFFIX = ".bin.json"
_GLOB_CHARACTERS = "*?["
_SPECIAL_FILE_KINDS = (
    (stat.S_ISFIFO, "named pipe (FIFO)"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


@dataclass
class DataFile:
    key: str  # what the split hashes: the path relative to its named folder or glob, or the file name
    path: Path
    named: bool  # named directly in data.paths / data.val_paths rather than found in a folder or by a glob


def expand_paths(paths: Iterable[str]) -> list[DataFile]:
    """The files to read for ``paths``, in order; raises for the first bad one."""
    files: list[DataFile] = []
    for entry in paths:
        files.extend(file for file in entry_files(entry, _raise) if keep_file(file))
    return files


def _raise(error: Exception) -> None:
    raise error


def entry_files(entry: str, on_error: Callable[[Exception], None]) -> list[DataFile]:
    """The file ``entry`` names, every file under the folder it names, or every file its glob matches (sorted).

    Errors go to ``on_error`` so that the pre-flight can collect them all; the files are
    not checked here (see :func:`keep_file`). Sidecars of token files are left out.
    """
    path = Path(entry).expanduser()
    if _has_glob(entry) and not os.path.lexists(path):
        return _glob_files(str(path), on_error)
    try:
        mode = stat_path(path).st_mode
    except (OSError, ValueError) as error:
        on_error(error)
        return []
    if not stat.S_ISDIR(mode):
        return [DataFile(path.name, path, named=True)]

    def folder_error(error: OSError) -> None:
        on_error(unreadable(Path(error.filename), error, "folder"))

    # Like Path.rglob: symlinked folders are listed but not entered, so no walk can loop.
    found = [Path(folder) / name for folder, _, names in os.walk(path, onerror=folder_error) for name in names]
    return [DataFile(p.relative_to(path).as_posix(), p, named=False) for p in sorted(found) if not is_sidecar(p)]


def _glob_files(pattern: str, on_error: Callable[[Exception], None]) -> list[DataFile]:
    # recursive: `**` matches folders at any depth, as in most data loaders
    matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True))
    files = [match for match in matches if not match.is_dir() and not is_sidecar(match)]
    if not files:
        on_error(ConfigError(f"data path {pattern} is a glob that matches no file"))
    # the key is the path below the glob's fixed folders, so the split does not depend on where the corpus lives
    fixed = []
    for part in Path(pattern).parts:
        if _has_glob(part):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    return [DataFile(_relative_key(match, root), match, named=False) for match in files]


def _relative_key(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _has_glob(text: str) -> bool:
    return any(char in text for char in _GLOB_CHARACTERS)


def is_sidecar(path: Path) -> bool:
    return path.name.endswith(SIDECAR_SUFFIX)


def keep_file(file: DataFile) -> bool:
    """Whether to read ``file``; raises when it is missing, unreadable, special or named and empty.

    Only stats the file: a FIFO would block an open forever.
    """
    info = stat_path(file.path)
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


def stat_path(path: Path) -> os.stat_result:
    """``os.stat`` whose errors name ``path`` and tell a missing path from an unreadable one."""
    try:
        return os.stat(path)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise unreadable(path, error) from None
    if os.path.islink(path):
        raise FileNotFoundError(f"data path {path} is a symbolic link to {os.readlink(path)}, which does not exist")
    raise FileNotFoundError(f"data path {path} does not exist")


def unreadable(path: Path, error: OSError, kind: str = "file") -> ConfigError:
    return ConfigError(f"cannot read data {kind} {path}: {error.strerror or error}")
