"""Lightning data module: token splits, window datasets and global-order data loaders."""

from __future__ import annotations

from typing import Any, Optional

import lightning
import torch
from typing_extensions import override

from lightning_3d.config import DataConfig
from lightning_3d.data import hf
from lightning_3d.data.dataset import TokenWindowDataset
from lightning_3d.data.loader import TokenLoader
from lightning_3d.data.sampler import GlobalOrderSampler
from lightning_3d.data.sources import check_config, check_tokenizer_vocab, load_token_splits
from lightning_3d.data.token_stream import TokenStream
from lightning_3d.data.tokenizer import load_tokenizer
from lightning_3d.errors import ConfigError
from lightning_3d.validation import global_batch_problem


class TextDataModule(lightning.LightningDataModule):
    """Serves ``config.global_batch_size`` sequences per optimizer step, shared among DP ranks.

    One batch, in training and in validation alike, is one micro-batch:
    ``global_batch_size // accumulate_grad_batches`` sequences across all data-parallel
    ranks, ``per_rank_batch_size`` of them on this rank, so validation fits in memory
    wherever training does. Validation covers the first ``val_batches`` global batches'
    worth of samples, i.e. ``val_batches × accumulate_grad_batches`` micro-batches.
    The data-parallel size and rank come from the trainer's strategy
    (``distributed_sampler_kwargs``), so tensor/context/pipeline-parallel ranks of one
    data-parallel group get the same batch.

    Its checkpoint state is the data position in global samples (layout-independent): a
    resume on any number of data-parallel ranks continues at the same sample, with or
    without loader workers (``data.num_workers``; memory is pinned on CUDA).

    With ``data.source=hf`` the token cache is built in :meth:`prepare_data`, which Lightning
    runs on one process per node while the others wait.
    """

    def __init__(self, config: DataConfig, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.seed = seed
        self._splits: Optional[tuple[TokenStream, TokenStream]] = None
        self.train_dataset: Optional[TokenWindowDataset] = None
        self.val_dataset: Optional[TokenWindowDataset] = None
        self._resume_position: Optional[dict[str, int]] = None

    # ------------------------------------------------------------------ parallel layout

    def _sampler_kwargs(self) -> dict[str, Any]:
        # Only parallel strategies define distributed_sampler_kwargs; single-device ones have none.
        strategy = self.trainer.strategy if self.trainer is not None else None
        return getattr(strategy, "distributed_sampler_kwargs", None) or {}

    @property
    def dp_size(self) -> int:
        """Number of data-parallel ranks (1 without a trainer)."""
        return int(self._sampler_kwargs().get("num_replicas", 1))

    @property
    def dp_rank(self) -> int:
        """This process's data-parallel rank (0 without a trainer)."""
        return int(self._sampler_kwargs().get("rank", 0))

    @property
    def accumulate_grad_batches(self) -> int:
        return int(self.trainer.accumulate_grad_batches) if self.trainer is not None else 1

    @property
    def micro_batch_size(self) -> int:
        """Sequences in one data-loader batch summed over all data-parallel ranks."""
        self._check_batch_layout()
        return self.config.global_batch_size // self.accumulate_grad_batches

    @property
    def per_rank_batch_size(self) -> int:
        """Sequences in one data-loader batch on this rank."""
        return self.micro_batch_size // self.dp_size

    def _check_batch_layout(self) -> None:
        problem = global_batch_problem(self.config.global_batch_size, self.dp_size, self.accumulate_grad_batches)
        if problem:
            raise ConfigError(problem)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def prepare_data(self) -> None:
        """Tokenize the ``data.source=hf`` files into their cache, unless it is there already."""
        if self.config.source != "hf":
            return
        check_config(self.config)
        tokenizer = load_tokenizer(self.config.tokenizer, self.config.eos_token)
        check_tokenizer_vocab(tokenizer, self.vocab_size)
        for paths in (self.config.paths, self.config.val_paths):
            if paths:
                hf.build_cache(paths, self.config, tokenizer)

    def setup(self, stage: Optional[str] = None) -> None:
        self._check_batch_layout()
        if self._splits is None:
            self._splits = load_token_splits(self.config, self.vocab_size)
        train_tokens, val_tokens = self._splits
        seq_len, vocab = self.config.seq_len, self.vocab_size
        self.train_dataset = TokenWindowDataset(train_tokens, seq_len, name="train", vocab_size=vocab)
        self.val_dataset = TokenWindowDataset(val_tokens, seq_len, name="validation", vocab_size=vocab)

    def train_dataloader(self) -> TokenLoader:
        train_dataset, _ = self._datasets()
        loader = self._loader(train_dataset, self.micro_batch_size, shuffle=self.config.shuffle, max_batches=None)
        if self._resume_position is not None:
            samples = self._resume_position["samples_in_epoch"]
            if samples % self.micro_batch_size:
                raise ConfigError(
                    f"cannot resume at sample {samples} of the epoch with batches of {self.micro_batch_size} sequences "
                    f"(global_batch_size {self.config.global_batch_size} / accumulate_grad_batches {self.accumulate_grad_batches})"
                )
            loader.sampler.resume_at(self._resume_position["epoch"], samples // self.micro_batch_size)
        return loader

    @override
    def state_dict(self) -> dict[str, Any]:
        """Where the training data stands: the epoch and the global samples done in it."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {
            "epoch": self.trainer.current_epoch,
            "samples_in_epoch": done * self.micro_batch_size,
            "global_batch_size": self.config.global_batch_size,
            "seed": self.seed,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict["seed"] != self.seed:
            raise ConfigError(
                f"the checkpoint's data order comes from seed {state_dict['seed']}, this run has seed {self.seed}: "
                "the resumed run would not continue the same sample order"
            )
        self._resume_position = {"epoch": int(state_dict["epoch"]), "samples_in_epoch": int(state_dict["samples_in_epoch"])}

    def val_dataloader(self) -> TokenLoader:
        _, val_dataset = self._datasets()
        micro_batch, global_batch = self.micro_batch_size, self.config.global_batch_size
        if self.config.val_batches <= 0:
            raise ConfigError(
                f"data.val_batches={self.config.val_batches} must be > 0 (trainer.limit_val_batches=0 skips validation)"
            )
        # the validation set is whole global batches, whatever the accumulation
        whole = len(val_dataset) // global_batch
        if whole == 0:
            raise ConfigError(
                f"the {val_dataset.name} split has {len(val_dataset)} sequences of seq_len {self.config.seq_len}, "
                f"fewer than one global batch of {global_batch}"
            )
        batches = min(self.config.val_batches, whole) * self.accumulate_grad_batches
        # training-sized batches: accumulation was what made a training step fit in memory
        return self._loader(val_dataset, micro_batch, shuffle=False, max_batches=batches)

    # ------------------------------------------------------------------ helpers

    def _datasets(self) -> tuple[TokenWindowDataset, TokenWindowDataset]:
        # A loader asked for before setup() (outside a Trainer) sets up on demand.
        if self.train_dataset is None or self.val_dataset is None:
            self.setup()
        return self.train_dataset, self.val_dataset  # type: ignore[return-value]

    def _loader(self, dataset: TokenWindowDataset, global_batch: int, shuffle: bool, max_batches: Optional[int]) -> TokenLoader:
        sampler = GlobalOrderSampler(
            dataset_len=len(dataset),
            global_batch=global_batch,
            num_replicas=self.dp_size,
            rank=self.dp_rank,
            shuffle=shuffle,
            seed=self.seed,
            max_batches=max_batches,
            name=dataset.name,
            seq_len=self.config.seq_len,
        )
        workers = self.config.num_workers
        return TokenLoader(
            dataset,
            batch_size=global_batch // self.dp_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._on_cuda(),
        )

    def _on_cuda(self) -> bool:
        strategy = self.trainer.strategy if self.trainer is not None else None
        device = getattr(strategy, "root_device", None)
        return isinstance(device, torch.device) and device.type == "cuda"
