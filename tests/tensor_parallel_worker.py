"""Worker for tests/test_tensor_parallel.py: each case builds the same small module twice on a
tp=2 mesh, once with torch's ColwiseParallel / RowwiseParallel and once with the local-linear
styles (and ``SequenceParallel`` / ``LocalSequenceParallel`` on a norm), runs one forward and backward on the same input, and records outputs and gradients. The
``optimizer`` cases run three steps of torch's AdamW and of ShardLocalAdamW on the same
DTensor and plain parameters and gradients, and record parameters and states. The
``embedding`` cases look up ids under ``RowwiseParallel`` and ``LocalRowwiseEmbedding``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from case_harness import run_cases
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from lightning_3d.optim import ShardLocalAdamW
from lightning_3d.parallel.tensor_parallel import (
    LocalColwiseLinear,
    LocalPrepareModuleInput,
    LocalRowwiseEmbedding,
    LocalRowwiseLinear,
    LocalSequenceParallel,
)

LAYOUTS = {"replicate": Replicate(), "sequence": Shard(1), "last": Shard(-1)}


class MLP(nn.Module):
    def __init__(self, bias: bool, norm: bool, gated: bool = False, skip: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8) if norm else nn.Identity()
        self.skip = skip  # the normed input also added to the output: a reader outside the layers
        self.up = nn.Linear(8, 12, bias=bias)
        # a second column-wise layer reading the same input (as gate and up, or q, k and v)
        self.gate = nn.Linear(8, 12, bias=bias) if gated else None
        self.down = nn.Linear(12, 8, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        hidden = torch.tanh(self.up(h))
        if self.gate is not None:
            hidden = hidden * torch.sigmoid(self.gate(h))
        return self.down(hidden) + h if self.skip else self.down(hidden)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _saved(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor that ``torch.load(weights_only=True)`` reads (not a pending collective's)."""
    tensor = _whole(tensor)
    return (tensor.wait() if isinstance(tensor, AsyncCollectiveTensor) else tensor).detach().clone()


def _run(local: bool, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = MLP(case["bias"], case["norm"] or case.get("plain_norm", False), case.get("gated", False), case.get("skip", False))
    residual = LAYOUTS[case["residual"]]
    colwise, rowwise, sequence = (
        (LocalColwiseLinear, LocalRowwiseLinear, LocalSequenceParallel) if local else (ColwiseParallel, RowwiseParallel, SequenceParallel)
    )
    plan = {"up": colwise(output_layouts=LAYOUTS[case["up_out"]], use_local_output=case["up_local"]),
            "down": rowwise(input_layouts=LAYOUTS[case["down_in"]], output_layouts=residual, use_local_output=case["down_local"])}
    if case.get("gated"):
        plan["gate"] = colwise(output_layouts=LAYOUTS[case["up_out"]], use_local_output=case["up_local"])
    if case["norm"]:  # the norm on this rank's tokens, as the Llama plan's SequenceParallel norms
        plan["norm"] = sequence(use_local_output=case["norm_local"])
    if case["prepare"]:  # the block's input made whole once, as the Llama plan's PrepareModuleInput does
        plan[""] = (LocalPrepareModuleInput if local else PrepareModuleInput)(input_layouts=(residual,), desired_input_layouts=(Replicate(),))
    else:
        for name in ("up", "gate"):
            if name in plan:
                plan[name].input_layouts = (residual,)
    parallelize_module(model, mesh, plan)
    whole = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))
    x = (whole.chunk(2, dim=1)[dist.get_rank()] if case["residual"] == "sequence" else whole).clone().requires_grad_(True)
    y = model(x)
    out = _whole(y)  # this rank's output (a DTensor gathered, differentiably)
    all_reduce, calls = dist.all_reduce, []
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)  # the local path's c10d calls
    try:
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    finally:
        dist.all_reduce = all_reduce
    result = {"y": _saved(out), "x_grad": _saved(x.grad), "y_is_dtensor": torch.tensor(isinstance(y, DTensor))}
    if local:
        result["backward_all_reduces"] = torch.tensor(len(calls))
    result.update({f"grad.{name}": _saved(param.grad) for name, param in model.named_parameters()})
    result["local_forward"] = torch.tensor(["forward" in vars(module) for module in (model.up, model.down, model.norm)])
    return result


def _run_embedding(local: bool, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An ``nn.Embedding`` under RowwiseParallel (DTensor's masked lookup) or LocalRowwiseEmbedding."""
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Embedding(case["vocab"], 4, padding_idx=case["padding_idx"])
    style = LocalRowwiseEmbedding if local else RowwiseParallel
    parallelize_module(model, mesh, style(input_layouts=Replicate(), output_layouts=LAYOUTS[case["out"]], use_local_output=case["local_output"]))
    # every id of the vocabulary, the padding id among them, from both ranks' blocks of rows
    ids = torch.randint(case["vocab"], (2, 6), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor([0, case["vocab"] - 1, case["padding_idx"] or 0])
    y = model(ids)
    out = _whole(y)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return {"y": _saved(out), "grad.weight": _saved(model.weight.grad), "y_is_dtensor": torch.tensor(isinstance(y, DTensor)),
            "local_forward": torch.tensor(["forward" in vars(model)])}


def _adamw_steps(optimizer_class: type[torch.optim.Optimizer], amsgrad: bool) -> dict[str, torch.Tensor]:
    """Three AdamW steps on a DTensor weight sharded unevenly (5 rows on 2 ranks), a replicated
    DTensor gain whose gradient is a partial sum, and a plain tensor; the whole parameters and
    states after them, and the placements of the states."""
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    whole_weight, whole_gain, plain = torch.randn(5, 3), torch.randn(3), torch.randn(4)
    weight = nn.Parameter(distribute_tensor(whole_weight, mesh, (Shard(0),)))
    gain = nn.Parameter(distribute_tensor(whole_gain, mesh, (Replicate(),)))
    plain = nn.Parameter(plain)
    optimizer = optimizer_class([{"params": [weight, plain], "weight_decay": 0.1}, {"params": [gain], "weight_decay": 0.0}],
                                lr=0.01, amsgrad=amsgrad, foreach=True if optimizer_class is ShardLocalAdamW else False)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        weight.grad = distribute_tensor(torch.randn(5, 3, generator=generator), mesh, (Shard(0),))
        # each rank holds half of the gain's gradient: a partial sum, as a norm under sequence parallel leaves it
        halves = torch.randn(2, 3, generator=generator)
        gain.grad = DTensor.from_local(halves[dist.get_rank()], mesh, (Partial(),), run_check=False)
        plain.grad = torch.randn(4, generator=generator)
        optimizer.step()
    result = {f"param.{name}": _saved(param) for name, param in (("weight", weight), ("gain", gain), ("plain", plain))}
    result["moved"] = torch.tensor(not torch.equal(result["param.weight"], whole_weight))
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            result[f"state.{index}.{key}"] = _saved(value)
            if isinstance(value, DTensor):
                result[f"placements.{index}.{key}"] = torch.tensor([isinstance(p, Shard) for p in value.placements])
    return result


def run_case(name: str, case: dict[str, Any], out: Path) -> dict[str, Any]:
    if case.get("embedding"):
        return {"dtensor": _run_embedding(False, case), "local": _run_embedding(True, case), "case": case}
    if case.get("optimizer"):
        return {"torch": _adamw_steps(torch.optim.AdamW, case["amsgrad"]), "local": _adamw_steps(ShardLocalAdamW, case["amsgrad"])}
    return {"dtensor": _run(False, case), "local": _run(True, case), "case": case}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    run_cases(run_case)
