"""One global sample order, cut into global batches, each shared out among data-parallel ranks.

The rule this project rests on: the sequences of global batch ``g`` are the same whatever
the number of data-parallel ranks, so a run on 1 GPU and on 8 GPUs sees the same data in
the same optimizer steps (and can resume from each other's checkpoints).
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

from lightning_3d.data.permutation import Permutation
from lightning_3d.errors import ConfigError


class GlobalOrderSampler(DistributedSampler):
    """Indices of this rank's share of global batches ``start_batch, start_batch+1, ...``.

    The global order is a random permutation of ``range(dataset_len)`` fixed by ``(seed, epoch)``
    (identity when ``shuffle`` is False), computed batch by batch (:class:`Permutation`), so
    neither memory nor time per batch grows with the corpus. Global batch ``g`` is
    ``order[g*global_batch : (g+1)*global_batch]`` and rank ``r`` of ``R`` gets its contiguous
    slice ``[r*global_batch/R, (r+1)*global_batch/R)``. A DataLoader with
    ``batch_size=global_batch // num_replicas`` and ``drop_last=True`` therefore yields exactly
    this rank's part of each global batch. An incomplete last global batch is dropped.

    It subclasses :class:`DistributedSampler` only so that Lightning keeps it rather than
    putting its own distributed sampler in its place; none of the parent's logic is used.

    Resuming: :meth:`resume_at` makes epoch ``e`` start at global batch ``b``. The length
    stays the whole epoch's, because Lightning restores its own count of the batches
    already done in the epoch and stops after ``len`` batches in all.
    """

    def __init__(
        self,
        dataset_len: int,
        global_batch: int,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        max_batches: Optional[int] = None,
        *,
        name: str = "dataset",
        seq_len: Optional[int] = None,
    ) -> None:
        if num_replicas <= 0:
            raise ConfigError(f"num_replicas={num_replicas} must be > 0")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"rank={rank} must be in [0, {num_replicas - 1}] for num_replicas={num_replicas}")
        if global_batch <= 0:
            raise ConfigError(f"global_batch={global_batch} must be > 0")
        if global_batch % num_replicas:
            raise ConfigError(
                f"global batch {global_batch} is not divisible by the {num_replicas} data-parallel ranks"
            )
        if max_batches is not None and max_batches <= 0:
            raise ConfigError(f"max_batches={max_batches} must be > 0 (or None for no cap)")
        if dataset_len < global_batch:
            of_seq_len = f" of seq_len {seq_len}" if seq_len is not None else ""
            raise ConfigError(
                f"the {name} split has {dataset_len} sequences{of_seq_len}, "
                f"fewer than one global batch of {global_batch}"
            )
        # Set before the parent's __init__, which reads num_samples (our property, from these).
        self.dataset_len = dataset_len
        self.global_batch = global_batch
        self.per_rank_batch = global_batch // num_replicas
        self.max_batches = max_batches
        self.resume_epoch, self.resume_batch = 0, 0
        self.name = name
        # range() stands in for the dataset: the parent only needs its length.
        super().__init__(range(dataset_len), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)

    def resume_at(self, epoch: int, batch: int) -> None:
        """Start epoch ``epoch`` at global batch ``batch`` (the batches before it were trained on)."""
        if epoch < 0 or batch < 0:
            raise ConfigError(f"cannot resume at epoch {epoch}, batch {batch}: both must be >= 0")
        self.resume_epoch, self.resume_batch = epoch, batch

    @property
    def start_batch(self) -> int:
        """First global batch of the current epoch."""
        return self.resume_batch if self.epoch == self.resume_epoch else 0

    @property
    def num_global_batches(self) -> int:
        """Complete global batches per epoch (after the ``max_batches`` cap)."""
        complete = self.dataset_len // self.global_batch
        return complete if self.max_batches is None else min(complete, self.max_batches)

    # The parent assigns these in its __init__; as properties they follow max_batches, and the
    # parent's assignments are ignored.
    @property
    def num_samples(self) -> int:
        return len(self)

    @num_samples.setter
    def num_samples(self, _value: int) -> None:
        pass

    @property
    def total_size(self) -> int:
        return len(self) * self.num_replicas

    @total_size.setter
    def total_size(self, _value: int) -> None:
        pass

    def order_at(self, positions: np.ndarray) -> np.ndarray:
        """The sample indices at ``positions`` of the epoch's global order, identical on every rank."""
        if not self.shuffle:
            return np.asarray(positions, dtype=np.int64)
        return Permutation(self.dataset_len, (self.seed, self.epoch))(positions)

    def global_order(self) -> torch.Tensor:
        """The epoch's whole order (built in full: to inspect it, not to train)."""
        return torch.from_numpy(self.order_at(np.arange(self.dataset_len)))

    def __iter__(self) -> Iterator[int]:
        first = self.rank * self.per_rank_batch
        for batch in range(self.start_batch, self.num_global_batches):
            start = batch * self.global_batch + first
            yield from self.order_at(np.arange(start, start + self.per_rank_batch)).tolist()

    def __len__(self) -> int:
        return self.num_global_batches * self.per_rank_batch
