"""picotron (Hugging Face's small 4D-parallel trainer) against our strategy on the same 3D layout.

    python -m lightning_3d.bench.picotron --picotron /path/to/picotron [--steps 25] [--rounds 2] [--warmup 3] [--units]

``--picotron`` is a checkout of github.com/huggingface/picotron (made against commit
``59714b1``). The harness applies ``picotron_cpu.patch`` (next to this file) to it unless it
is applied already: optional ``flash_attn`` and ``wandb`` imports, CUDA calls guarded,
``rope_theta`` read from ``rope_parameters`` (transformers 5), ``tokenizer(...)`` instead of
the removed ``batch_encode_plus``, and the step time in ms added to its log line.

Every run is 8 CPU processes (gloo, ``OMP_NUM_THREADS=1``), fp32, dp=2 × tp=2 × pp=2 with 1F1B,
the ``tiny`` model's shape (4 layers, dim 128, 8 heads, 4 kv heads, vocab 512, ffn 384) and
16 sequences × 128 tokens per optimizer step. Three runs, ``rounds`` times (picotron first in
the first, third, ... round; ours first in the others, so a drift of the machine's speed during
a round favours neither side):

- picotron: ``train.py`` with a config written here. Its model comes from a local folder
  (``config.json`` of a Llama with the tiny shape, a word-level tokenizer of 512 tokens, a
  ``model.safetensors`` it reads and then re-initializes) and its data from a local text
  file of random tokens, so nothing is downloaded. Batch: per data-parallel rank 8
  sequences as ``micro_batch_size`` 4 × ``gradient_accumulation_steps`` 2, which picotron's
  pipeline runs as 2 microbatches, as ours does. Its own step time: one rank (tp 0, dp 0,
  last stage), from the step's start to after the optimizer step.
- ours, like for like: the ``tiny`` recipe with ``parallel.dp_replicate=2 parallel.dp_shard=1
  parallel.sequence_parallel=false trainer.gradient_clip_val=null`` (DDP-style data parallel,
  no sequence parallel, no clipping, as picotron);
- ours, the ``tiny`` recipe's own layout: FSDP2 ``dp_shard=2``, sequence parallel, clipping;
- with ``--units``, each of the two again with ``perf.dp_unit_min_mb=25`` (``..._units_25mb``):
  the blocks of a stage grouped into one data-parallel unit, one gradient reduction per stage.

Our step times come from :class:`~lightning_3d.bench.measure.StepTimer` on rank 0 (start to
next start), as in :mod:`lightning_3d.bench.layouts`; all of ours run in one launch. The first
``warmup`` steps of every run are left out. Prints the median ms/step of each side over all
rounds and ``RATIO vs_picotron_like_for_like`` / ``RATIO vs_picotron_tiny_recipe`` = our
tokens/s ÷ picotron's (the same tokens per step: picotron's step time ÷ ours).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import (
    StepTimer,
    bench_overrides,
    compose_config,
    median,
    release_memory,
    steady_step_times,
)
from lightning_3d.config import Config, ModelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.pipeline_parallel import num_microbatches

MODULE = "lightning_3d.bench.picotron"
PATCH = Path(__file__).with_name("picotron_cpu.patch")
PICOTRON_COMMIT = "59714b1"  # the picotron commit the patch was made against
PROCESSES = 8
LAYOUT = {"tp": 2, "pp": 2}  # dp = 8 / (tp · pp) = 2 on both sides
# ours, configured as picotron runs: DDP-style data parallel, no sequence parallel, no clipping
LIKE_FOR_LIKE = [
    "parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.tp=2", "parallel.pp=2",
    "parallel.sequence_parallel=false", "trainer.gradient_clip_val=null",
]
TINY_RECIPE: list[str] = []  # the recipe's own layout: dp_shard=2 × tp=2 (SP) × pp=2, clipping at 1.0
# the same two with the blocks grouped into data-parallel units of at least 25 MiB: the tiny
# model's stage is then one unit, one gradient reduction per stage as picotron's bucketed DDP
UNITS = ["perf.dp_unit_min_mb=25"]
VARIANTS = {
    "ours_like_for_like": LIKE_FOR_LIKE,
    "ours_tiny_recipe": TINY_RECIPE,
    "ours_like_for_like_units_25mb": LIKE_FOR_LIKE + UNITS,
    "ours_tiny_recipe_units_25mb": TINY_RECIPE + UNITS,
}
LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE",
               "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


# ----------------------------------------------------------------------------- picotron's checkout


def apply_patch(checkout: Path) -> str:
    """Apply :data:`PATCH` to a picotron checkout unless it is applied already; says which."""
    if not (checkout / "train.py").is_file() or not (checkout / "picotron").is_dir():
        raise ConfigError(f"--picotron {checkout}: not a picotron checkout (no train.py and picotron/ there)")

    def git_apply(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "apply", *flags, str(PATCH)], cwd=checkout, capture_output=True, text=True)

    if git_apply("--check").returncode == 0:
        git_apply().check_returncode()
        return "applied"
    reverse = git_apply("--reverse", "--check")
    if reverse.returncode == 0:
        return "already applied"
    raise ConfigError(f"{PATCH.name} does not apply to {checkout} (it was made against picotron commit "
                      f"{PICOTRON_COMMIT}): {git_apply('--check').stderr.strip()}")


# ----------------------------------------------------------------------------- what picotron is given


def picotron_batch(global_batch_size: int, dp: int, microbatches: int) -> tuple[int, int]:
    """``(micro_batch_size, gradient_accumulation_steps)`` for picotron: it takes
    micro_batch_size × gradient_accumulation_steps × dp sequences per optimizer step and runs
    the accumulation steps as its pipeline microbatches."""
    if global_batch_size % (dp * microbatches):
        raise ConfigError(f"global_batch_size={global_batch_size} is not divisible by dp {dp} × "
                          f"{microbatches} pipeline microbatches = {dp * microbatches}")
    return global_batch_size // (dp * microbatches), microbatches


def llama_config_json(model: ModelConfig) -> dict[str, Any]:
    """A Hugging Face Llama ``config.json`` with our model's shape (picotron reads it with AutoConfig)."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": model.dim,
        "intermediate_size": model.hidden_dim,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.kv_heads,
        "vocab_size": model.vocab_size,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "max_position_embeddings": model.max_seq_len,
        "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu",
    }


def picotron_config(config: Config, model_dir: Path, data_dir: Path, save_dir: Path, total_steps: int) -> dict[str, Any]:
    """picotron's ``--config`` JSON for the layout and batch of ``config`` (our composed ``tiny`` recipe)."""
    world = PROCESSES
    dp = world // (LAYOUT["tp"] * LAYOUT["pp"])
    microbatches = num_microbatches(config.parallel.microbatches, LAYOUT["pp"] * config.parallel.stages_per_rank)
    micro_batch_size, accumulation = picotron_batch(config.data.global_batch_size, dp, microbatches)
    return {
        "distributed": {"tp_size": LAYOUT["tp"], "cp_size": 1, "pp_size": LAYOUT["pp"], "dp_size": dp,
                        "pp_engine": "1f1b", "backend": "gloo", "use_cpu": True},
        "model": {"name": str(model_dir), "num_hidden_layers": config.model.n_layers,
                  "num_attention_heads": config.model.n_heads, "num_key_value_heads": config.model.kv_heads,
                  "dtype": "float32", "use_flash_attention": False, "use_fused_adam": False},
        "training": {"seed": config.seed, "learning_rate": config.optim.lr, "total_train_steps": total_steps,
                     "seq_length": config.data.seq_len, "micro_batch_size": micro_batch_size,
                     "gradient_accumulation_steps": accumulation, "num_samples": None, "max_tokens": None},
        "dataset": {"name": str(data_dir), "subset_name": None, "num_workers": 0, "num_proc": 1},
        # no checkpoint within the run
        "checkpoint": {"save_dir": str(save_dir), "save_frequency": total_steps + 1, "load_path": ""},
        "logging": {"use_wandb": False, "project_name": "picotron", "run_name": "lightning_3d_bench"},
        "environment": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "FLASH_ATTEN": "0",
                        "HF_TOKEN": "unused"},
    }


def tokens_per_step(picotron: dict[str, Any]) -> int:
    """Tokens one optimizer step of this picotron config processes, over all data-parallel ranks."""
    training = picotron["training"]
    return (training["micro_batch_size"] * training["gradient_accumulation_steps"]
            * picotron["distributed"]["dp_size"] * training["seq_length"])


def write_model_folder(model: ModelConfig, folder: Path) -> None:
    """``config.json``, a word-level tokenizer of ``vocab_size`` tokens (``t0`` … ``t<vocab-1>``) and
    a zero ``model.safetensors`` under the Llama names picotron loads before re-initializing."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(llama_config_json(model), indent=2))
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(model.vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    dim, hd, ffn = model.dim, model.head_dim, model.hidden_dim
    shapes = {"model.embed_tokens.weight": (model.vocab_size, dim), "model.norm.weight": (dim,)}
    for layer in range(model.n_layers):
        prefix = f"model.layers.{layer}."
        shapes |= {
            prefix + "input_layernorm.weight": (dim,), prefix + "post_attention_layernorm.weight": (dim,),
            prefix + "self_attn.q_proj.weight": (model.n_heads * hd, dim),
            prefix + "self_attn.k_proj.weight": (model.kv_heads * hd, dim),
            prefix + "self_attn.v_proj.weight": (model.kv_heads * hd, dim),
            prefix + "self_attn.o_proj.weight": (dim, model.n_heads * hd),
            prefix + "mlp.gate_proj.weight": (ffn, dim), prefix + "mlp.up_proj.weight": (ffn, dim),
            prefix + "mlp.down_proj.weight": (dim, ffn),
        }
    # picotron reads its weights from ./hf_model_safetensors of its working directory
    weights = folder / "hf_model_safetensors"
    weights.mkdir(exist_ok=True)
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(weights / "model.safetensors"))


def write_text_dataset(folder: Path, vocab_size: int, seq_len: int, sequences: int, seed: int) -> None:
    """One text file of ``sequences`` lines of ``seq_len`` random tokens (``datasets`` reads the
    folder as a text dataset; the token values do not change the cost of a step)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = torch.randint(vocab_size, (sequences, seq_len), generator=torch.Generator().manual_seed(seed))
    (folder / "train.txt").write_text("".join(" ".join(f"t{t}" for t in row) + "\n" for row in tokens.tolist()))


# ----------------------------------------------------------------------------- picotron's log

_STEP = re.compile(r"Step:\s*(\d+)\s*\|")
_FIELDS = {
    "loss": re.compile(r"Loss:\s*([-+\d.eEnaif]+)"),
    "tokens_per_s": re.compile(r"Tokens/s:\s*([\d.]+)([KMBT]?)\s*\|"),
    "step_ms": re.compile(r"Step time:\s*([\d.]+)ms"),
}
_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_log(text: str, step_tokens: int) -> list[dict[str, float]]:
    """Every step picotron logged: ``step``, ``loss`` and ``step_s``, read from its ``Step time``
    (ms, added by the patch) or else from its ``Tokens/s`` (3 significant digits)."""
    rows = []
    for line in text.splitlines():
        step = _STEP.search(line)
        tokens = _FIELDS["tokens_per_s"].search(line)
        if step is None or tokens is None:
            continue
        step_ms = _FIELDS["step_ms"].search(line)
        loss = _FIELDS["loss"].search(line)
        step_s = float(step_ms.group(1)) / 1e3 if step_ms else step_tokens / (float(tokens.group(1)) * _SUFFIX[tokens.group(2)])
        rows.append({"step": int(step.group(1)), "loss": float(loss.group(1)) if loss else float("nan"), "step_s": step_s})
    return rows


# ----------------------------------------------------------------------------- the runs


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_picotron(checkout: Path, work: Path, config: Config, steps: int, warmup: int) -> dict[str, Any]:
    """One picotron run of ``warmup + steps`` steps on 8 processes; its timed steps and losses."""
    model_dir, data_dir = work / "model", work / "data"
    if not (model_dir / "config.json").is_file():
        write_model_folder(config.model, model_dir)
    picotron = picotron_config(config, model_dir, data_dir, work / "checkpoints", warmup + steps)
    step_tokens = tokens_per_step(picotron)
    if not (data_dir / "train.txt").is_file():
        sequences = step_tokens // config.data.seq_len * (warmup + steps + 2)
        write_text_dataset(data_dir, config.model.vocab_size, config.data.seq_len, sequences, config.seed)
    config_file = work / "picotron.json"
    config_file.write_text(json.dumps(picotron, indent=2))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
               str(checkout / "train.py"), "--config", str(config_file)]
    env = _clean_env(DTYPE="float32", HF_TOKEN="unused", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                     HF_DATASETS_CACHE=str(work / "datasets_cache"), TRANSFORMERS_OFFLINE="1")
    # cwd: picotron reads ./hf_model_safetensors
    result = subprocess.run(command, cwd=model_dir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"picotron failed (exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    logged = parse_log(result.stdout, step_tokens)
    if len(logged) != warmup + steps:
        raise RuntimeError(f"picotron logged {len(logged)} steps, expected {warmup + steps}:\n{result.stdout[-3000:]}")
    return {"step_times": [row["step_s"] for row in logged[warmup:]], "losses": [row["loss"] for row in logged],
            "tokens_per_step": step_tokens}


def _variants(units: bool) -> dict[str, list[str]]:
    return {name: overrides for name, overrides in VARIANTS.items() if units or not name.endswith("_units_25mb")}


def _worker(out: Path, steps: int, warmup: int, units: bool) -> None:
    """Our variants, one after the other in this launch; rank 0's step times."""
    import torch.distributed as dist

    from lightning_3d.train import build, shutdown_distributed

    rows: dict[str, Any] = {}
    for name, overrides in _variants(units).items():
        release_memory()
        config = compose_config(out.parent / name, bench_overrides(warmup + steps + 1) + overrides)
        timer = StepTimer()
        trainer, model, datamodule = build(config, callbacks=[timer])
        trainer.fit(model, datamodule=datamodule)
        rows[name] = {"step_times": steady_step_times(timer.starts, warmup), "losses": timer.losses,
                      "tokens_per_step": config.data.global_batch_size * config.data.seq_len}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(rows))
    shutdown_distributed()


def summarize(runs: dict[str, list[list[float]]]) -> dict[str, Any]:
    """Median step time per side over all rounds, and each of ours against picotron (the same
    tokens per step, so our tokens/s ÷ picotron's = picotron's step time ÷ ours)."""
    result: dict[str, Any] = {"step_s": {side: median(t for times in rounds for t in times) for side, rounds in runs.items()}}
    result["round_step_s"] = {side: [median(times) for times in rounds] for side, rounds in runs.items()}
    picotron_s = result["step_s"]["picotron"]
    result["ratios"] = {f"vs_picotron_{side.removeprefix('ours_')}": picotron_s / step_s
                        for side, step_s in result["step_s"].items() if side != "picotron"}
    return result


def run(checkout: Path, steps: int, rounds: int, warmup: int, work: Path, units: bool = False) -> dict[str, Any]:
    """Apply the patch, then picotron and all of ours in turn, ``rounds`` times."""
    patched = apply_patch(checkout)
    config = compose_config(work / "unused", bench_overrides(warmup + steps + 1), devices=PROCESSES)
    runs: dict[str, list[list[float]]] = {"picotron": [], **{name: [] for name in _variants(units)}}
    losses: dict[str, list[float]] = {}
    ours_args = (f"--steps={steps}", f"--warmup={warmup}", *(["--units"] if units else []))
    for index in range(rounds):
        # picotron first in odd rounds, ours first in even ones: a machine that slows down or
        # speeds up during a round does not favour one side
        if index % 2 == 0:
            picotron = run_picotron(checkout, work / "picotron", config, steps, warmup)
            ours = run_workers(MODULE, PROCESSES, *ours_args)
        else:
            ours = run_workers(MODULE, PROCESSES, *ours_args)
            picotron = run_picotron(checkout, work / "picotron", config, steps, warmup)
        for name, row in {"picotron": picotron, **ours}.items():
            if row["tokens_per_step"] != picotron["tokens_per_step"]:
                raise RuntimeError(f"{name} processes {row['tokens_per_step']} tokens per step, picotron "
                                   f"{picotron['tokens_per_step']}: the comparison needs the same")
            runs[name].append(row["step_times"])
            losses.setdefault(name, row["losses"])
        print(f"round {index + 1}/{rounds}: " + ", ".join(f"{name} {median(times[-1]) * 1e3:.0f} ms/step"
                                                          for name, times in runs.items()), flush=True)
    return {**summarize(runs), "patch": patched, "tokens_per_step": picotron["tokens_per_step"],
            "step_times": runs, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--picotron", type=Path, help="a checkout of github.com/huggingface/picotron")
    parser.add_argument("--steps", type=int, default=25, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--units", action="store_true", help="also the two layouts with perf.dp_unit_min_mb=25")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of every run")
    parser.add_argument("--out", type=Path, help="also write every step time and loss here (JSON)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.steps, args.warmup, args.units)
        return
    if args.picotron is None:
        parser.error("--picotron PATH is required")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.picotron.resolve(), args.steps, args.rounds, args.warmup, Path(tmp), args.units)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(f"patch: {result['patch']}; {result['tokens_per_step']} tokens per step; "
          f"{args.steps} timed steps × {args.rounds} rounds per side")
    for side, step_s in result["step_s"].items():
        per_round = ", ".join(f"{s * 1e3:.0f}" for s in result["round_step_s"][side])
        print(f"{side}: {step_s * 1e3:.1f} ms/step, {result['tokens_per_step'] / step_s:.0f} tokens/s "
              f"(per round: {per_round} ms)")
    for name, ratio in result["ratios"].items():
        print(f"RATIO {name} {ratio:.3f}")


if __name__ == "__main__":
    main()
