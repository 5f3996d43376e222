"""Configuration dataclasses.

They are plain dataclasses usable from Python, and Hydra structured configs at the same
time: ``conf/config.yaml`` is validated against :class:`Config`, so a misspelt key or a
value of the wrong type is an error that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lightning_3d.errors import ConfigError


@dataclass
class ModelConfig:
    """Shape of the reference Llama-style decoder."""

    n_layers: int = 4
    dim: int = 64
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 512
    ffn_dim: Optional[int] = None  # None: derived from dim, ffn_dim_multiplier and multiple_of
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 16
    max_seq_len: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    init_std: float = 0.02
    # start from these weights instead of random ones: a .safetensors file or a folder of them,
    # as written by `python -m lightning_3d.export`, or a Hugging Face Llama checkpoint
    init_from: Optional[str] = None
    # a local Hugging Face model folder (config.json + safetensors) to fine-tune: the fields
    # above are then read from its config.json (model=hf, which sets source=hf)
    path: Optional[str] = None
    source: str = "reference"  # reference | hf

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size: Llama's 2/3 · 4 · dim rule, scaled and rounded up."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(self.ffn_dim_multiplier * int(2 * 4 * self.dim / 3))
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        problems = []
        for name in ("n_layers", "dim", "n_heads", "vocab_size", "max_seq_len", "multiple_of"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name}={getattr(self, name)} must be > 0")
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            problems.append(f"model.n_kv_heads={self.n_kv_heads} must be > 0")
        if self.n_heads > 0 and self.dim % self.n_heads:
            problems.append(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        elif self.n_heads > 0 and self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if self.n_heads > 0 and self.kv_heads > 0 and self.n_heads % self.kv_heads:
            problems.append(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))


@dataclass
class ParallelConfig:
    """Degrees of every parallelism and their options.

    The product ``pp · dp_replicate · dp_shard · cp · tp`` must equal the world size;
    ``dp_shard=-1`` takes whatever is left.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    # tensor parallel
    sequence_parallel: bool = True
    loss_parallel: bool = False
    # data parallel
    reshard_after_forward: Optional[bool] = None  # None: True, except under pipeline parallel
    # ZeRO stage by name, on FSDP2 (docs/parallelism.md): 3 = reshard after forward, 2 = keep gathered
    # parameters until backward, 1 = also keep gradients whole while accumulating; None: reshard_after_forward
    zero_stage: Optional[int] = None
    # pipeline parallel
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | looped_bfs | interleaved_zero_bubble | zbv | dualpipev
    microbatches: Optional[int] = None  # per optimizer (micro-)step on each rank; None: one per stage
    stages_per_rank: int = 1  # virtual stages per rank (2 for zbv / dualpipev, > 1 for interleaved / looped)
    pp_layers: Optional[list[list[int]]] = None  # explicit blocks of each stage; None: balanced split
    pp_embedding_weight: float = 1.0  # the embedding counts as this many blocks on the first stage
    pp_head_weight: float = 1.0  # the final norm + head count as this many blocks on the last stage
    # context parallel
    cp_backend: str = "ring"
    # collective timeouts: startup, checkpoint loading and the first step may legitimately be slow;
    # after the first step a collective that waits this long means a dead or stalled rank
    init_timeout_s: float = 1800.0
    timeout_s: float = 600.0


@dataclass
class PerfConfig:
    """Speed levers and what each step measures; each lever trades something (see README, "Speed levers")."""

    # activation checkpointing: none | full (every block) | selective (every `ac_every`-th block) |
    # op (every block, but matmul, attention and collective outputs are kept: only cheap ops recompute)
    activation_checkpoint: str = "none"
    ac_every: int = 2  # selective: checkpoint blocks 0, k, 2k, ...
    compile: bool = False  # torch.compile each transformer block
    compile_backend: str = "inductor"  # inductor | aot_eager | eager (any torch.compile backend)
    # tensor parallel: plain nn.Linear layers under column-/row-wise styles, and norms under
    # SequenceParallel, compute on their local shards as plain tensors (DTensor only for the
    # collectives); false: DTensor for every op. Compiled blocks always take the DTensor path.
    tp_local_linears: bool = True
    fsdp_prefetch: int = 1  # FSDP2 all-gathers this many blocks ahead (forward and backward); 1: FSDP2's own
    # consecutive blocks share one FSDP2 / replicate unit until it holds at least this many MiB of
    # parameters (fewer, larger collectives, like DDP's bucket_cap_mb); 0: one unit per block;
    # None: 25 (DDP's bucket_cap_mb) where replicas are kept whole (dp_shard × cp = 1), else 0
    dp_unit_min_mb: Optional[float] = None
    cpu_offload: bool = False  # FSDP2 keeps parameters, gradients and optimizer states in CPU memory
    float8: bool = False  # float8 matmuls in the blocks' linear layers through torchao (CUDA, sm89+)
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None: from the known-GPU table
    comm_accounting: bool = False  # count every collective's calls and bytes per mesh dim and step (debug)


@dataclass
class DataConfig:
    """Where tokens come from and how they are batched."""

    source: str = "stdlib"  # stdlib | files | hf
    # files, folders or globs. files: text (.txt/.md/.py/...), .jsonl, or .bin token files;
    # hf: .jsonl/.json/.parquet/.arrow read through Hugging Face `datasets`
    paths: list[str] = field(default_factory=list)
    val_paths: list[str] = field(default_factory=list)  # optional; else a split of `paths`
    text_key: str = "text"  # field of each .jsonl record / column of a parquet or arrow file
    token_dtype: str = "uint16"  # dtype of .bin files without a sidecar: uint16 | uint32
    tokenizer: str = "byte"  # byte | a tokenizer.json or a folder holding one (Hugging Face `tokenizers`)
    eos_token: Optional[str] = None  # ends each document; None: the tokenizer folder's eos_token (byte: id 256)
    cache_dir: Optional[str] = None  # hf: where the tokenized cache goes (None: ~/.cache/lightning_3d/tokens)
    seq_len: int = 128
    global_batch_size: int = 8  # sequences per optimizer step across all data-parallel ranks
    val_fraction: float = 0.02
    val_batches: int = 4  # global validation batches per validation run
    shuffle: bool = True
    max_bytes: Optional[int] = None  # cap on corpus size read from text sources (None: all)
    num_workers: int = 0  # DataLoader worker processes (memory is pinned on CUDA)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio · lr``."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # None: trainer.max_steps
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer`` (only these; add a field to pass another)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    max_steps: int = 100
    precision: str = "32-true"
    log_every_n_steps: int = 10
    val_check_interval: Optional[int] = None  # in optimizer steps; None: once at the end
    num_sanity_val_steps: int = 0
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class TrainingConfig:
    """What a step does when any rank sees a non-finite loss or gradient norm."""

    on_nonfinite: str = "stop"  # stop: raise before the optimizer step | skip: drop the update and go on
    max_skipped: int = 5  # with skip: this many skipped steps in a row are tolerated; the next one stops


@dataclass
class CheckpointConfig:
    """Sharded checkpoints: ``step-<N>`` folders written with torch.distributed.checkpoint."""

    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    every_n_steps: Optional[int] = None  # None: no checkpoints
    keep_last: int = 3  # newest complete checkpoints kept; older ones are deleted
    async_save: bool = False  # write in the background; the loop waits only for the copy to CPU memory


@dataclass
class Config:
    """The whole experiment, as composed by Hydra from ``conf/`` (recipes in its ``recipe`` group)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: Optional[str] = None  # a step-<N> folder, or "auto": the latest complete one in checkpoint.dir
    seed: int = 1234
    run_dir: str = "."  # set by Hydra to its run directory

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.run_dir) / "checkpoints")
