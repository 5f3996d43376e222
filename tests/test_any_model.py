"""Any model, no plan code: transformers causal LMs, a plain nn.Module GPT and a module written for
Lightning's ModelParallelStrategy train under the layouts below with the same per-step losses
(and final weights) as on 1 process.

Three torchrun groups (1, 2 and 4 ranks, real gloo) run every case of tests/hf_worker.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hf_worker import GPT, VOCAB, LitLM, hf_config
from test_parity import _torchrun, adamw_drift
from torch import nn

from lightning_3d.config import ParallelConfig
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.materialize import meta_parameters, owner_init
from lightning_3d.parallel.pipeline_parallel import StageBlocks, cut_stage
from lightning_3d.plans.auto import generic_plan, model_plan
from lightning_3d.plans.hf import hf_plan

WORKER = Path(__file__).with_name("hf_worker.py")
PP = {"pp_schedule": "1f1b", "microbatches": 2}
LR, STEPS = 3e-3, 3
LOSS_RTOL = 1e-4

REFERENCE = {
    "llama": {"options": {"arch": "llama"}, "validate": True, "weights": True},
    "qwen2": {"options": {"arch": "qwen2"}, "validate": True, "weights": True},
    "llama_tied": {"options": {"arch": "llama", "tie_word_embeddings": True}, "validate": True, "weights": True},
    "llama_padded": {"options": {"arch": "llama"}, "padded": True},
    "gpt": {"module": "gpt", "weights": True},
    # architectures beyond Llama and Qwen2
    "qwen3": {"options": {"arch": "qwen3"}, "validate": True, "weights": True},
    "mistral": {"options": {"arch": "mistral"}, "validate": True, "weights": True},
    "gemma": {"options": {"arch": "gemma"}, "validate": True, "weights": True},
    # fused projections gathered after the matmul (colwise_gather_output, rowwise_split_input)
    "phi3": {"options": {"arch": "phi3"}, "validate": True, "weights": True},
    "olmo2": {"options": {"arch": "olmo2"}, "validate": True, "weights": True},
    "tutorial": {"module": "tutorial"},
}


def _layouts(arch: str, layouts: dict[str, dict]) -> dict[str, dict]:
    return {
        f"{arch}_{name}": {"options": {"arch": arch}, "layout": layout, "validate": True, "weights": "pp" not in layout, "reference": arch}
        for name, layout in layouts.items()
    }


TWO_RANKS = {
    **_layouts("llama", {"dp_shard2": {"dp_shard": 2}, "tp2": {"tp": 2}, "pp2": {"pp": 2, **PP}, "cp2": {"cp": 2}}),
    **_layouts("qwen2", {"dp_shard2": {"dp_shard": 2}, "tp2": {"tp": 2}, "pp2": {"pp": 2, **PP}, "cp2": {"cp": 2}}),
    **_layouts("qwen3", {"tp2": {"tp": 2}, "pp2": {"pp": 2, **PP}, "cp2": {"cp": 2}}),
    **_layouts("mistral", {"tp2": {"tp": 2}, "pp2": {"pp": 2, **PP}, "cp2": {"cp": 2}}),
    **_layouts("gemma", {"tp2": {"tp": 2}, "pp2": {"pp": 2, **PP}, "cp2": {"cp": 2}}),
    **_layouts("phi3", {"tp2": {"tp": 2}}),
    **_layouts("olmo2", {"tp2": {"tp": 2}}),
    "llama_tied_pp2": {"options": {"arch": "llama", "tie_word_embeddings": True}, "layout": {"pp": 2, **PP}, "validate": True, "reference": "llama_tied"},
    "llama_tied_tp2": {"options": {"arch": "llama", "tie_word_embeddings": True}, "layout": {"tp": 2}, "validate": True, "weights": True, "reference": "llama_tied"},
    # uneven numbers of scored tokens per rank: the loss stays the global token-weighted mean
    "llama_padded_dp_shard2": {"options": {"arch": "llama"}, "layout": {"dp_shard": 2}, "padded": True, "reference": "llama_padded"},
    "llama_padded_cp2": {"options": {"arch": "llama"}, "layout": {"cp": 2}, "padded": True, "reference": "llama_padded"},
    "gpt_dp_shard2": {"module": "gpt", "layout": {"dp_shard": 2}, "weights": True, "reference": "gpt"},
    # bad input: each a ConfigError before training, on every rank
    "bad_loss_outside_pp2": {"module": "loss_outside", "options": {"arch": "llama"}, "layout": {"pp": 2, **PP}, "error": "did not call the model|called its model with"},
    "bad_plain_tp2": {"module": "gpt", "layout": {"tp": 2}, "error": "tp=2 needs a plan"},
    "bad_plain_pp2": {"module": "gpt", "layout": {"pp": 2, **PP}, "error": "pp=2 needs a plan"},
    "bad_kv_heads_tp2": {"options": {"arch": "llama", "num_key_value_heads": 1}, "layout": {"tp": 2}, "error": "num_key_value_heads=1 is not divisible by parallel.tp=2"},
    "bad_style_tp2": {
        "options": {"arch": "llama", "base_model_tp_plan": {"layers.*.mlp.gate_proj": "packed_colwise"}},
        "layout": {"tp": 2},
        "error": "style 'packed_colwise' for 'layers.*.mlp.gate_proj'",
    },
    # a checkpoint written under one layout loads under another: the same weights, names unchanged
    "llama_tied_reshard_pp2_to_tp2": {"options": {"arch": "llama", "tie_word_embeddings": True}, "layout": {"pp": 2, **PP}, "reshard_to": {"tp": 2}, "steps": 2},
    "qwen2_reshard_tp2_to_cp2": {"options": {"arch": "qwen2"}, "layout": {"tp": 2}, "reshard_to": {"cp": 2}, "steps": 2},
    "bad_ac_op": {"options": {"arch": "llama"}, "layout": {"dp_shard": 2, "activation_checkpoint": "op"}, "error": "activation_checkpoint=op is not supported for transformers"},
    # speed levers and precision on a transformers model
    "llama_dp_shard2_ac_full": {"options": {"arch": "llama"}, "layout": {"dp_shard": 2, "activation_checkpoint": "full"}, "weights": True, "reference": "llama"},
    "llama_tp2_ac_selective": {"options": {"arch": "llama"}, "layout": {"tp": 2, "activation_checkpoint": "selective"}, "weights": True, "reference": "llama"},
    "bad_blocks_pp2": {"options": {"arch": "llama", "num_hidden_layers": 1}, "layout": {"pp": 2, **PP}, "error": "2 stages, more than the 1 blocks"},
}

FOUR_RANKS = {
    **_layouts("llama", {"dp_shard2_tp2": {"dp_shard": 2, "tp": 2}, "tp2_pp2": {"tp": 2, "pp": 2, **PP}}),
    **_layouts("qwen2", {"dp_shard2_tp2": {"dp_shard": 2, "tp": 2}, "tp2_pp2": {"tp": 2, "pp": 2, **PP}}),
    **_layouts("llama", {"cp2_pp2": {"cp": 2, "pp": 2, **PP}, "cp2_tp2": {"cp": 2, "tp": 2}}),
    "llama_padded_cp2_pp2": {"options": {"arch": "llama"}, "layout": {"cp": 2, "pp": 2, **PP}, "padded": True, "reference": "llama_padded"},
    "llama_tied_dp_shard2_pp2": {"options": {"arch": "llama", "tie_word_embeddings": True}, "layout": {"dp_shard": 2, "pp": 2, **PP}, "reference": "llama_tied"},
    # the same module, written for Lightning's ModelParallelStrategy, under ours and under Lightning's
    "tutorial_ours_dp2_tp2": {"module": "tutorial", "layout": {"dp_shard": 2, "tp": 2}, "reference": "tutorial"},
    "tutorial_lightning_dp2_tp2": {"module": "tutorial", "layout": {"dp": 2, "tp": 2}, "lightning": True, "reference": "tutorial"},
}


def _run(tmp_path_factory, name: str, nproc: int, cases: dict) -> dict:
    out_dir = tmp_path_factory.mktemp(name)
    _torchrun(nproc, cases, out_dir, worker=WORKER)
    return {case: torch.load(out_dir / f"{case}.pt", weights_only=False) for case in cases}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory, "any_model_1", 1, {name: {**case, "layout": {}} for name, case in REFERENCE.items()})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _run(tmp_path_factory, "any_model_2", 2, TWO_RANKS)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return _run(tmp_path_factory, "any_model_4", 4, FOUR_RANKS)


def _ok(result: dict) -> dict:
    assert "failed" not in result, result.get("traceback")
    return result


def _drift_ceiling() -> float:
    """How far AdamW (default betas, constant LR) can carry one element of two runs that start equal."""
    return adamw_drift((LR,) * STEPS, 0.9, 0.999)


def _weight_problems(weights: dict, expected: dict) -> list[str]:
    """Same rule as test_parity.weight_problems: at most 0.1% of a tensor's elements past 1e-5, none past the AdamW ceiling."""
    problems = []
    for name, weight in weights.items():
        diff = (weight - expected[name]).abs()
        off, allowed = int((~(diff <= 1e-5)).sum()), max(1, diff.numel() // 1000)
        if off > allowed or not diff.max().item() <= _drift_ceiling():
            problems.append(f"{name}: {off} of {diff.numel()} elements past 1e-5, the largest by {diff.max().item():.3g}")
    return problems


def _assert_parity(result: dict, expected: dict) -> None:
    _ok(result)
    assert len(result["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected["losses"]), rtol=LOSS_RTOL, atol=0.0)
    if "val_loss" in result:
        assert math.isclose(result["val_loss"], expected["val_loss"], rel_tol=LOSS_RTOL)
    if "weights" in result:
        assert result["weights"].keys() == expected["weights"].keys()
        problems = _weight_problems(result["weights"], expected["weights"])
        assert not problems, "final weights differ:\n" + "\n".join(problems)


def test_reference_runs_learn(reference):
    for name in ("llama", "qwen2", "llama_tied", "gpt"):
        losses = _ok(reference[name])["losses"]
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    # the plain GPT learns visibly in 3 steps; every run starts near ln(vocab) from its own init
    assert reference["gpt"]["losses"][-1] < reference["gpt"]["losses"][0]
    assert abs(reference["llama"]["losses"][0] - math.log(VOCAB)) < 0.1


@pytest.mark.parametrize("case", [name for name, case in TWO_RANKS.items() if "reference" in case])
def test_two_rank_parity(case, reference, two_ranks):
    _assert_parity(two_ranks[case], reference[TWO_RANKS[case]["reference"]])


@pytest.mark.parametrize("case", [name for name, case in FOUR_RANKS.items() if "reference" in case])
def test_four_rank_parity(case, reference, four_ranks):
    _assert_parity(four_ranks[case], reference[FOUR_RANKS[case]["reference"]])


@pytest.mark.parametrize("case", [name for name, case in TWO_RANKS.items() if "error" in case])
def test_bad_input_is_a_clear_error(case, two_ranks):
    result = two_ranks[case]
    assert result.get("type") == "ConfigError", result.get("traceback")
    assert re.search(TWO_RANKS[case]["error"], result["failed"]), result["failed"]


@pytest.mark.parametrize("case", [name for name, case in TWO_RANKS.items() if "reshard_to" in case])
def test_checkpoint_moves_between_layouts(case, two_ranks):
    result = _ok(two_ranks[case])
    assert result["saved_names"] == result["loaded_names"] and "model.model.layers.3.mlp.up_proj.weight" in result["saved_names"]
    assert result["max_difference"] == 0.0


# ----------------------------------------------------------------------------- derived plans, no processes


def _meta(arch: str, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with meta_parameters():
        return AutoModelForCausalLM.from_config(hf_config(arch, **overrides))


def test_llama_plan_comes_from_what_the_model_declares():
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = hf_plan(_meta("llama"), "model", tp=2)
    assert plan.blocks == "model.layers" and plan.attention == "self_attn"
    assert plan.first_stage == ["model.embed_tokens"] and plan.last_stage == ["model.norm", "lm_head"]
    assert sorted(plan.block_tp) == sorted(
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )
    assert isinstance(plan.block_tp["self_attn.q_proj"], ColwiseParallel) and isinstance(plan.block_tp["mlp.down_proj"], RowwiseParallel)
    assert isinstance(plan.top_tp["lm_head"], ColwiseParallel)  # colwise_gather_output
    assert plan.fsdp_units == [["model.embed_tokens"], ["model.norm", "lm_head"]]


def test_tied_head_stays_whole_and_shares_the_root_unit():
    plan = hf_plan(_meta("llama", tie_word_embeddings=True), "model", tp=2)
    assert "lm_head" not in plan.top_tp and plan.fsdp_units == []


def test_qwen3_head_norms_get_their_gradient_summed_over_tp():
    from torch.distributed.tensor.parallel import SequenceParallel

    plan = hf_plan(_meta("qwen3"), "model", tp=2)
    assert isinstance(plan.block_tp["self_attn.q_norm"], SequenceParallel)  # replicated_with_grad_allreduce


def test_an_unknown_style_names_itself_and_the_module():
    with pytest.raises(ConfigError, match=r"'packed_colwise' for 'layers\.\*\.mlp\.gate_proj'.*supported"):
        hf_plan(_meta("llama", base_model_tp_plan={"layers.*.mlp.gate_proj": "packed_colwise"}), "model", tp=2)


def test_plain_module_blocks_are_its_largest_module_list():
    plan = generic_plan(nn.ModuleDict({"model": GPT()}), ParallelDims.from_config(ParallelConfig(), 1))
    assert (plan.root, plan.blocks) == ("model", "blocks")
    with pytest.raises(ConfigError, match="cp=2 needs a plan"):
        generic_plan(nn.ModuleDict({"model": GPT()}), ParallelDims.from_config(ParallelConfig(cp=2, dp_shard=1), 2))


def test_model_plan_picks_the_transformers_model_of_a_user_module():
    module = LitLM("qwen2")
    with meta_parameters():
        module.configure_model()
    derived = model_plan(module, ParallelConfig(), ParallelDims.from_config(ParallelConfig(), 1))
    assert derived.kind == "transformers" and derived.plan.root == "model"


def test_stage_blocks_keep_original_indices_and_slice_like_a_list():
    model = _meta("llama")
    plan = hf_plan(model, "model", tp=1)
    stage = cut_stage(model, plan, [2, 3], is_first=False, is_last=True)
    layers = stage.model.layers
    assert isinstance(layers, StageBlocks) and list(layers._modules) == ["2", "3"]
    assert len(layers[:4]) == 2 and layers[0] is layers._modules["2"]
    names = [name for name, _ in stage.named_parameters()]
    assert "model.layers.2.self_attn.q_proj.weight" in names and not any(n.startswith("model.embed_tokens") for n in names)


def test_initial_weights_follow_the_models_own_rule_per_name():
    model = _meta("llama")
    init = owner_init(model, "model", model._init_weights)

    def draw(name: str, seed: int) -> torch.Tensor:
        full = torch.empty(model.get_parameter(name.removeprefix("model.")).shape)
        init(name, full, torch.Generator().manual_seed(seed))
        return full

    q = draw("model.model.layers.1.self_attn.q_proj.weight", 7)
    assert torch.equal(q, draw("model.model.layers.1.self_attn.q_proj.weight", 7))  # a function of (name, seed)
    assert abs(q.std().item() - model.config.initializer_range) < 0.005  # the model's own normal(0, initializer_range)
    assert torch.equal(draw("model.model.norm.weight", 7), torch.ones(32))  # RMSNorm: ones


def test_weights_loaded_in_configure_model_are_read_from_their_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_3d.pretrained import FolderInit

    AutoModelForCausalLM.from_config(hf_config("llama")).save_pretrained(tmp_path)

    class Pretrained(LitLM):
        def configure_model(self):
            self.model = AutoModelForCausalLM.from_pretrained(tmp_path)

    module = Pretrained()
    with meta_parameters():
        module.configure_model()
    assert all(param.is_meta for param in module.parameters())  # nothing loaded twice, nothing held
    derived = model_plan(module, ParallelConfig(), ParallelDims.from_config(ParallelConfig(), 1))
    assert isinstance(derived.init_fn, FolderInit) and derived.init_fn.folder.path == tmp_path and not derived.problems


def test_a_model_from_a_hub_name_is_refused(tmp_path):
    module = LitLM("llama")
    with meta_parameters():
        module.configure_model()
    module.model.config._name_or_path = "meta-llama/Llama-3.2-1B"  # as from_pretrained("<hub id>") leaves it
    with pytest.raises(ConfigError, match=r"built from 'meta-llama/Llama-3\.2-1B', which is not a local folder"):
        model_plan(module, ParallelConfig(), ParallelDims.from_config(ParallelConfig(), 1))
