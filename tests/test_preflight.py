"""The pre-flight check of a whole config (``lightning_3d.train.preflight``), table-driven.

Each row is a config the CLI could be given (the debug recipe plus overrides), the machine
it runs on, and what the error must say: the problem, its numbers and the fix. Nothing
here starts a process or a process group.
"""

from __future__ import annotations

import pytest
from test_config import load

from lightning_3d.train import preflight
from lightning_3d.validation import Hardware

CPU_ONLY = Hardware(cuda_devices=0, bf16=False)
OLD_GPU = Hardware(cuda_devices=1, bf16=False, name="Tesla V100")
TWO_H100 = Hardware(cuda_devices=2, bf16=True, name="NVIDIA H100")

# (case, overrides on top of recipe=debug, hardware, substrings of the error)
CASES = [
    ("tp does not divide the world", ["trainer.devices=4", "parallel.tp=3"], CPU_ONLY,
     ["tp=3", "does not divide the world size 4", "[1, 2, 4]"]),
    ("degrees multiply to the wrong size", ["trainer.devices=4", "parallel.tp=2", "parallel.dp_shard=4"], CPU_ONLY,
     ["= 8 ranks, but the world size is 4", "dp_shard=-1"]),
    ("degree not positive", ["parallel.cp=0"], CPU_ONLY, ["parallel.cp=0 must be >= 1"]),
    ("heads vs tp", ["trainer.devices=8", "parallel.tp=8"], CPU_ONLY,
     ["model.n_heads=4 is not divisible by parallel.tp=8", "valid tp values: [1, 2, 4]"]),
    ("kv heads vs tp", ["trainer.devices=4", "parallel.tp=4", "model.n_kv_heads=2"], CPU_ONLY,
     ["model.n_kv_heads=2 is not divisible by parallel.tp=4", "valid tp values: [1, 2]"]),
    ("dim vs heads", ["model.dim=66"], CPU_ONLY, ["model.dim=66 is not divisible by model.n_heads=4"]),
    ("layers vs stages", ["trainer.devices=8", "parallel.pp=8"], CPU_ONLY,
     ["8 stages, more than model.n_layers=4", "every stage needs at least one block"]),
    ("microbatches vs stages", ["trainer.devices=2", "parallel.pp=2", "parallel.microbatches=1"], CPU_ONLY,
     ["needs at least as many microbatches as stages: microbatches=1 < pp 2 × stages_per_rank 1 = 2"]),
    ("microbatches vs per-rank batch", ["trainer.devices=2", "parallel.pp=2", "parallel.microbatches=3"], CPU_ONLY,
     ["per-rank batch of 8 sequences", "not divisible by parallel.microbatches=3", "valid microbatches: [1, 2, 4, 8]"]),
    ("stages_per_rank vs schedule", ["trainer.devices=2", "parallel.pp=2", "parallel.pp_schedule=zbv"], CPU_ONLY,
     ["pp_schedule=zbv places exactly 2 stages per rank", "stages_per_rank=1"]),
    ("several stages on a single-stage schedule", ["trainer.devices=2", "parallel.pp=2", "parallel.stages_per_rank=2"], CPU_ONLY,
     ["pp_schedule=1f1b runs one stage per rank, but stages_per_rank=2; use 1"]),
    ("seq_len vs 2·cp·tp", ["trainer.devices=4", "parallel.cp=2", "parallel.tp=2", "data.seq_len=36"], CPU_ONLY,
     ["data.seq_len=36 is not divisible by 2·cp=4 × parallel.tp=2 = 8", "nearest valid: [32, 40]", "sequence_parallel=false"]),
    ("seq_len vs model max", ["data.seq_len=256"], CPU_ONLY, ["data.seq_len=256 is longer than model.max_seq_len=128"]),
    ("global batch vs dp", ["trainer.devices=4", "data.global_batch_size=6"], CPU_ONLY,
     ["global_batch_size=6 is not divisible by the data-parallel size 4", "nearest valid: [4, 8]"]),
    ("global batch vs dp × accumulation", ["trainer.devices=2", "trainer.accumulate_grad_batches=3"], CPU_ONLY,
     ["global_batch_size=8 is not divisible by the data-parallel size 2", "accumulate_grad_batches=3 = 6"]),
    ("cp_backend native without CUDA", ["trainer.devices=2", "parallel.cp=2", "parallel.cp_backend=native"], CPU_ONLY,
     ["parallel.cp_backend=native", "no CPU kernel", "use cp_backend=ring or allgather"]),
    ("unknown cp_backend", ["parallel.cp_backend=ulysses"], CPU_ONLY, ["parallel.cp_backend='ulysses' is not one of"]),
    ("bf16 on a GPU without it", ["trainer.accelerator=gpu", "trainer.precision=bf16-mixed"], OLD_GPU,
     ["trainer.precision=bf16-mixed needs bfloat16, which Tesla V100 lacks", "use 32-true"]),
    ("accelerator=gpu without a GPU", ["trainer.accelerator=gpu"], CPU_ONLY,
     ["trainer.accelerator=gpu but no CUDA GPU is visible", "use trainer.accelerator=cpu"]),
    ("devices > GPUs", ["trainer.accelerator=gpu", "trainer.devices=8"], TWO_H100,
     ["trainer.devices=8 but this machine has 2 GPU(s)", "at most 2 per node"]),
    ("unknown accelerator", ["trainer.accelerator=tpu"], CPU_ONLY, ["trainer.accelerator='tpu' is not one of"]),
    ("unknown precision", ["trainer.precision=fp8"], CPU_ONLY, ["trainer.precision='fp8' is not supported", "'bf16-mixed'"]),
    ("fp16 precision", ["trainer.precision=16-mixed"], CPU_ONLY, ["trainer.precision='16-mixed' is not supported", "gradient scaler"]),
    ("devices not positive", ["trainer.devices=0"], CPU_ONLY, ["trainer.devices=0 must be a positive number"]),
    ("unknown non-finite policy", ["training.on_nonfinite=ignore"], CPU_ONLY,
     ["training.on_nonfinite='ignore' is not one of ['stop', 'skip']"]),
    ("negative max_skipped", ["training.max_skipped=-1"], CPU_ONLY, ["training.max_skipped=-1 must be >= 0"]),
    ("timeout not positive", ["parallel.timeout_s=0"], CPU_ONLY, ["parallel.timeout_s=0.0 must be > 0"]),
    ("init timeout not positive", ["parallel.init_timeout_s=-5"], CPU_ONLY, ["parallel.init_timeout_s=-5.0 must be > 0"]),
    ("checkpoint keep_last", ["checkpoint.every_n_steps=2", "checkpoint.keep_last=0"], CPU_ONLY,
     ["checkpoint.keep_last=0 must be >= 1"]),
    ("missing data file", ["data.source=files", "data.paths=[/nonexistent/corpus.txt]"], CPU_ONLY,
     ["data path /nonexistent/corpus.txt does not exist"]),
    ("missing resume folder", ["resume=/nonexistent/step-3"], CPU_ONLY, ["resume=/nonexistent/step-3: no such checkpoint folder"]),
    ("missing init_from", ["model.init_from=/nonexistent/model.safetensors"], CPU_ONLY, ["no such file or folder"]),
    ("unknown activation checkpointing mode", ["perf.activation_checkpoint=some"], CPU_ONLY,
     ["perf.activation_checkpoint='some' is not a mode; valid: none, full, selective, op"]),
    ("float8 without a GPU", ["perf.float8=true"], CPU_ONLY, ["perf.float8=true runs float8 matmuls on CUDA GPUs only"]),
    ("cpu offload without sharding", ["perf.cpu_offload=true"], CPU_ONLY, ["perf.cpu_offload=true offloads FSDP2 shards"]),
]


@pytest.mark.parametrize("case, overrides, hardware, expected", CASES, ids=[row[0] for row in CASES])
def test_preflight_names_the_problem_and_the_fix(case: str, overrides: list[str], hardware: Hardware, expected: list[str]) -> None:
    config = load("recipe=debug", *overrides)
    with pytest.raises(ValueError) as error:
        preflight(config, hardware)
    message = str(error.value)
    assert message.startswith("invalid configuration:\n  - ")
    for text in expected:
        assert text in message, f"{text!r} not in:\n{message}"


def test_preflight_reports_every_problem_at_once() -> None:
    config = load(
        "recipe=debug",
        "trainer.devices=4",
        "parallel.dp_shard=3",  # layout
        "data.seq_len=256",  # data vs model
        "trainer.precision=fp8",  # trainer
        "training.on_nonfinite=ignore",  # training
        "checkpoint.every_n_steps=0",  # checkpoint
        "data.source=files",
        "data.paths=[/nonexistent/a.txt,/nonexistent/b.txt]",  # both data files
    )
    with pytest.raises(ValueError) as error:
        preflight(config, CPU_ONLY)
    problems = str(error.value).splitlines()[1:]
    assert len(problems) == 7, str(error.value)
    for text in ["dp_shard=3", "seq_len=256", "fp8", "on_nonfinite", "every_n_steps=0", "a.txt", "b.txt"]:
        assert sum(text in line for line in problems) == 1, (text, problems)


@pytest.mark.parametrize(
    "overrides, hardware, dims",
    [
        (["trainer.devices=8", "parallel.tp=2", "parallel.pp=2"], CPU_ONLY, (2, 1, 2, 1, 2)),
        (["trainer.accelerator=gpu", "trainer.devices=2", "trainer.precision=bf16-mixed"], TWO_H100, (1, 1, 2, 1, 1)),
        (["trainer.accelerator=gpu", "trainer.precision=32-true"], OLD_GPU, (1, 1, 1, 1, 1)),
        (["trainer.precision=bf16"], CPU_ONLY, (1, 1, 1, 1, 1)),  # Lightning's alias of bf16-mixed
    ],
)
def test_preflight_passes_a_good_config(overrides: list[str], hardware: Hardware, dims: tuple) -> None:
    resolved = preflight(load("recipe=debug", *overrides), hardware)
    assert (resolved.pp, resolved.dp_replicate, resolved.dp_shard, resolved.cp, resolved.tp) == dims
