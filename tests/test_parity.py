"""Loss and weight parity: the debug recipe on 1 process vs every parallel layout.

Each group of ranks is launched once with torchrun (real gloo process groups on CPU) and
trains several layouts one after another (tests/parity_worker.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fork_launch import free_port
from omegaconf import OmegaConf

from lightning_3d.bench.measure import compose_config
from lightning_3d.config import ModelConfig
from lightning_3d.flops import flops_per_token
from lightning_3d.module import adamw_with_schedule
from lightning_3d.train import CONF_DIR

WORKER = Path(__file__).with_name("parity_worker.py")
FORK_LAUNCH = Path(__file__).with_name("fork_launch.py")
DEBUG = ["recipe=debug"]
TIED = ["model.tie_embeddings=true"]


def pp(degree: int, schedule: str, stages_per_rank: int = 1) -> list[str]:
    return [f"parallel.pp={degree}", f"parallel.pp_schedule={schedule}", f"parallel.stages_per_rank={stages_per_rank}"]


# reference runs on one process; every parallel case names the one it must match
ONE_RANK = {
    "single": DEBUG,
    "single_tied": DEBUG + TIED,
    "single_8_layers": DEBUG + ["model.n_layers=8"],
    "single_6_layers": DEBUG + ["model.n_layers=6"],
    "single_batch16": DEBUG + ["data.global_batch_size=16"],
    # a speed lever on one process, with a peak FLOP/s given so that MFU is logged
    "single_ac_full_peak_flops": DEBUG + ["perf.activation_checkpoint=full", "perf.peak_flops=1.0e12"],
}
REFERENCE = {"_tied": "single_tied", "_8_layers": "single_8_layers", "_6_layers": "single_6_layers", "_batch16": "single_batch16"}

TWO_RANKS = {
    "dp_shard2": DEBUG + ["parallel.dp_shard=2"],
    "tp2": DEBUG + ["parallel.dp_shard=1", "parallel.tp=2"],
    "ddp2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
    "gpipe_pp2_sanity_check": DEBUG + pp(2, "gpipe") + ["parallel.dp_shard=1", "trainer.num_sanity_val_steps=1"],
    "1f1b_pp2_explicit_uneven": DEBUG + pp(2, "1f1b") + ["parallel.dp_shard=1", "parallel.pp_layers=[[0],[1,2,3]]"],
    "looped_bfs_pp2": DEBUG + pp(2, "looped_bfs", 2) + ["parallel.dp_shard=1"],
    "interleaved_zero_bubble_pp2": DEBUG + pp(2, "interleaved_zero_bubble", 2) + ["parallel.dp_shard=1"],
    "zbv_pp2": DEBUG + pp(2, "zbv", 2) + ["parallel.dp_shard=1"],
    "dualpipev_pp2": DEBUG + pp(2, "dualpipev", 2) + ["parallel.dp_shard=1"],
    "cp2_ring": DEBUG + ["parallel.cp=2", "parallel.dp_shard=1"],
    # the tied embedding and head on different stages: one copy each, gradients summed between them
    "1f1b_pp2_tied": DEBUG + TIED + pp(2, "1f1b") + ["parallel.dp_shard=1"],
    "cp2_allgather": DEBUG + ["parallel.cp=2", "parallel.dp_shard=1", "parallel.cp_backend=allgather"],
    "dp_shard2_bf16_mixed": DEBUG + ["parallel.dp_shard=2", "trainer.precision=bf16-mixed"],
    "tp2_bf16_true": DEBUG + ["parallel.tp=2", "trainer.precision=bf16-true"],
    # speed levers: the same losses and weights with each switched on
    "tp2_ac_op": DEBUG + ["parallel.dp_shard=1", "parallel.tp=2", "perf.activation_checkpoint=op"],
    "cp2_ring_ac_full": DEBUG + ["parallel.cp=2", "parallel.dp_shard=1", "perf.activation_checkpoint=full"],
    "dp_shard2_cpu_offload": DEBUG + ["parallel.dp_shard=2", "perf.cpu_offload=true"],
    "dp_shard2_compile_ac_selective": DEBUG + ["parallel.dp_shard=2", "perf.compile=true", "perf.activation_checkpoint=selective"],
    "1f1b_pp2_compile": DEBUG + pp(2, "1f1b") + ["parallel.dp_shard=1", "perf.compile=true"],
}
FOUR_RANKS = {
    "dp_shard2_tp2": DEBUG + ["parallel.dp_shard=2", "parallel.tp=2"],
    "hsdp2x2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=2"],
    "tp4_loss_parallel": DEBUG + ["parallel.tp=4", "parallel.loss_parallel=true"],
    "ddp2_tp2_no_sp": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.tp=2", "parallel.sequence_parallel=false"],
    "dp_shard4_no_reshard": DEBUG + ["parallel.dp_shard=4", "parallel.reshard_after_forward=false"],
    "dp_shard2_tp2_tied": DEBUG + TIED + ["parallel.dp_shard=2", "parallel.tp=2"],
    # every tensor-parallel case above multiplies local shards (perf.tp_local_linears); this one DTensors
    "dp_shard2_tp2_dtensor_linears": DEBUG + ["parallel.dp_shard=2", "parallel.tp=2", "perf.tp_local_linears=false"],
    "1f1b_pp4_8_layers": DEBUG + pp(4, "1f1b") + ["parallel.dp_shard=1", "model.n_layers=8"],
    "1f1b_pp4_uneven_6_layers": DEBUG + pp(4, "1f1b") + ["parallel.dp_shard=1", "model.n_layers=6"],
    # accumulate_grad_batches=2 over a global batch of 16 = one batch of 16
    "dp_shard2_pp2_accumulate2_batch16": DEBUG
    + pp(2, "1f1b")
    + ["parallel.dp_shard=2", "data.global_batch_size=16", "trainer.accumulate_grad_batches=2"],
    "dp_shard4_accumulate2_batch16": DEBUG + ["parallel.dp_shard=4", "data.global_batch_size=16", "trainer.accumulate_grad_batches=2"],
    "cp4_ring": DEBUG + ["parallel.cp=4", "parallel.dp_shard=1"],
    "cp2_tp2": DEBUG + ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"],
    "dp_shard2_tp2_ac_full": DEBUG + ["parallel.dp_shard=2", "parallel.tp=2", "perf.activation_checkpoint=full"],
    "dp_shard4_prefetch2": DEBUG + ["parallel.dp_shard=4", "perf.fsdp_prefetch=2"],
    # two blocks per FSDP2 unit (a debug block holds 0.157 MiB); replicate units of one block each
    # (DDP-style layouts group blocks into 25 MiB units unless told otherwise)
    "hsdp2x2_units_of_2_blocks_prefetch2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=2", "perf.dp_unit_min_mb=0.2", "perf.fsdp_prefetch=2"],
    "ddp2_tp2_unit_per_block": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.tp=2", "perf.dp_unit_min_mb=0"],
    "1f1b_dp_shard2_pp2_ac_op": DEBUG + pp(2, "1f1b") + ["parallel.dp_shard=2", "perf.activation_checkpoint=op"],
}
EIGHT_RANKS = {
    "interleaved_1f1b_dp_shard2_tp2_pp2": DEBUG + pp(2, "interleaved_1f1b", 2) + ["parallel.dp_shard=2", "parallel.tp=2"],
    "cp2_tp2_pp2": DEBUG + pp(2, "1f1b") + ["parallel.cp=2", "parallel.tp=2", "parallel.dp_shard=1"],
    "dp_shard2_cp2_pp2": DEBUG + pp(2, "1f1b") + ["parallel.cp=2", "parallel.dp_shard=2"],
    "1f1b_hsdp2_tp2_pp2": DEBUG + pp(2, "1f1b") + ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.tp=2"],
}
TWO_NODES = {"two_nodes_hsdp2x2": DEBUG + ["parallel.dp_replicate=2", "parallel.dp_shard=2"]}

LOSS_RTOL = 1e-4
# final weights: every element within WEIGHT_ATOL of the 1-process run, except at most
# AMPLIFIED_FRACTION of a tensor's elements (at least one), which AdamW may have carried
# up to adamw_drift_ceiling() away on reduction-order noise (see weight_problems)
WEIGHT_ATOL = 1e-5
AMPLIFIED_FRACTION = 1e-3


def _torchrun(nproc: int, cases: dict[str, list[str]], out_dir: Path, nnodes: int = 1, worker: Path = WORKER) -> None:
    """Launch ``nproc`` ranks on each of ``nnodes`` nodes of this machine and wait for all of them.

    One node: the ranks are forked from one process that imported the stack once
    (tests/fork_launch.py). Several nodes: one torchrun agent per node, with a rendezvous.
    """
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a crash prints its Python stack
    agents = []
    for node_rank in range(nnodes):
        rendezvous = ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        command = (
            [sys.executable, str(FORK_LAUNCH), str(nproc), str(worker)]
            if nnodes == 1
            else [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc-per-node", str(nproc), str(worker)]
        )
        log = open(out_dir / f"node{node_rank}.log", "w")
        agents.append((subprocess.Popen([*command, str(out_dir), json.dumps(cases)], stdout=log, stderr=subprocess.STDOUT, env=env), log))
    failed = []
    for process, log in agents:
        if process.wait(timeout=600) != 0:
            failed.append(log.name)
        log.close()
    if failed:
        tails = "\n".join(Path(name).read_text()[-4000:] for name in failed)
        pytest.fail(f"rank group failed ({failed}):\n{tails}")


def _results(tmp_path_factory: pytest.TempPathFactory, name: str, nproc: int, cases: dict, nnodes: int = 1) -> dict:
    out_dir = tmp_path_factory.mktemp(name)
    _torchrun(nproc, cases, out_dir, nnodes)
    results = {case: torch.load(out_dir / f"{case}.pt", weights_only=True) for case in cases}
    results["collectives"] = torch.load(out_dir / "collectives.pt", weights_only=True)
    return results


@pytest.fixture(scope="module")
def eight_ranks(tmp_path_factory):
    return _results(tmp_path_factory, "eight_ranks", 8, EIGHT_RANKS)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    return _results(tmp_path_factory, "two_nodes", 2, TWO_NODES, nnodes=2)


def _reference_for(case: str, reference: dict) -> dict:
    names = [name for suffix, name in REFERENCE.items() if case.endswith(suffix)]
    return reference[names[0] if names else "single"]


@functools.cache
def _debug_config():
    return compose_config(Path("unused"), DEBUG, devices=1)


def debug_adamw(params: list[torch.nn.Parameter]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The debug recipe's AdamW and LR schedule over ``params``: the run's own config and builder."""
    config = _debug_config()
    return adamw_with_schedule(params, config.optim, config.trainer.max_steps)


@functools.cache
def debug_lrs() -> tuple[float, ...]:
    """The LR AdamW applies at each step of the debug recipe (5e-4, 1e-3, 1e-3, 8.7e-4, 5.5e-4, 2.3e-4)."""
    optimizer, schedule = debug_adamw([torch.zeros(1, 1, requires_grad=True)])
    lrs = []
    for _ in range(_debug_config().trainer.max_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradient: changes nothing, but the schedule expects it first
        schedule.step()
    return tuple(lrs)


@functools.cache
def adamw_drift_ceiling() -> float:
    """How far apart AdamW can carry one element of two runs that start equal, whatever their
    gradients: 2 · Σ_t c_t · lr_t over the debug recipe's schedule (8.3e-3).

    Step t moves an element by lr_t · m̂/(√v̂ + eps) (decoupled weight decay only shrinks a
    gap). By Cauchy-Schwarz over Adam's two averages, |m̂|/√v̂ ≤ c_t (below) whatever the
    size of the gradients (c_1 = 1, c_6 = 1.004 for betas (0.9, 0.95)), and eps only lowers
    the ratio, so the two runs can move an element c_t · lr_t each, in opposite directions.
    """
    beta1, beta2 = _debug_config().optim.betas
    return adamw_drift(debug_lrs(), beta1, beta2)


def adamw_drift(lrs: tuple[float, ...], beta1: float, beta2: float) -> float:
    """2 · Σ_t c_t · lr_t: how far AdamW can carry one element of two runs with these per-step LRs."""
    ceiling = 0.0
    for t, lr in enumerate(lrs, start=1):
        c_t = (1 - beta1) / (1 - beta1**t) * math.sqrt((1 - beta2**t) / (1 - beta2) * sum((beta1**2 / beta2) ** k for k in range(t)))
        ceiling += 2 * c_t * lr
    return ceiling


def weight_problems(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """The tensors of ``weights`` further from ``expected`` than reduction-order noise explains.

    Two layouts add the same numbers in another order, so their gradients differ by fp32
    rounding. AdamW passes that on unchanged almost everywhere: its update
    lr · m̂/(√v̂ + eps) changes as little as the gradient does, relatively, and the two-
    and four-rank layouts end within 4e-6 of 1 process. Hence WEIGHT_ATOL for every element
    but a few. Where a gradient is near or below eps at some step, the update is ≈ lr · g/eps:
    a gradient difference δg becomes a weight difference lr · δg/eps. Measured on an AMD EPYC CPU:
    element (18, 27) of layers.2.attention.wv.weight had a step-0 gradient of 1.2e-9 (the
    tensor's median is 1.7e-3) and dp_shard2_tp2_tied ended 2.2e-5 from 1 process there
    (test_a_gradient_below_eps_amplifies_noise_past_weight_atol). Such an element can end
    anywhere up to adamw_drift_ceiling(), and nothing in the saved results tells it apart
    (its final √v is at the tensor's 36th percentile: the later steps' gradients were
    ordinary), so a tensor passes when

    - at most AMPLIFIED_FRACTION of its elements, and at least one, differ by more than
      WEIGHT_ATOL. 9e-5 of the elements have a first-step gradient below eps (18 of 197184
      in the tied 1-process run; at later steps m̂ and v̂ carry the earlier gradients and
      damp this), so a tensor stays 10x under even if all of them went past WEIGHT_ATOL
      (in the whole suite one does). An error in a layout changes most of what it
      touches: a shard that missed the last optimizer step has 93% of its elements beyond
      WEIGHT_ATOL (test_weight_check_catches_a_stale_shard), a parameter whose gradient was
      halved on the last step 58%, and the smallest piece a layout owns, one row of the
      512 x 64 embedding, is 0.2% of it;
    - none differs by more than adamw_drift_ceiling().
    """
    ceiling, problems = adamw_drift_ceiling(), []
    for name, weight in weights.items():
        if weight.shape != expected[name].shape:
            problems.append(f"{name}: shape {tuple(weight.shape)}, expected {tuple(expected[name].shape)}")
            continue
        diff = (weight - expected[name]).abs()
        off = int((~(diff <= WEIGHT_ATOL)).sum())  # NaN counts as off
        allowed = max(1, int(AMPLIFIED_FRACTION * diff.numel()))
        worst = diff.max().item()
        if off > allowed or not worst <= ceiling:
            index = tuple(int(i) for i in torch.unravel_index(diff.nan_to_num(math.inf).argmax(), diff.shape))
            problems.append(
                f"{name}: {off} of {diff.numel()} elements differ by more than {WEIGHT_ATOL:g} (at most {allowed} may), "
                f"the largest by {worst:.3g} at {index} (at most {ceiling:.3g} may)"
            )
    return problems


def assert_parity(result: dict, expected: dict) -> None:
    losses, expected_losses = torch.tensor(result["losses"]), torch.tensor(expected["losses"])
    assert len(losses) == 6
    torch.testing.assert_close(losses, expected_losses, rtol=LOSS_RTOL, atol=0.0)
    torch.testing.assert_close(result["val_loss"], expected["val_loss"], rtol=LOSS_RTOL, atol=0.0)
    assert result["weights"].keys() == expected["weights"].keys()
    problems = weight_problems(result["weights"], expected["weights"])
    assert not problems, "final weights differ:\n" + "\n".join(problems)


def test_reference_learns(reference):
    losses = reference["single"]["losses"]
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("case", [c for c in TWO_RANKS if "bf16" not in c])
def test_two_rank_parity(case, reference, two_ranks):
    assert_parity(two_ranks[case], _reference_for(case, reference))


@pytest.mark.parametrize("case", list(FOUR_RANKS))
def test_four_rank_parity(case, reference, four_ranks):
    assert_parity(four_ranks[case], _reference_for(case, reference))


@pytest.mark.parametrize("case", list(EIGHT_RANKS))
def test_eight_rank_parity(case, reference, eight_ranks):
    assert_parity(eight_ranks[case], _reference_for(case, reference))


@pytest.mark.parametrize("case", [c for c in TWO_RANKS if "bf16" in c])
def test_bf16_tracks_fp32(case, reference, two_ranks):
    # bf16 rounds every matmul input: close to the fp32 run, not equal
    losses = torch.tensor(two_ranks[case]["losses"])
    torch.testing.assert_close(losses, torch.tensor(reference["single"]["losses"]), rtol=3e-2, atol=0.0)
    assert all(w.dtype == torch.float32 for w in two_ranks[case]["weights"].values())


def test_activation_checkpointing_on_one_process_keeps_the_losses(reference):
    assert_parity(reference["single_ac_full_peak_flops"], reference["single"])


def test_per_step_metrics_count_each_device_its_share(reference, four_ranks):
    # dp_shard=2 × tp=2: a step's 8 × 32 tokens are the work of 4 devices, 64 each
    metrics = four_ranks["dp_shard2_tp2_ac_full"]["metrics"]
    assert metrics["train/lengths"] == 6 * 8 * 32 / 4
    assert metrics["train/samples"] == 6 * 8 / 4
    assert metrics["train/items_per_sec"] == pytest.approx(4 * metrics["train/device/items_per_sec"])
    assert metrics["train/device/items_per_sec"] > 0
    assert 0 < metrics["grad_norm"] < float("inf") and metrics["memory/peak_gib_max"] > 0.05
    assert metrics["lr-AdamW/pg1"] > 0
    assert "train/device/mfu" not in metrics  # a CPU has no peak in the table and none was given


@pytest.mark.parametrize(
    "group, case",
    [("two_ranks", "tp2"), ("four_ranks", "dp_shard2_tp2"), ("four_ranks", "cp2_tp2"), ("eight_ranks", "cp2_tp2_pp2")],
)
def test_logged_grad_norm_is_the_global_norm(group, case, reference, request):
    # with sequence parallel the norm weights' gradients are partial sums until reduced:
    # a norm taken from the parts was 4e-5 off, more than the weights differ
    norm = request.getfixturevalue(group)[case]["metrics"]["grad_norm"]
    assert norm == pytest.approx(_reference_for(case, reference)["metrics"]["grad_norm"], rel=1e-5)


def test_flops_and_mfu_follow_tokens_per_second(reference):
    metrics = reference["single_ac_full_peak_flops"]["metrics"]
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF_DIR / "model" / "debug.yaml")))
    per_token = flops_per_token(model, 32)
    assert metrics["train/lengths"] == 6 * 8 * 32
    assert metrics["train/device/flops_per_sec"] == pytest.approx(metrics["train/device/items_per_sec"] * per_token, rel=1e-9)
    assert metrics["train/device/mfu"] == pytest.approx(metrics["train/device/flops_per_sec"] / 1.0e12, rel=1e-12)


def test_two_node_loopback_parity(reference, two_nodes):
    assert_parity(two_nodes["two_nodes_hsdp2x2"], reference["single"])



def test_tied_weights_stay_tied(reference, two_ranks, four_ranks):
    for result in (reference["single_tied"], two_ranks["1f1b_pp2_tied"], four_ranks["dp_shard2_tp2_tied"]):
        assert torch.equal(result["weights"]["output.weight"], result["weights"]["tok_embeddings.weight"])


def test_strategy_collectives_and_mesh(eight_ranks):
    # recorded after the last 8-rank case, dp_replicate=2 × tp=2 × pp=2: pp is the outermost
    # mesh dim and tp the innermost, so ranks (0,1), (2,3) load slices 0, 1 on stage 0 and
    # ranks (4,5), (6,7) the same slices on stage 1
    records = eight_ranks["collectives"]
    # reduce and all_gather run over the ranks holding distinct data (dp_replicate: {4, 6} and {5, 7}
    # on the last stage) and every rank takes the last stage's result
    assert [r["reduce_sum"] for r in records] == [10.0, 12.0] * 4
    assert [r["reduce_mean"] for r in records] == [5.0, 6.0] * 4
    assert [r["all_gather"] for r in records] == [[4, 6], [5, 7]] * 4
    assert [r["broadcast"] for r in records] == [{"from": 0}] * 8
    assert [r["sampler"] for r in records] == [{"num_replicas": 2, "rank": dp} for dp in (0, 0, 1, 1, 0, 0, 1, 1)]
    assert records[0]["mesh_dims"] == ("pp", "dp_replicate", "dp_shard", "cp", "tp")


# ----------------------------------------------------------------------------- the weight tolerance


def _train(grads: torch.Tensor) -> torch.Tensor:
    """A weight matrix after the debug recipe's AdamW steps with these gradients (one per step)."""
    weight = torch.nn.Parameter(torch.full(grads.shape[1:], 0.02, dtype=torch.float64))
    optimizer, schedule = debug_adamw([weight])
    for grad in grads:
        weight.grad = grad.to(torch.float64)
        optimizer.step()
        schedule.step()
    return weight.detach()


def test_adamw_drift_ceiling_is_as_far_as_adamw_can_carry_two_runs():
    steps = len(debug_lrs())
    # one run's gradient always positive, the other's always negative (noise around a zero
    # gradient can be that) reach it
    grads = torch.full((steps, 1, 1), 1e-3)
    drift = (_train(grads) - _train(-grads)).abs().item()
    assert 0.99 * adamw_drift_ceiling() < drift <= adamw_drift_ceiling()
    # gradients of any sign and size, from 1e-12 to 1e-1, never pass it
    generator = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(steps, 100, 100, generator=generator) * 10 ** torch.empty(steps, 100, 100).uniform_(-12, -1, generator=generator)
        for _ in "ab"
    )
    assert (_train(a) - _train(b)).abs().max().item() <= adamw_drift_ceiling()


def test_a_gradient_below_eps_amplifies_noise_past_weight_atol():
    # element (18, 27) of layers.2.attention.wv.weight in the 1-process tied run (measured on an AMD EPYC CPU):
    # its clipped gradient at each step; the tensor's median gradient is 1.7e-3
    grads = torch.tensor([1.22e-9, -2.82e-3, 1.21e-4, 3.38e-3, -3.44e-4, -1.69e-3])[:, None, None]
    noise = torch.zeros_like(grads)
    noise[0] = 5e-10  # 3e-7 of the median gradient: the size of a change of summation order
    assert WEIGHT_ATOL < (_train(grads + noise) - _train(grads)).abs().item() < adamw_drift_ceiling()
    # the same noise on an ordinary first gradient is lost in the weight's own rounding
    grads[0] = 1.7e-3
    assert (_train(grads + noise) - _train(grads)).abs().item() < 1e-9


def last_step_undone(result: dict, name: str, rows: slice) -> dict:
    """``result`` with the last AdamW step of weight ``name`` undone on ``rows``, from the
    run's own optimizer state: what a layout whose shard missed that step would save."""
    optim = result["optimizer"]
    t = int(optim[f"state.model.{name}.step"])
    beta1, beta2 = optim[f"param_groups.model.{name}.betas"]
    eps, decay = optim[f"param_groups.model.{name}.eps"], optim[f"param_groups.model.{name}.weight_decay"]
    m_hat = optim[f"state.model.{name}.exp_avg"] / (1 - beta1**t)
    v_hat = optim[f"state.model.{name}.exp_avg_sq"] / (1 - beta2**t)
    lr, weight = debug_lrs()[t - 1], result["weights"][name].clone()
    # AdamW's step was: weight ← weight · (1 - lr · decay) - lr · m̂/(√v̂ + eps)
    weight[rows] = (weight[rows] + lr * (m_hat / (v_hat.sqrt() + eps))[rows]) / (1 - lr * decay)
    return {**result, "weights": {**result["weights"], name: weight}}


@pytest.mark.parametrize(
    "name, rows",
    # the rows one of the two tensor-parallel ranks holds of the tensor where that element sits
    # amplified; the whole of a 64-element norm gain (which may have 1 element off)
    [("layers.2.attention.wv.weight", slice(0, 32)), ("layers.3.ffn_norm.weight", slice(None))],
    ids=["wv_tp_shard", "norm_gain"],
)
def test_weight_check_catches_a_stale_shard(name, rows, reference, four_ranks):
    # the dp_shard=2 × tp=2 tied layout, with only reduction-order noise: it passes ...
    noisy, expected = four_ranks["dp_shard2_tp2_tied"], reference["single_tied"]
    assert_parity(noisy, expected)
    # ... and fails when one shard of one weight missed the last optimizer step
    with pytest.raises(AssertionError, match=name):
        assert_parity(last_step_undone(noisy, name, rows), expected)

