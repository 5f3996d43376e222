"""Data at real scale: many token files read as one stream without copies, startup that reads a
bounded sample, bad ids found as batches load, Hugging Face datasets read locally, and resumes
that stay exact with loader workers."""

from __future__ import annotations

import gc
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_3d.config import DataConfig
from lightning_3d.data import GlobalOrderSampler, TextDataModule, TokenStream, TokenWindowDataset, load_token_splits
from lightning_3d.data.shards import prepare
from lightning_3d.data.sources import data_file_problems
from lightning_3d.data.token_files import SAMPLE_TOKENS, TokenFile, read_sidecar
from lightning_3d.errors import ConfigError

VOCAB = 512
EOS = "[EOS]"


def write_tokens(path: Path, tokens: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens.tofile(path)
    return tokens


def shards(folder: Path, sizes: list[int], dtype: str = "uint16") -> np.ndarray:
    """Files ``part-0.bin, part-1.bin, ...`` of ``sizes`` tokens; returns all their tokens in order."""
    start, parts = 0, []
    for index, size in enumerate(sizes):
        parts.append(write_tokens(folder / f"part-{index}.bin", (np.arange(start, start + size) % VOCAB).astype(dtype)))
        start += size
    return np.concatenate(parts)


def trainer_stub(dp_size: int, dp_rank: int, steps_done: int = 0) -> SimpleNamespace:
    """What the data module reads from a Trainer: the DP layout, the accumulation, the batches done."""
    progress = SimpleNamespace(current=SimpleNamespace(processed=steps_done))
    return SimpleNamespace(
        strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": dp_size, "rank": dp_rank}),
        accumulate_grad_batches=1,
        current_epoch=0,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)),
    )


LINES = [f"the quick brown fox {i} jumps over the lazy dog {i % 7}" for i in range(40)]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Path:
    """A word-level tokenizer trained on LINES, saved as tokenizer.json (no network)."""
    pytest.importorskip("datasets")  # every test that needs a tokenizer file reads files through datasets
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    model = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    model.train_from_iterator(LINES, trainers.WordLevelTrainer(special_tokens=["[UNK]", EOS]))
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    model.save(str(path))
    return path


# ----------------------------------------------------------------------------- many files, one stream


def test_window_crossing_a_file_boundary_is_read_from_both_files(tmp_path: Path) -> None:
    every = shards(tmp_path / "corpus", [50, 30, 70])
    config = DataConfig(source="files", paths=[str(tmp_path / "corpus" / "part-*.bin")], val_paths=[str(tmp_path / "corpus" / "part-2.bin")])
    train, _ = load_token_splits(config, VOCAB)
    assert isinstance(train, TokenStream) and len(train) == 150  # the glob matches the validation file too
    assert all(isinstance(segment.source, TokenFile) for segment in train.segments)  # mapped, never copied
    dataset = TokenWindowDataset(train, seq_len=16, vocab_size=VOCAB)
    crossing = dataset[3]  # tokens 48..64: two from part-0, fifteen from part-1
    assert crossing["input_ids"].tolist() == every[48:64].tolist()
    assert crossing["labels"].tolist() == every[49:65].tolist()
    assert dataset[4]["labels"].tolist() == every[65:81].tolist()  # part-1 into part-2
    assert np.array_equal(np.asarray(train), every)
    segment, offset = train.locate(85)
    assert (Path(segment.origin).name, offset) == ("part-2.bin", 5)
    # a loader worker started by spawn receives the index, not the tokens
    assert len(pickle.dumps(train)) < 2_000
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(train))), every)


def test_startup_reads_a_bounded_sample_of_a_huge_file(tmp_path: Path) -> None:
    # 32 GiB of uint16 zeros that take no disk (sparse): reading it whole, as a startup that
    # scans every token would, could not finish within the test's time, and copying it would not fit
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as handle:
        handle.truncate(32 << 30)
    config = DataConfig(source="files", paths=[str(huge)], seq_len=2048, global_batch_size=8)
    module = TextDataModule(config, vocab_size=VOCAB, seed=3)
    module.trainer = trainer_stub(dp_size=4, dp_rank=1)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == (2, 2048)
    assert data_file_problems(config) == []


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_across_a_file_boundary_on_another_dp_size_continues_at_the_same_sample(tmp_path: Path, shuffle: bool) -> None:
    shards(tmp_path / "corpus", [197, 161, 230, 175])  # 47 windows of 16; the files end at tokens 197, 358, 588
    write_tokens(tmp_path / "val.bin", np.ones(100, dtype=np.uint16))
    config = DataConfig(
        source="files", paths=[str(tmp_path / "corpus")], val_paths=[str(tmp_path / "val.bin")],
        seq_len=16, global_batch_size=4, shuffle=shuffle,
    )
    seed = 3  # its order puts windows that cross a file boundary right after the resume point

    def global_batches(dp_size: int, steps: int, state: dict | None = None, workers: int = 0) -> list[torch.Tensor]:
        """The global batches of ``steps`` steps, rebuilt from every DP rank's share."""
        config.num_workers = workers
        shares = []
        for rank in range(dp_size):
            module = TextDataModule(config, vocab_size=VOCAB, seed=seed)
            module.trainer = trainer_stub(dp_size, rank)
            if state is not None:
                module.load_state_dict(state)
            loader = module.train_dataloader()
            assert loader.pin_memory is False  # pinned only on CUDA
            batches = iter(loader)
            shares.append([next(batches)["input_ids"] for _ in range(steps)])
        return [torch.cat([shares[rank][step] for rank in range(dp_size)]) for step in range(steps)]

    reference = global_batches(dp_size=1, steps=6)
    # two steps on 2 ranks, then the checkpointed position resumed on 4 ranks with loader workers
    first = global_batches(dp_size=2, steps=2)
    saved = TextDataModule(config, vocab_size=VOCAB, seed=seed)
    saved.trainer = trainer_stub(dp_size=2, dp_rank=0, steps_done=2)
    resumed = global_batches(dp_size=4, steps=4, state=saved.state_dict(), workers=2)
    assert all(torch.equal(a, b) for a, b in zip(first + resumed, reference))
    resumed_samples = GlobalOrderSampler(47, 4, 1, 0, shuffle=shuffle, seed=seed).global_order()[8:24].tolist()
    crossing = [i for i in resumed_samples if any(16 * i < end < 16 * i + 17 for end in (197, 358, 588))]
    assert crossing, resumed_samples


# ----------------------------------------------------------------------------- bad ids at run time


def planted(tmp_path: Path, size: int, position: int, bad_id: int = 700) -> Path:
    """A token file whose ids are all fine but the one at ``position``."""
    tokens = (np.arange(size) % 300).astype(np.uint16)
    tokens[position] = bad_id
    path = tmp_path / "corpus" / "bad.bin"
    write_tokens(path, tokens)
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_id_past_the_startup_sample_is_named_when_its_batch_loads(tmp_path: Path, workers: int) -> None:
    position = 3 * SAMPLE_TOKENS + 5  # neither in the first nor the last SAMPLE_TOKENS tokens
    path = planted(tmp_path, 8 * SAMPLE_TOKENS, position)
    config = DataConfig(source="files", paths=[str(path)], seq_len=64, global_batch_size=8, shuffle=False, num_workers=workers)
    module = TextDataModule(config, vocab_size=VOCAB)
    module.setup("fit")  # the sample at startup does not see it
    with pytest.raises(ConfigError) as error:
        for _ in module.train_dataloader():
            pass
    # one line, the worker's own message: torch's "Caught ... in DataLoader worker" wrapping is gone
    assert str(error.value) == f"{path} holds token id 700 at token offset {position} (byte {2 * position}), not below vocab_size=512"
    # torch takes a few seconds to stop workers after one failed; here rather than in a later test
    del module, error
    gc.collect()


def test_bad_id_found_at_run_time_stops_every_rank_through_the_cli(tmp_path: Path) -> None:
    # 2 ranks, recipe=debug (seq_len 32, global batch 8, seed 1234): plant a bad id in a sample
    # that rank 1 alone loads, at step 2 or later, past the startup sample
    size, seq_len = 200_000, 32
    train_samples = (size - int(np.ceil(size * 0.02)) - 1) // seq_len  # the file's last 2 % is validation
    order = GlobalOrderSampler(train_samples, 8, 1, 0, shuffle=True, seed=1234).global_order().tolist()
    middle = range(SAMPLE_TOKENS // seq_len + 1, (size - SAMPLE_TOKENS) // seq_len - 2)
    step, sample = next((step, sample) for step in range(2, 6) for sample in order[8 * step + 4 : 8 * step + 8] if sample in middle)
    position = sample * seq_len + 5
    path = planted(tmp_path, size, position)
    command = [
        sys.executable, "-m", "lightning_3d.train", "recipe=debug", "data=files", f"data.paths=[{path}]",
        "data.token_dtype=uint16", "data.seq_len=32", "data.global_batch_size=8", "trainer.devices=2",
        "parallel.timeout_s=20", "trainer.max_steps=6", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 1, result.stderr[-3000:]
    message = f"{path} holds token id 700 at token offset {position} (byte {2 * position}), not below vocab_size=512"
    assert f"rank 1 failed at step {step}: ConfigError: {message}" in result.stderr, result.stderr[-3000:]


# ----------------------------------------------------------------------------- sidecars and bad input


def test_prepare_writes_sidecars_that_startup_uses(tmp_path: Path, tokenizer: Path) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in LINES))
    out = prepare([tmp_path / "docs.jsonl"], tmp_path / "tokens", str(tokenizer), EOS, shard_tokens=40)
    assert [shard.name for shard in out][:2] == ["00000-0000.bin", "00000-0001.bin"]
    meta = read_sidecar(out[0])
    assert meta["tokens"] == 40 and meta["dtype"] == "uint16" and meta["max_id"] < 64
    # the sidecar's max id decides at startup, without reading a token
    with pytest.raises(ConfigError, match=rf"00000-0000.bin holds token id {meta['max_id']} \(its max, from .*00000-0000.bin.json\), not below vocab_size=5"):
        load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "tokens")], seq_len=4), 5)
    # a shard cut short no longer matches its sidecar
    with open(out[0], "r+b") as handle:
        handle.truncate(60)
    expected = f"{out[0]} has 30 uint16 tokens but its sidecar {out[0]}.json says 40"
    assert data_file_problems(DataConfig(source="files", paths=[str(tmp_path / "tokens")]))[0].startswith(expected)


def test_one_bad_file_among_hundreds_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    for index in range(300):
        write_tokens(folder / f"shard-{index:03d}.bin", np.ones(64, dtype=np.uint16))
    (folder / "shard-123.bin").write_bytes(b"\x01\x00\x01")  # 3 bytes: cut in the middle of a token
    config = DataConfig(source="files", paths=[str(folder / "shard-*.bin")], token_dtype="uint16")
    message = f"{folder / 'shard-123.bin'} has 3 bytes, not a multiple of 2 bytes per uint16 token"
    problems = data_file_problems(config)
    assert len(problems) == 1 and problems[0].startswith(message)
    with pytest.raises(ConfigError, match="shard-123.bin has 3 bytes"):
        load_token_splits(config, VOCAB)
    nothing = DataConfig(source="files", paths=[str(tmp_path / "elsewhere" / "*.bin")])
    assert data_file_problems(nothing) == [f"data path {tmp_path / 'elsewhere' / '*.bin'} is a glob that matches no file"]
    with pytest.raises(ConfigError, match="is a glob that matches no file"):
        load_token_splits(nothing, VOCAB)


# ----------------------------------------------------------------------------- Hugging Face datasets

def write_split(tmp_path: Path, kind: str, name: str, lines: list[str], text_key: str = "text") -> Path:
    if kind == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({text_key: line, "n": i}) + "\n" for i, line in enumerate(lines)))
        return path
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / f"{name}.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"n": list(range(len(lines))), text_key: lines}), path, row_group_size=7)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hf_source_gives_the_tokens_of_the_text_path(tmp_path: Path, tokenizer: Path, kind: str) -> None:
    (tmp_path / "text").mkdir()
    train_text = write_split(tmp_path / "text", "jsonl", "train", LINES[:30])
    val_text = write_split(tmp_path / "text", "jsonl", "val", LINES[30:])
    common = dict(tokenizer=str(tokenizer), eos_token=EOS, seq_len=8)
    text_path = DataConfig(source="files", paths=[str(train_text)], val_paths=[str(val_text)], **common)
    expected = [np.asarray(split) for split in load_token_splits(text_path, VOCAB)]

    train, val = write_split(tmp_path, kind, "train", LINES[:30]), write_split(tmp_path, kind, "val", LINES[30:])
    hf = DataConfig(source="hf", paths=[str(train)], val_paths=[str(val)], cache_dir=str(tmp_path / "cache"), **common)
    assert data_file_problems(hf) == []
    module = TextDataModule(hf, vocab_size=VOCAB)
    module.prepare_data()  # tokenized once, into the cache
    caches = sorted(path.name for path in (tmp_path / "cache").iterdir())
    got = [np.asarray(split) for split in load_token_splits(hf, VOCAB)]
    assert [split.tolist() for split in got] == [split.tolist() for split in expected]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == caches and len(caches) == 2  # reused
    eos_id = int(got[0][-1])
    assert np.count_nonzero(got[0] == eos_id) == 30  # one eos after each document


def test_hf_bad_input_is_named(tmp_path: Path, tokenizer: Path) -> None:
    no_text = write_split(tmp_path, "parquet", "body", LINES, text_key="body")
    config = DataConfig(source="hf", paths=[str(no_text)], tokenizer=str(tokenizer), eos_token=EOS, cache_dir=str(tmp_path / "c"))
    message = f"{no_text} has no column 'text' (data.text_key); its columns: ['n', 'body']"
    assert data_file_problems(config) == [message]
    with pytest.raises(ConfigError) as error:
        load_token_splits(config, VOCAB)
    assert str(error.value) == message
    # a tokenizer whose ids the model has no embeddings for
    words = write_split(tmp_path, "jsonl", "words", LINES)
    small = DataConfig(source="hf", paths=[str(words)], tokenizer=str(tokenizer), eos_token=EOS, cache_dir=str(tmp_path / "c2"))
    with pytest.raises(ConfigError, match=rf"the tokenizer {tokenizer} \(data.tokenizer\) makes ids up to \d+, but vocab_size=8") as error:
        TextDataModule(small, vocab_size=8).prepare_data()
    assert not (tmp_path / "c2").exists()  # refused before tokenizing anything
    assert data_file_problems(small, vocab_size=8) == [str(error.value)]  # and by the pre-flight, given the model's vocab
    unread = DataConfig(source="hf", paths=[str(tmp_path / "notes.txt")], tokenizer=str(tokenizer), eos_token=EOS)
    (tmp_path / "notes.txt").write_text("text")
    assert data_file_problems(unread)[0].startswith("data.source=hf reads .jsonl, .json, .parquet, .arrow files, not")


def test_prepare_in_parallel_matches_one_process(tmp_path: Path, tokenizer: Path) -> None:
    inputs = [write_split(tmp_path, "jsonl", "a", LINES[:20]), write_split(tmp_path, "parquet", "b", LINES[20:])]
    (tmp_path / "c.txt").write_text("the lazy dog\n")
    inputs.append(tmp_path / "c.txt")
    one = prepare(inputs, tmp_path / "one", str(tokenizer), EOS, workers=1)
    two = prepare(inputs, tmp_path / "two", str(tokenizer), EOS, workers=2)
    assert [path.name for path in one] == [path.name for path in two] == ["00000-0000.bin", "00001-0000.bin", "00002-0000.bin"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))


def test_data_benchmark_runs_in_its_smallest_form() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_3d.bench.data", "--sizes", "2M", "--files", "3", "--ranks", "1", "--repeats", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "first batch" in result.stdout and "peak RSS" in result.stdout
