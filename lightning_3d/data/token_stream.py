"""Many token files read as one array through an index of offsets: nothing is concatenated in memory.

A :class:`TokenStream` is a sequence of segments — a range of a ``.bin`` file (memory-mapped
when first read) or of an in-memory array (text tokenized at startup) — that reads like one
1-D array: ``stream[a:b]`` copies just those tokens, from as many segments as the range
crosses. Processes that receive it (DataLoader workers started by spawn) open their own maps.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from lightning_3d.data.token_files import TokenFile

# Memory maps a process keeps open at once (each holds a file descriptor); more are reopened on demand.
_OPEN_MAPS = 128


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, stop)`` of ``source``: a token file or an in-memory array named ``origin``."""

    source: Union[TokenFile, np.ndarray]
    start: int
    stop: int
    origin: str

    @classmethod
    def of(cls, source: Union[TokenFile, np.ndarray], origin: Optional[str] = None) -> "Segment":
        """The whole of ``source``."""
        length = source.count if isinstance(source, TokenFile) else len(source)
        name = str(source.path) if isinstance(source, TokenFile) else (origin or "tokens")
        return cls(source, 0, length, name)

    def __len__(self) -> int:
        return self.stop - self.start

    def part(self, start: int, stop: int) -> "Segment":
        """Tokens ``[start, stop)`` of this segment (relative to it)."""
        return Segment(self.source, self.start + start, self.start + stop, self.origin)


class TokenStream:
    """The concatenation of ``segments``, read like a 1-D array without ever being built.

    ``len``, integer and slice indexing (slices copy; step 1 only), ``np.asarray`` (builds
    the whole array: for small data and tests), and :meth:`locate` (which file and offset a
    position is in) — what :class:`~lightning_3d.data.dataset.TokenWindowDataset` needs.
    """

    ndim = 1

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = [segment for segment in segments if len(segment)]
        lengths = np.array([len(segment) for segment in self.segments], dtype=np.int64)
        self._ends = np.cumsum(lengths)  # the index: segment i covers [ends[i-1], ends[i])
        dtypes = [segment.source.dtype for segment in self.segments]
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.uint16)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    @classmethod
    def of(cls, tokens: np.ndarray, origin: str = "tokens") -> "TokenStream":
        return cls([Segment.of(np.asarray(tokens), origin)])

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: Union[int, slice]) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError(f"a TokenStream slice must have step 1, not {step}")
            return self.read(start, max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} is out of range for {len(self)} tokens")
        return self.read(index, index + 1)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        tokens = self.read(0, len(self))
        return tokens if dtype is None else tokens.astype(dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of tokens ``[start, stop)``, read from every segment the range crosses."""
        parts = []
        position = start
        segment_index = int(np.searchsorted(self._ends, start, side="right"))
        while position < stop:
            begin = int(self._ends[segment_index - 1]) if segment_index else 0
            end = int(self._ends[segment_index])
            segment = self.segments[segment_index]
            tokens = self._tokens_of(segment_index)
            first = segment.start + position - begin
            last = segment.start + min(stop, end) - begin
            parts.append(np.asarray(tokens[first:last]))
            position = min(stop, end)
            segment_index += 1
        if not parts:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate(parts).astype(self.dtype, copy=False) if len(parts) > 1 else parts[0].astype(self.dtype)

    def locate(self, position: int) -> tuple[Segment, int]:
        """The segment holding token ``position`` and the token's offset in that segment's source."""
        segment_index = int(np.searchsorted(self._ends, position, side="right"))
        segment = self.segments[segment_index]
        begin = int(self._ends[segment_index - 1]) if segment_index else 0
        return segment, segment.start + position - begin

    def split(self, position: int) -> tuple["TokenStream", "TokenStream"]:
        """Tokens ``[0, position)`` and ``[position, len)`` as two streams over the same sources."""
        head: list[Segment] = []
        tail: list[Segment] = []
        begin = 0
        for segment in self.segments:
            cut = min(max(position - begin, 0), len(segment))
            head.append(segment.part(0, cut))
            tail.append(segment.part(cut, len(segment)))
            begin += len(segment)
        return TokenStream(head), TokenStream(tail)

    def _tokens_of(self, segment_index: int) -> np.ndarray:
        source = self.segments[segment_index].source
        if not isinstance(source, TokenFile):
            return source
        tokens = self._maps.get(segment_index)
        if tokens is None:
            tokens = self._maps[segment_index] = source.map()
            if len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(segment_index)
        return tokens

    def __getstate__(self) -> dict[str, Any]:
        # a pickled memory map would carry its data along; the receiving process maps the files itself
        return {**self.__dict__, "_maps": OrderedDict()}

    @staticmethod
    def concatenate(streams: Sequence["TokenStream"]) -> "TokenStream":
        return TokenStream([segment for stream in streams for segment in stream.segments])
