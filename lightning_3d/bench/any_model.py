"""A transformers model with no plan code under our strategy, against the same model parallelized by
hand under Lightning's own ``ModelParallelStrategy``, on the same 2D layout.

    python -m lightning_3d.bench.any_model [--steps 12] [--rounds 3] [--warmup 3]
        [--hidden 256 --layers 4 --vocab 2048 --seq 256 --batch 8] [--out FILE]

One launch of 4 CPU processes (gloo) runs two Trainers in the same process group, taking
turns step by step (:mod:`lightning_3d.bench.turns`), ``rounds`` times. Both train a
transformers ``LlamaForCausalLM`` built with ``AutoModelForCausalLM.from_config`` on the same
random token sequences (``batch`` sequences of ``seq`` tokens per step, ``batch // 2`` per
data-parallel rank; token ``k`` drawn with probability ∝ 1/(k+1), entropy 5.64 nats at vocab
2048), with AdamW (lr 1e-3), fp32, no gradient clipping:

- ours: ``ModelParallel4DStrategy(dp_shard=2, tp=2)`` and a LightningModule with no plan code
  and no init hook: ``configure_model`` builds the model, ``training_step`` returns
  ``self.model(input_ids=..., labels=...).loss``. The strategy derives the plan from what the
  model declares (``base_model_tp_plan``, ``_tp_plan``, ``base_model_pp_plan``);
- Lightning's: ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)`` and the
  same module, whose ``configure_model`` builds the model (real weights, fixed seed) and then
  does by hand what the model's declared plan says: ``parallelize_module`` with
  ``ColwiseParallel`` on q/k/v/gate/up and ``RowwiseParallel`` on o/down in every decoder
  layer, ``ColwiseParallel(output_layouts=Replicate())`` on ``lm_head``, then ``fully_shard``
  per decoder layer and on the model.

The two sides start from different random weights: their losses are a check that both
learn, not a comparison.

What differs by design: ours shards the embedding and the final norm + head as FSDP units of
their own (the last layer and the head unit stay gathered from forward to backward), all-reduces the token count every step so that the loss is the global
token-weighted mean (``num_items_in_batch``), and checks loss and gradient norm for
non-finite values on every rank every step; theirs keeps the embedding and head in the root
unit and each rank's loss is the mean over its own tokens.

Prints ``RATIO any_model_vs_lightning_hand_parallel`` = our steps/s ÷ theirs: the median,
over the step pairs after ``warmup`` steps, of their step time ÷ ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_3d.bench.launch import run_workers
from lightning_3d.bench.measure import add_turn_ratios
from lightning_3d.bench.turns import TurnTimer, fit_in_turns
from lightning_3d.strategy import ModelParallel4DStrategy

MODULE = "lightning_3d.bench.any_model"
DP, TP = 2, 2
SIZES = ("hidden", "layers", "vocab", "seq", "batch")
DATA_SEED, INIT_SEED = 1, 0


def llama_config(hidden: int, layers: int, vocab: int, seq: int) -> Any:
    from transformers import LlamaConfig

    heads = hidden // 64
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=64 * round(hidden * 8 // 3 / 64),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(2, heads // 2),
        vocab_size=vocab,
        max_position_embeddings=max(seq, 2048),
        tie_word_embeddings=False,
    )


class LitLM(L.LightningModule):
    """The user's module: configure_model builds the model, training_step calls it with labels."""

    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.sizes = sizes
        self.model: Optional[torch.nn.Module] = None
        self.last_loss: Optional[Tensor] = None

    @override
    def configure_model(self) -> None:
        from transformers import AutoModelForCausalLM

        if self.model is None:
            sizes = {key: self.sizes[key] for key in ("hidden", "layers", "vocab", "seq")}
            self.model = AutoModelForCausalLM.from_config(llama_config(**sizes))

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.last_loss = loss.detach()
        self.log("train_loss", loss, sync_dist=True)
        return loss

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class HandParallelizedLM(LitLM):
    """The same module for Lightning's ``ModelParallelStrategy``: it parallelizes the model itself."""

    @override
    def configure_model(self) -> None:
        if self.model is not None:
            return
        torch.manual_seed(INIT_SEED)  # real weights (ModelParallelStrategy would reset meta ones), same on every rank
        super().configure_model()
        model = self.model
        tp_mesh, dp_mesh = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
        layer_plan = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        for layer in model.model.layers:
            parallelize_module(layer, tp_mesh, layer_plan)
        parallelize_module(model, tp_mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})
        for layer in model.model.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)


def loader(sizes: dict[str, int]) -> DataLoader:
    """``steps`` global batches of random token sequences, in per-device batches (the distributed
    sampler gives each data-parallel rank its share). Token ``k`` is drawn with probability
    ∝ 1/(k+1): unlike uniform tokens (loss stuck at ln vocab) there is something to learn within
    a few steps, so the losses show that both sides train."""
    count = sizes["steps"] * sizes["batch"]
    weights = 1.0 / torch.arange(1, sizes["vocab"] + 1, dtype=torch.float64)
    generator = torch.Generator().manual_seed(DATA_SEED)
    tokens = torch.multinomial(weights, count * sizes["seq"], replacement=True, generator=generator)
    tokens = tokens.view(count, sizes["seq"])
    return DataLoader([{"input_ids": t, "labels": t} for t in tokens], batch_size=sizes["batch"] // DP)


class Layout(L.Callback):
    """What the side's model became, read once at the start of training (outside the timed steps):
    this rank's parameter elements and the number of modules ``fully_shard`` wrapped (a unit of
    several modules, such as our norm + head, counts each)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = list(pl_module.model.parameters())
        self.seen = {
            "local_param_elements": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
            "full_param_elements": sum(p.numel() for p in params),
            "fsdp_modules": sum(isinstance(m, FSDPModule) for m in pl_module.model.modules()),
        }


def trainer(strategy: Any, timer: TurnTimer, layout: Layout, steps: int, root: Path) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=DP * TP, strategy=strategy, precision="32-true", max_steps=steps,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, layout], default_root_dir=str(root),
    )


def last_loss(module: L.LightningModule) -> float:
    return float(module.last_loss)


def _fit_ours(sizes: dict[str, int], timer: TurnTimer, layout: Layout, root: Path) -> None:
    timer.loss_of = last_loss
    strategy = ModelParallel4DStrategy(dp_shard=DP, tp=TP)
    trainer(strategy, timer, layout, sizes["steps"], root).fit(LitLM(sizes), loader(sizes))


def _fit_lightning(sizes: dict[str, int], timer: TurnTimer, layout: Layout, root: Path) -> None:
    timer.loss_of = last_loss
    strategy = ModelParallelStrategy(data_parallel_size=DP, tensor_parallel_size=TP)
    trainer(strategy, timer, layout, sizes["steps"], root).fit(HandParallelizedLM(sizes), loader(sizes))


def _worker(out: Path, sizes: dict[str, int], rounds: int, warmup: int) -> None:
    from lightning_3d.train import shutdown_distributed

    result: dict[str, Any] = {"ours": [], "lightning": [], "losses": {}}
    layouts = {"ours": Layout(), "lightning": Layout()}
    for index in range(rounds):
        root = out.parent / f"round_{index}"
        timers = fit_in_turns(
            ("ours", lambda timer, at=root / "ours": _fit_ours(sizes, timer, layouts["ours"], at)),
            ("lightning", lambda timer, at=root / "lightning": _fit_lightning(sizes, timer, layouts["lightning"], at)),
            second_loss=last_loss,
        )
        for side, timer in timers.items():
            result[side].append(timer.step_times[warmup:])
            result["losses"].setdefault(side, timer.losses)  # the first round's
    # equal tokens per rank: the mean of the ranks' losses is the global mean on both sides
    for side in ("ours", "lightning"):
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result["losses"][side])
        result["losses"][side] = torch.tensor(gathered, dtype=torch.float64).mean(0).tolist()
    for side, layout in layouts.items():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, layout.seen)
        result.setdefault("layout", {})[side] = gathered
    result["threads"] = torch.get_num_threads()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(result))
    shutdown_distributed()


def run(sizes: dict[str, int], rounds: int, warmup: int) -> dict[str, Any]:
    """Launch the worker on 4 processes; add the per-step and median ratios."""
    args = [f"--{key}={value}" for key, value in sizes.items()]
    result = run_workers(MODULE, DP * TP, *args, "--rounds", str(rounds), "--warmup", str(warmup))
    result["sizes"], result["rounds"], result["warmup"] = sizes, rounds, warmup
    return add_turn_ratios(result, "lightning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step over both data-parallel ranks")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = {"steps": args.steps, **{key: getattr(args, key) for key in SIZES}}
    if args.worker is not None:
        _worker(args.worker, sizes, args.rounds, args.warmup)
        return
    if args.batch % DP:
        parser.error(f"--batch must be divisible by the data-parallel size {DP}")
    result = run(sizes, args.rounds, args.warmup)
    ratios = result["step_ratios"]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    config = llama_config(args.hidden, args.layers, args.vocab, args.seq)
    print(f"LlamaForCausalLM: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
          f"{config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads ({config.num_key_value_heads} kv), vocab {config.vocab_size}; "
          f"{args.batch} × {args.seq} tokens per step; dp_shard={DP} × tp={TP} on {DP * TP} processes, "
          f"{result['threads']} torch thread(s) each")
    losses = result["losses"]
    print("| side | median ms/step | losses, steps 0 / 1 / 2 … last (first round) |")
    print("|---|---|---|")
    for side, label in (("ours", "ours: ModelParallel4DStrategy, no plan code"),
                        ("lightning", "Lightning's ModelParallelStrategy, parallelized by hand")):
        shown = " / ".join(f"{value:.4f}" for value in losses[side][:3])
        print(f"| {label} | {result[side + '_step_s'] * 1e3:.1f} | {shown} … {losses[side][-1]:.4f} |")
    for side, ranks in result["layout"].items():
        print(f"{side}: {ranks[0]['fsdp_modules']} modules wrapped by fully_shard; parameter elements per rank "
              f"{' / '.join(str(rank['local_param_elements']) for rank in ranks)} of {ranks[0]['full_param_elements']}")
    print(f"{len(ratios)} step pairs; per-step ratio (theirs ÷ ours) quartiles "
          f"{quartiles[0]:.3f} / {quartiles[1]:.3f} / {quartiles[2]:.3f}")
    print(f"RATIO any_model_vs_lightning_hand_parallel {result['ratio']:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
