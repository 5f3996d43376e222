"""A seeded random permutation of ``range(n)`` evaluated at given positions, never built whole.

The shuffled order of a corpus of 50 M samples would take 400 MB per rank as an index array
(``torch.randperm``) and grow with the corpus; this computes ``order[positions]`` for one
batch at a time instead. It is a Feistel network — a bijection of ``[0, 4**k)`` with
``4**k >= n``, keyed by the seed — applied again while the result falls outside ``range(n)``
("cycle walking"), which keeps it a bijection of ``range(n)``. Memory and time per position
do not depend on ``n``.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

_ROUNDS = 6  # four make a pseudo-random permutation (Luby-Rackoff); two more for margin
_HALF_STEPS = (np.uint64(30), np.uint64(27), np.uint64(31))
_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


class Permutation:
    """Position → value of one random permutation of ``range(n)``, fixed by ``seed``."""

    def __init__(self, n: int, seed: Sequence[int]) -> None:
        if n <= 0:
            raise ValueError(f"a permutation of range({n}) needs n > 0")
        self.n = n
        self._half_bits = np.uint64(max(1, ((n - 1).bit_length() + 1) // 2))
        self._mask = np.uint64((1 << int(self._half_bits)) - 1)
        self._keys = np.random.SeedSequence([int(part) % (1 << 63) for part in seed]).generate_state(_ROUNDS, np.uint64)

    def __call__(self, positions: Union[Sequence[int], np.ndarray]) -> np.ndarray:
        """The values at ``positions`` (each in ``range(n)``), as int64."""
        values = np.array(positions, dtype=np.int64, ndmin=1)
        if values.size and (values.min() < 0 or values.max() >= self.n):
            raise IndexError(f"positions must be in range({self.n}), got [{values.min()}, {values.max()}]")
        values = self._feistel(values.astype(np.uint64))
        outside = values >= self.n
        while outside.any():  # a cycle of the larger permutation always comes back inside
            values[outside] = self._feistel(values[outside])
            outside = values >= self.n
        return values.astype(np.int64)

    def _feistel(self, values: np.ndarray) -> np.ndarray:
        left, right = values >> self._half_bits, values & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._mask)
        return (left << self._half_bits) | right


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every output bit depends on every input bit (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> _HALF_STEPS[0])) * _MULTIPLIERS[0]
        values = (values ^ (values >> _HALF_STEPS[1])) * _MULTIPLIERS[1]
    return values ^ (values >> _HALF_STEPS[2])
