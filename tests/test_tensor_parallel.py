"""The local tensor-parallel styles (``perf.tp_local_linears``) against torch's own.

Two gloo ranks on a tp=2 mesh; every case is one forward and backward of a small MLP under
``ColwiseParallel`` / ``RowwiseParallel`` and under ``LocalColwiseLinear`` / ``LocalRowwiseLinear``
with the same layouts, and a LayerNorm under ``SequenceParallel`` / ``LocalSequenceParallel``:
outputs, input gradients and parameter gradients must agree, also where two column-wise layers
read one prepared input (their shared local view). An ``nn.Embedding`` under
``RowwiseParallel`` and ``LocalRowwiseEmbedding``: the same outputs and weight gradients. ``ShardLocalAdamW`` takes three
steps beside torch's AdamW on the same DTensor and plain parameters: the same parameters and
states. Whole
models train to the 1-process losses with the local styles in every tensor-parallel case of
tests/test_parity.py and tests/test_any_model.py (the default), and with DTensor's in
``dp_shard2_tp2_dtensor_linears``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_parity import _torchrun

WORKER = Path(__file__).with_name("tensor_parallel_worker.py")
BASE = {"bias": False, "residual": "replicate", "up_out": "last", "up_local": True, "down_in": "last", "down_local": True, "prepare": True,
        "norm": False, "norm_local": False}
CASES = {
    "replicated_residual": BASE,
    "sequence_parallel": {**BASE, "residual": "sequence"},
    "sequence_parallel_no_prepare": {**BASE, "residual": "sequence", "prepare": False},
    "biases": {**BASE, "bias": True},
    "biases_sequence_parallel": {**BASE, "bias": True, "residual": "sequence"},
    # the output of a row-wise layer kept as a DTensor; a column-wise layer gathering its output
    # a norm under SequenceParallel on this rank's tokens, its output a DTensor or a plain tensor
    "norm_sequence_parallel": {**BASE, "residual": "sequence", "prepare": False, "norm": True},
    "norm_sequence_parallel_local_output": {**BASE, "residual": "sequence", "norm": True, "norm_local": True},
    "norm_sequence_parallel_biases": {**BASE, "bias": True, "residual": "sequence", "prepare": False, "norm": True},
    "dtensor_output": {**BASE, "down_local": False},
    "colwise_gathers_output": {**BASE, "up_out": "replicate", "down_in": "replicate"},
    "colwise_dtensor_output": {**BASE, "up_local": False},
    # two column-wise layers read the prepared input: their local views are one, whose gradient
    # is the sum of both layers' (as q, k, v and gate, up in a Llama block)
    "two_readers_of_one_input": {**BASE, "gated": True},
    "two_readers_sequence_parallel": {**BASE, "gated": True, "residual": "sequence"},
    # no PrepareModuleInput (the Llama plan's without sequence parallel, under local layers): the
    # two column-wise layers read one plain activation (a LayerNorm's output, also added to the
    # output) and reduce their summed input gradient once
    "two_readers_of_a_plain_activation": {**BASE, "gated": True, "prepare": False, "plain_norm": True, "skip": True},
}
# all-reduces in the local path's backward: a case's column-wise input reduction, once however many layers read it
BACKWARD_ALL_REDUCES = {"replicated_residual": 1, "two_readers_of_one_input": 1, "two_readers_of_a_plain_activation": 1}
EMBEDDING = {"embedding": True, "vocab": 10, "padding_idx": None, "out": "replicate", "local_output": True}
EMBEDDING_CASES = {
    "embedding_replicated_output": EMBEDDING,
    # the padding row in rank 1's block; the output reduce-scattered into sequence shards
    "embedding_padding_sequence_parallel": {**EMBEDDING, "padding_idx": 7, "out": "sequence"},
    "embedding_dtensor_output": {**EMBEDDING, "local_output": False},
    "embedding_uneven_vocabulary": {**EMBEDDING, "vocab": 9},  # 9 rows on 2 ranks: DTensor's path
}
OPTIMIZER_CASES = {"adamw": {"optimizer": True, "amsgrad": False}, "adamw_amsgrad": {"optimizer": True, "amsgrad": True}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("local_linears")
    cases = CASES | EMBEDDING_CASES | OPTIMIZER_CASES
    _torchrun(2, cases, out_dir, worker=WORKER)
    return {case: torch.load(out_dir / f"{case}.pt", weights_only=True) for case in cases}


@pytest.mark.parametrize("case", list(CASES))
def test_local_linears_match_dtensor_styles(case, results):
    result = results[case]
    assert "failed" not in result, result.get("traceback")
    dtensor, local = result["dtensor"], result["local"]
    # the local styles replaced the forward of up, down and (when it has a style) norm
    assert local["local_forward"].tolist() == [True, True, result["case"]["norm"]]
    assert not dtensor["local_forward"].any()
    assert bool(local["y_is_dtensor"]) == bool(dtensor["y_is_dtensor"])
    assert set(local) - {"backward_all_reduces"} == set(dtensor)
    if case in BACKWARD_ALL_REDUCES:
        assert int(local["backward_all_reduces"]) == BACKWARD_ALL_REDUCES[case]
    for key in set(dtensor) - {"local_forward"}:
        torch.testing.assert_close(local[key], dtensor[key], rtol=1e-6, atol=1e-6, msg=f"{case}: {key}")


@pytest.mark.parametrize("case", list(EMBEDDING_CASES))
def test_local_embedding_matches_dtensor_rowwise(case, results):
    """LocalRowwiseEmbedding = RowwiseParallel's masked lookup: the same output (all-reduced or
    reduce-scattered, plain or DTensor) and weight gradient, the padding row's gradient zero; an
    uneven vocabulary keeps DTensor's path."""
    result = results[case]
    assert "failed" not in result, result.get("traceback")
    dtensor, local = result["dtensor"], result["local"]
    assert bool(local["local_forward"]) == (result["case"]["vocab"] % 2 == 0)
    assert not bool(dtensor["local_forward"])
    assert bool(local["y_is_dtensor"]) == bool(dtensor["y_is_dtensor"])
    for key in ("y", "grad.weight"):
        torch.testing.assert_close(local[key], dtensor[key], rtol=1e-6, atol=1e-6, msg=f"{case}: {key}")
    assert local["grad.weight"].abs().sum() > 0
    if result["case"]["padding_idx"] is not None:
        assert not local["grad.weight"][result["case"]["padding_idx"]].any()


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_shard_local_adamw_matches_torch_adamw(case, results):
    """ShardLocalAdamW on local shards = torch's AdamW on the DTensors: the same parameters and
    states (an uneven Shard(0) weight, a replicated gain with a partial-sum gradient, a plain
    tensor, in one foreach list), the states still DTensors with the parameters' placements."""
    result = results[case]
    assert "failed" not in result, result.get("traceback")
    reference, local = result["torch"], result["local"]
    assert set(local) == set(reference)
    assert {"placements.0.exp_avg", "placements.2.exp_avg_sq"} <= set(local)  # DTensor states
    assert local["placements.0.exp_avg"].tolist() == [True] and local["placements.2.exp_avg"].tolist() == [False]
    for key in reference:
        torch.testing.assert_close(local[key], reference[key], rtol=1e-6, atol=1e-7, msg=f"{case}: {key}")
    assert bool(local["moved"])  # an update was compared, not the initial values
