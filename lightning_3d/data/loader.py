"""A DataLoader whose workers' data errors reach the training loop as the one-line error they raised."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader

from lightning_3d.errors import ConfigError

# How a ConfigError's last traceback line starts, as traceback.format_exception writes it.
_CONFIG_ERROR_LINE = f"{ConfigError.__module__}.{ConfigError.__qualname__}: "


class TokenLoader(DataLoader):
    """A :class:`DataLoader` that re-raises a worker's :class:`ConfigError` with the worker's own message.

    torch re-raises an exception from a worker process as a new one of the same type
    whose message is ``Caught ... in DataLoader worker process N`` followed by the
    worker's traceback; the message a user needs (which file, which offset) is the last
    line, and the fault reports (which keep one line) would lose it.
    """

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except ConfigError as error:
                text = str(error)
                if not text.startswith("Caught ") or _CONFIG_ERROR_LINE not in text:
                    raise
                message = text.rpartition(_CONFIG_ERROR_LINE)[2].strip()
                raise ConfigError(message) from None
            yield batch
