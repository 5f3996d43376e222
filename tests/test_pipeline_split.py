"""The stage split and the stage-to-rank placement of pipeline parallel."""

from __future__ import annotations

import pytest
import torch

from lightning_3d.config import ModelConfig, ParallelConfig
from lightning_3d.models.llama import Transformer
from lightning_3d.parallel.pipeline_parallel import cut_stage, split_blocks, stages_of_rank
from lightning_3d.plans import llama_plan


@pytest.mark.parametrize(
    "blocks, stages, first, last, expected",
    [
        (4, 2, 0.0, 0.0, [[0, 1], [2, 3]]),
        (8, 4, 0.0, 0.0, [[0, 1], [2, 3], [4, 5], [6, 7]]),
        # the embedding and the head weigh one block each: the middle stages take more
        (6, 4, 1.0, 1.0, [[0], [1, 2], [3, 4], [5]]),
        (7, 3, 1.0, 1.0, [[0, 1], [2, 3, 4], [5, 6]]),
        # a heavy head (large vocabulary) leaves the last stage one block
        (6, 2, 0.0, 4.0, [[0, 1, 2, 3, 4], [5]]),
        (4, 4, 1.0, 1.0, [[0], [1], [2], [3]]),
    ],
)
def test_split_blocks(blocks, stages, first, last, expected):
    assert split_blocks(blocks, stages, first, last) == expected


def test_split_minimizes_the_heaviest_stage():
    split = split_blocks(10, 4, 1.0, 1.0)
    loads = [len(stage) for stage in split]
    loads[0] += 1
    loads[-1] += 1
    assert max(loads) == 3  # (10 + 2) / 4
    assert [block for stage in split for block in stage] == list(range(10))


def test_more_stages_than_blocks_is_refused():
    with pytest.raises(ValueError, match="5 pipeline stages need at least 5 blocks, the model has 4"):
        split_blocks(4, 5, 1.0, 1.0)


@pytest.mark.parametrize(
    "pp, per_rank, schedule, expected",
    [
        (4, 1, "1f1b", [[0], [1], [2], [3]]),
        (2, 2, "interleaved_1f1b", [[0, 2], [1, 3]]),
        (2, 2, "zbv", [[0, 3], [1, 2]]),
        (4, 2, "dualpipev", [[0, 7], [1, 6], [2, 5], [3, 4]]),
    ],
)
def test_stage_placement(pp, per_rank, schedule, expected):
    assert [stages_of_rank(rank, pp, per_rank, schedule) for rank in range(pp)] == expected


def test_cut_stage_keeps_only_its_blocks_and_ends():
    config = ModelConfig(n_layers=4, dim=32, n_heads=4, vocab_size=64, max_seq_len=16)
    with torch.device("meta"):
        model = Transformer(config)
    plan = llama_plan(config, ParallelConfig())
    first = cut_stage(model, plan, [0, 1], is_first=True, is_last=False)
    last = cut_stage(model, plan, [2, 3], is_first=False, is_last=True)
    assert list(first.layers.keys()) == ["0", "1"] and list(last.layers.keys()) == ["2", "3"]
    assert first.tok_embeddings is not None and first.norm is None and first.output is None
    assert last.tok_embeddings is None and last.norm is not None and last.output is not None
    # parameter names stay those of the whole model, and the original is untouched
    assert "layers.2.attention.wq.weight" in dict(last.named_parameters())
    assert len(model.layers) == 4 and model.output is not None


@pytest.mark.parametrize(
    "schedule, per_rank, pp, microbatches",
    [("gpipe", 1, 4, 8), ("1f1b", 1, 4, 8), ("1f1b", 1, 2, 6), ("interleaved_1f1b", 2, 4, 8), ("looped_bfs", 2, 2, 4)],
)
def test_action_tables_have_the_textbook_bubble(schedule, per_rank, pp, microbatches):
    from lightning_3d.bench.pipeline import idle_fraction, textbook_idle

    assert f"{idle_fraction(schedule, pp, microbatches, per_rank):.3f}" == textbook_idle(schedule, pp, microbatches, per_rank)


def test_zero_bubble_schedules_idle_less_than_1f1b():
    from lightning_3d.bench.pipeline import idle_fraction

    one_f_one_b = idle_fraction("1f1b", 4, 8, 1)
    for schedule in ("interleaved_zero_bubble", "zbv", "dualpipev"):
        assert idle_fraction(schedule, 4, 8, 2) < one_f_one_b / 2
