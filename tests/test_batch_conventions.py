"""What a batch must look like: context-parallel cuts (shard_batch) and validation batch sizes.

The unit tests call :func:`shard_batch` directly; the rest read one torchrun group of 2
ranks (tests/batch_conventions_worker.py) that trains a small decoder which is not the
project's CausalLM, with its own batch layout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_parity import FORK_LAUNCH

from lightning_3d.errors import ConfigError
from lightning_3d.parallel.context_parallel import shard_batch, shard_sequence

WORKER = Path(__file__).with_name("batch_conventions_worker.py")
LOSS_RTOL = 1e-4


def tokens(batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.arange(batch * seq).view(batch, seq)


# ----------------------------------------------------------------------------- shard_batch


def test_default_sequence_keys_are_cut_on_each_rank() -> None:
    batch = {"input_ids": tokens(), "labels": tokens() + 1, "position_ids": tokens(), "positions": torch.arange(8)[None]}
    for rank in range(2):
        local = shard_batch(batch, rank, 2)
        for key, value in batch.items():
            assert torch.equal(local[key], shard_sequence(value, rank, 2)), key
    assert shard_batch(batch, 0, 2)["input_ids"].tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]


def test_one_dim_and_non_tensor_entries_pass_unchanged() -> None:
    per_sample = torch.tensor([3, 5])
    batch = {"input_ids": tokens(), "labels": per_sample, "weight": torch.tensor(2.0), "ids": ["a", "b"], "meta": {"source": "x"}}
    local = shard_batch(batch, 1, 2)
    for key in ("labels", "weight", "ids", "meta"):
        assert local[key] is batch[key], key


def test_cp1_leaves_any_batch_alone() -> None:
    batch = {"input_ids": tokens(), "image": torch.zeros(2, 3, 5, 5)}
    assert shard_batch(batch, 0, 1) is batch
    listed = [tokens()]
    assert shard_batch(listed, 0, 1) is listed


@pytest.mark.parametrize("rank", [0, 1])
def test_unknown_entries_are_refused_by_name_and_shape(rank: int) -> None:
    # the old cut would have halved the style vector and the image's channels without a word
    batch = {"input_ids": tokens(), "style": torch.zeros(2, 8), "image": torch.zeros(2, 3, 5, 5)}
    with pytest.raises(ConfigError) as error:
        shard_batch(batch, rank, 2)
    message = str(error.value)
    assert "'style' of shape (2, 8)" in message and "'image' of shape (2, 3, 5, 5)" in message
    assert "context_parallel_keys" in message and "cp=2" in message
    assert isinstance(error.value, ValueError)


def test_the_error_is_the_same_on_every_rank() -> None:
    batch = {"input_ids": tokens(), "extra": torch.zeros(2, 8, 3)}
    messages = set()
    for rank in range(4):
        with pytest.raises(ConfigError) as error:
            shard_batch(batch, rank, 4)
        messages.add(str(error.value))
    assert len(messages) == 1


def test_tensors_nested_in_containers_are_refused() -> None:
    batch = {"input_ids": tokens(), "crops": [torch.zeros(2, 4), torch.zeros(3)], "extras": {"mask": torch.zeros(2, 8)}}
    with pytest.raises(ConfigError) as error:
        shard_batch(batch, 0, 2)
    assert "'crops' holds tensors of shapes [(2, 4)] inside a list" in str(error.value)
    assert "'extras' holds tensors of shapes [(2, 8)] inside a dict" in str(error.value)


def test_named_keys_are_cut_along_dim_one() -> None:
    features = torch.arange(2 * 8 * 3).view(2, 8, 3)
    batch = {"input_ids": tokens(), "features": features, "mask": tokens().bool()}
    for keys in (["features", "mask"], ("features", "mask"), {"features": 1, "mask": 1}):
        local = shard_batch(batch, 1, 2, keys)
        assert torch.equal(local["features"], shard_sequence(features, 1, 2))
        assert local["features"].shape == (2, 4, 3) and local["mask"].shape == (2, 4)
    # one name given as a plain string is that name, not its letters
    assert shard_batch({"input_ids": tokens(), "features": features}, 0, 2, "features")["features"].shape == (2, 4, 3)


def test_a_mapping_names_the_dim_to_cut_or_keeps_an_entry_whole() -> None:
    heads_first = torch.arange(2 * 3 * 8).view(2, 3, 8)  # (batch, heads, sequence)
    image = torch.zeros(2, 3, 5, 5)
    local = shard_batch({"input_ids": tokens(), "bias": heads_first, "image": image}, 1, 2, {"bias": 2, "image": None})
    assert torch.equal(local["bias"], shard_sequence(heads_first, 1, 2, dim=2))
    assert local["image"] is image
    # a default key can be kept whole too
    assert shard_batch({"input_ids": tokens()}, 0, 2, {"input_ids": None})["input_ids"].shape == (2, 8)


@pytest.mark.parametrize("keys", [{"features": 0}, {"features": -1}, {"features": "1"}, {"features": True}])
def test_bad_dims_in_the_mapping_are_refused(keys: dict) -> None:
    with pytest.raises(ConfigError, match=r"context_parallel_keys \{'features': .*\}: give each entry the dim to cut"):
        shard_batch({"input_ids": tokens()}, 0, 2, keys)


def test_a_named_entry_without_the_dim_is_refused() -> None:
    batch = {"input_ids": tokens(), "mask": torch.ones(2), "notes": "text"}
    with pytest.raises(ConfigError) as error:
        shard_batch(batch, 0, 2, ["mask", "notes"])
    assert "'mask' of shape (2,) is named in `context_parallel_keys` but has no dim 1 to cut" in str(error.value)
    assert "'notes' (a str) is named" in str(error.value)


def test_absent_named_keys_are_fine() -> None:
    assert shard_batch({"input_ids": tokens()}, 0, 2, ["features"])["input_ids"].shape == (2, 4)


@pytest.mark.parametrize("cp, seq", [(2, 6), (2, 10), (4, 12)])
def test_indivisible_lengths_are_refused(cp: int, seq: int) -> None:
    batch = {"input_ids": tokens(seq=seq), "labels": tokens(seq=seq)}
    with pytest.raises(ConfigError, match=rf"2·cp={2 * cp} chunks; lengths \{{'input_ids': {seq}, 'labels': {seq}\}} do not divide"):
        shard_batch(batch, 0, cp)
    with pytest.raises(ConfigError, match=rf"length {seq} \(dim 1 of shape \(2, {seq}\)\) does not divide"):
        shard_sequence(tokens(seq=seq), 0, cp)


def test_entries_of_different_lengths_are_refused() -> None:
    batch = {"input_ids": tokens(seq=8), "features": torch.zeros(2, 16, 3)}
    with pytest.raises(ConfigError, match=r"one length, got \{'input_ids': 8, 'features': 16\}"):
        shard_batch(batch, 0, 2, ["features"])


def test_non_dict_batches_are_refused() -> None:
    with pytest.raises(ConfigError, match="cuts dict batches by key; got a list"):
        shard_batch([tokens()], 0, 2)


# ----------------------------------------------------------------------------- 2 ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("batch_conventions")
    corpus = out_dir / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i:03d}.txt").write_text(f"document {i:03d} " + "x" * 300)
    command = [sys.executable, str(FORK_LAUNCH), "2", str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, str(out_dir), str(corpus)], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return torch.load(out_dir / "results.pt", weights_only=True)


def _val_loss(ranks: list[dict]) -> float:
    batches = [batch for rank in ranks for batch in rank["val"]]
    return sum(b["loss_sum"] for b in batches) / sum(b["tokens"] for b in batches)


def test_validation_batches_are_training_sized_on_two_ranks(two_ranks: dict) -> None:
    # global batch 8 = 2 dp ranks × 4 accumulated micro-batches × 1 sequence
    for rank in two_ranks["data_accumulate4"]:
        assert [b["input_ids"] for b in rank["train"]] == [(1, 16)] * 4
        assert [b["input_ids"] for b in rank["val"]] == [(1, 16)] * 8  # val_batches=2 global batches' worth


def test_validation_set_does_not_depend_on_accumulation(two_ranks: dict) -> None:
    rows = {
        name: sorted(row for rank in two_ranks[name] for b in rank["val"] for row in b["rows"])
        for name in ("data_accumulate1", "data_accumulate4")
    }
    assert len(rows["data_accumulate1"]) == 16
    assert rows["data_accumulate4"] == rows["data_accumulate1"]
    # one optimizer step on the same global batch, then the same samples: the same loss
    expected = _val_loss(two_ranks["data_accumulate1"])
    assert _val_loss(two_ranks["data_accumulate4"]) == pytest.approx(expected, rel=LOSS_RTOL)


def test_cp_refuses_an_unnamed_feature_on_every_rank_before_the_step(two_ranks: dict) -> None:
    ranks = two_ranks["cp2_unnamed"]
    messages = {rank["error"]["message"] for rank in ranks}
    assert len(messages) == 1 and all(rank["error"]["type"] == "ConfigError" for rank in ranks)
    assert "'token_features' of shape (2, 16, 4)" in messages.pop()
    # the module's step never ran: no forward, so no collective was entered
    assert all(rank["train"] == [] and rank["global_step"] == 0 for rank in ranks)


def test_cp_cuts_a_named_feature_with_its_tokens(two_ranks: dict) -> None:
    for rank in two_ranks["cp2_named"]:
        assert rank["error"] is None and rank["global_step"] == 3
        for batch in rank["train"] + rank["val"]:
            assert batch["input_ids"] == (2, 8) and batch["token_features"] == (2, 8, 4)
            assert batch["aligned"]
        assert all(torch.isfinite(torch.tensor(rank["losses"])))


def test_cp_with_a_whole_entry_matches_one_rank_per_batch(two_ranks: dict) -> None:
    reference, cp = two_ranks["cp1_reference"][0], two_ranks["cp2_whole"]
    assert reference["error"] is None and reference["train"][0]["token_features"] == (2, 16, 4)
    for rank in cp:
        assert rank["error"] is None and rank["train"][0]["style"] == (2, 6)  # kept whole
        torch.testing.assert_close(torch.tensor(rank["losses"]), torch.tensor(reference["losses"]), rtol=LOSS_RTOL, atol=0.0)
    # each validation batch's token-loss sum, split over the cp ranks
    cp_sums = torch.tensor([sum(rank["val"][i]["loss_sum"] for rank in cp) for i in range(len(reference["val"]))])
    torch.testing.assert_close(cp_sums, torch.tensor([b["loss_sum"] for b in reference["val"]]), rtol=LOSS_RTOL, atol=0.0)
