"""Tests of lightning_3d.data: tokenizer, sources and split, windows, global-order sampler, data module."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from lightning_3d.config import DataConfig
from lightning_3d.data import (
    ByteTokenizer,
    GlobalOrderSampler,
    TextDataModule,
    TokenWindowDataset,
    load_token_splits,
)
from lightning_3d.data.sources import stdlib_documents

EOS = ByteTokenizer.eos_id


def documents_of(tokens: np.ndarray) -> list[str]:
    """Decoded documents of a token array (each ends with eos)."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ByteTokenizer().decode(tokens[s:e]) for s, e in zip(starts, ends)]


def write_docs(folder: Path, count: int, length: int = 400) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(count):
        text = f"document {i:03d} " + "x" * length
        (folder / f"doc{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_eos() -> None:
    tokenizer = ByteTokenizer()
    text = "héllo wörld — 你好 🙂\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint16
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    # eos is skipped, tensors work, broken UTF-8 is replaced rather than raising
    assert tokenizer.decode(torch.tensor([104, 105, EOS, 33])) == "hi!"
    assert tokenizer.decode([0xFF, 104]) == "\ufffdh"
    assert tokenizer.vocab_size == 257 and tokenizer.eos_id == 256


# ----------------------------------------------------------------------------- sources


def test_stdlib_documents_capped_sorted_deterministic() -> None:
    first = stdlib_documents(max_bytes=300_000)
    second = stdlib_documents(max_bytes=300_000)
    assert first == second
    assert sum(len(data) for _, data in first) == 300_000
    names = [name for name, _ in first]
    assert names == sorted(names)
    assert all(name.endswith(".py") and "site-packages" not in name for name in names)


def test_stdlib_split_follows_path_hash_and_is_complete() -> None:
    config = DataConfig(source="stdlib", max_bytes=2_000_000, val_fraction=0.1, seq_len=32)
    train, val = load_token_splits(config, vocab_size=512)
    docs = stdlib_documents(2_000_000)
    expected_val = [data for name, data in docs if zlib.crc32(name.encode()) % 10_000 < 1_000]
    expected_train = [data for name, data in docs if zlib.crc32(name.encode()) % 10_000 >= 1_000]
    assert len(expected_val) > 0 and len(expected_train) > 0
    assert len(val) == sum(len(d) + 1 for d in expected_val)
    assert len(train) == sum(len(d) + 1 for d in expected_train)
    assert np.array_equal(val[: len(expected_val[0])], np.frombuffer(expected_val[0], dtype=np.uint8))
    train2, val2 = load_token_splits(config, vocab_size=512)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)


def test_files_split_is_disjoint_by_document(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "corpus", 60)
    train, val = load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "corpus")], val_fraction=0.2), 512)
    train_docs, val_docs = documents_of(train), documents_of(val)
    assert train_docs and val_docs
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(texts)


def test_tiny_corpus_puts_last_document_in_validation(tmp_path: Path) -> None:
    # val_fraction=0 puts no document in validation by hash, so the fallback must act
    texts = write_docs(tmp_path / "corpus", 3)
    train, val = load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "corpus")], val_fraction=0.0), 512)
    assert documents_of(val) == [texts[-1]]
    assert documents_of(train) == texts[:-1]


def test_single_document_splits_by_tail(tmp_path: Path) -> None:
    (tmp_path / "one.md").write_text("a" * 999)
    config = DataConfig(source="files", paths=[str(tmp_path / "one.md")], val_fraction=0.1, seq_len=16)
    train, val = load_token_splits(config, 512)
    assert len(train) + len(val) == 1000  # 999 bytes + eos
    assert len(val) == 100 and val[-1] == EOS


def test_single_document_tail_has_at_least_one_window(tmp_path: Path) -> None:
    (tmp_path / "one.txt").write_text("b" * 199)
    config = DataConfig(source="files", paths=[str(tmp_path / "one.txt")], val_fraction=0.01, seq_len=64)
    train, val = load_token_splits(config, 512)
    assert len(val) == 65 and len(train) == 135


def test_jsonl_records_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    records = [{"body": f"record {i} " + "y" * 50, "id": i} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    config = DataConfig(source="files", paths=[str(path)], text_key="body", val_fraction=0.3)
    train, val = load_token_splits(config, 512)
    assert sorted(documents_of(train) + documents_of(val)) == sorted(r["body"] for r in records)
    assert documents_of(val)


def test_val_paths_and_text_extensions(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "sub").mkdir()
    (tmp_path / "train" / "a.rst").write_text("alpha")
    (tmp_path / "train" / "sub" / "b").write_bytes(b"beta\xff")  # no extension, invalid UTF-8
    (tmp_path / "valid.txt").write_text("gamma")
    config = DataConfig(source="files", paths=[str(tmp_path / "train")], val_paths=[str(tmp_path / "valid.txt")])
    train, val = load_token_splits(config, 512)
    assert documents_of(train) == ["alpha", "beta\ufffd"]
    assert documents_of(val) == ["gamma"]


def test_max_bytes_caps_text_files(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus", 10, length=100)
    config = DataConfig(source="files", paths=[str(tmp_path / "corpus")], max_bytes=250, val_fraction=0.5)
    train, val = load_token_splits(config, 512)
    assert len(train) + len(val) == 250 + 3  # 2 whole documents and 38 bytes of a third, 3 eos


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_memmap_tail_split(tmp_path: Path, dtype: str) -> None:
    ids = (np.arange(5_000) % 1000).astype(dtype)
    path = tmp_path / "tokens.bin"
    ids.tofile(path)
    config = DataConfig(source="files", paths=[str(path)], token_dtype=dtype, val_fraction=0.1, seq_len=32)
    train, val = load_token_splits(config, vocab_size=1000)
    assert isinstance(train, np.memmap) and train.dtype == np.dtype(dtype)
    assert np.array_equal(np.concatenate([train, val]), ids)
    assert len(val) == 500


def test_text_and_bin_together(tmp_path: Path) -> None:
    write_docs(tmp_path / "corpus", 20, length=50)
    np.arange(300, dtype=np.uint16).tofile(tmp_path / "corpus" / "z.bin")
    config = DataConfig(source="files", paths=[str(tmp_path / "corpus")], val_fraction=0.2, seq_len=8)
    train, val = load_token_splits(config, 512)
    assert len(train) + len(val) == 20 * (len("document 000 ") + 50 + 1) + 300
    assert np.array_equal(val[-60:], np.arange(240, 300))  # the stream's tail


# ----------------------------------------------------------------------------- bad input


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_token_splits(DataConfig(source="files", paths=[str(missing)]), 512)


def test_error_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty corpus.*empty"):
        load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "empty")]), 512)


def test_error_bad_source_and_no_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'web'.*stdlib, files"):
        load_token_splits(DataConfig(source="web"), 512)
    with pytest.raises(ValueError, match="needs data.paths"):
        load_token_splits(DataConfig(source="files"), 512)
    with pytest.raises(ValueError, match="data.source='stdlib' ignores it"):
        load_token_splits(DataConfig(source="stdlib", paths=[str(tmp_path)]), 512)


def test_error_bad_token_dtype(tmp_path: Path) -> None:
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="int64.*uint16, uint32"):
        load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "t.bin")], token_dtype="int64"), 512)


def test_error_bin_size_not_multiple_of_dtype(tmp_path: Path) -> None:
    path = tmp_path / "odd.bin"
    np.arange(7, dtype=np.uint16).tofile(path)  # 14 bytes, not a whole number of uint32
    config = DataConfig(source="files", paths=[str(path)], token_dtype="uint32")
    with pytest.raises(ValueError, match=r"odd.bin has 14 bytes.*4 bytes per uint32"):
        load_token_splits(config, 512)


def test_error_token_id_out_of_vocab(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    ids = np.zeros(1000, dtype=np.uint16)
    ids[777] = 600
    ids.tofile(path)
    with pytest.raises(ValueError, match=r"big.bin holds token id 600.*vocab_size=512"):
        load_token_splits(DataConfig(source="files", paths=[str(path)]), 512)
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"t.txt.*256.*vocab_size=200.*257"):
        load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "t.txt")]), 200)


def test_error_jsonl_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2 has no field 'text'"):
        load_token_splits(DataConfig(source="files", paths=[str(path)]), 512)
    path.write_text('{"text": "ok"}\n{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 3 is not valid JSON"):
        load_token_splits(DataConfig(source="files", paths=[str(path)]), 512)


def test_error_too_small_for_tail_split(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text("abc")
    config = DataConfig(source="files", paths=[str(tmp_path / "short.txt")], seq_len=8)
    with pytest.raises(ValueError, match=r"short.txt has 4 tokens"):
        load_token_splits(config, 512)


# ----------------------------------------------------------------------------- dataset


def test_window_dataset_shapes_and_shift() -> None:
    tokens = np.arange(101, dtype=np.uint16)
    dataset = TokenWindowDataset(tokens, seq_len=10)
    assert len(dataset) == 10
    sample = dataset[3]
    assert sample["input_ids"].dtype == torch.long and sample["input_ids"].shape == (10,)
    assert sample["input_ids"].tolist() == list(range(30, 40))
    assert sample["labels"].tolist() == list(range(31, 41))
    assert dataset[9]["labels"][-1].item() == 100  # the last window reaches the last token
    with pytest.raises(IndexError):
        dataset[10]


def test_window_dataset_too_short_names_split() -> None:
    with pytest.raises(ValueError, match=r"validation split has 10 tokens, fewer than seq_len\+1 = 11"):
        TokenWindowDataset(np.arange(10), seq_len=10, name="validation")


# ----------------------------------------------------------------------------- sampler


def global_batches(dataset_len: int, global_batch: int, replicas: int, **kwargs) -> list[list[int]]:
    """Each global batch, rebuilt by concatenating the ranks' shares in rank order."""
    per_rank = global_batch // replicas
    shares = []
    for rank in range(replicas):
        sampler = GlobalOrderSampler(dataset_len, global_batch, replicas, rank, **kwargs)
        indices = list(sampler)
        assert len(indices) == len(sampler)
        shares.append([indices[i : i + per_rank] for i in range(0, len(indices), per_rank)])
    return [sum((shares[rank][b] for rank in range(replicas)), []) for b in range(len(shares[0]))]


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_global_batches_independent_of_replicas(shuffle: bool) -> None:
    reference = global_batches(100, 8, 1, shuffle=shuffle, seed=7)
    assert len(reference) == 12  # 100 // 8, incomplete last batch dropped
    for replicas in (2, 4):
        assert global_batches(100, 8, replicas, shuffle=shuffle, seed=7) == reference
    flat = sum(reference, [])
    assert len(set(flat)) == len(flat) == 96  # disjoint within the epoch
    assert (flat == list(range(96))) is not shuffle


def test_sampler_epochs_differ_when_shuffled() -> None:
    sampler = GlobalOrderSampler(100, 8, 2, 1, shuffle=True, seed=3)
    first = list(sampler)
    assert list(sampler) == first  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != first
    unshuffled = GlobalOrderSampler(100, 8, 2, 1, shuffle=False, seed=3)
    before = list(unshuffled)
    unshuffled.set_epoch(1)
    assert list(unshuffled) == before


def test_sampler_resume_and_max_batches() -> None:
    full = list(GlobalOrderSampler(100, 8, 4, 2, shuffle=True, seed=1))
    resumed = GlobalOrderSampler(100, 8, 4, 2, shuffle=True, seed=1)
    resumed.resume_at(epoch=0, batch=5)
    assert list(resumed) == full[5 * 2 :]
    assert len(resumed) == 12 * 2  # Lightning counts the skipped batches as done
    resumed.set_epoch(1)  # the next epoch starts at its beginning
    next_epoch = GlobalOrderSampler(100, 8, 4, 2, shuffle=True, seed=1)
    next_epoch.set_epoch(1)
    assert list(resumed) == list(next_epoch)
    resumed.set_epoch(0)
    resumed.resume_at(epoch=0, batch=12)
    assert list(resumed) == []
    with pytest.raises(ValueError, match="batch -1"):
        resumed.resume_at(0, -1)
    capped = GlobalOrderSampler(100, 8, 4, 2, shuffle=False, seed=1, max_batches=3)
    assert list(capped) == [4, 5, 12, 13, 20, 21]


def test_sampler_is_distributed_sampler_and_validates() -> None:
    assert isinstance(GlobalOrderSampler(16, 8, 2, 0, shuffle=False, seed=0), DistributedSampler)
    with pytest.raises(ValueError, match="global batch 8 is not divisible by the 3"):
        GlobalOrderSampler(100, 8, 3, 0, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="train split has 5 sequences of seq_len 64, fewer than one global batch of 8"):
        GlobalOrderSampler(5, 8, 2, 0, shuffle=False, seed=0, name="train", seq_len=64)
    with pytest.raises(ValueError, match="rank=2"):
        GlobalOrderSampler(100, 8, 2, 2, shuffle=False, seed=0)


# ----------------------------------------------------------------------------- data module


def small_files_config(tmp_path: Path, **overrides) -> DataConfig:
    write_docs(tmp_path / "corpus", 40, length=300)
    values = dict(source="files", paths=[str(tmp_path / "corpus")], seq_len=16, global_batch_size=8, val_fraction=0.25)
    values.update(overrides)
    return DataConfig(**values)


def test_datamodule_without_trainer(tmp_path: Path) -> None:
    module = TextDataModule(small_files_config(tmp_path, val_batches=2), vocab_size=512, seed=5)
    module.setup("fit")
    assert (module.dp_size, module.dp_rank, module.per_rank_batch_size) == (1, 0, 8)
    train_batches = list(module.train_dataloader())
    assert len(train_batches) == len(module.train_dataset) // 8
    batch = train_batches[0]
    assert batch["input_ids"].shape == (8, 16) and batch["labels"].shape == (8, 16)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    val_batches = list(module.val_dataloader())
    assert len(val_batches) == 2
    assert torch.equal(val_batches[0]["input_ids"][0], module.val_dataset[0]["input_ids"])  # unshuffled


def test_datamodule_rejects_indivisible_global_batch(tmp_path: Path) -> None:
    module = TextDataModule(small_files_config(tmp_path), vocab_size=512)
    module.trainer = lightning.Trainer(accumulate_grad_batches=3, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"global_batch_size=8 .* size 1 × accumulate_grad_batches=3 = 3; nearest valid: \[6, 9\]"):
        module.setup("fit")


class RecordingModule(lightning.LightningModule):
    """Smallest trainable model; remembers the batches it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(512, 4)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].clone())
        return self.embedding(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`")
def test_datamodule_with_trainer_accumulation(tmp_path: Path) -> None:
    module = TextDataModule(small_files_config(tmp_path), vocab_size=512, seed=2)
    model = RecordingModule()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=2,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=module)
    assert isinstance(trainer.train_dataloader.sampler, GlobalOrderSampler)
    assert len(model.seen) == 4 and all(b.shape == (4, 16) for b in model.seen)  # 8 sequences / 2 micro-batches
    # the micro-batches are the global order's first 16 samples, in order
    order = GlobalOrderSampler(len(module.train_dataset), 4, 1, 0, shuffle=True, seed=2).global_order()[:16]
    expected = torch.stack([module.train_dataset[int(i)]["input_ids"] for i in order])
    assert torch.equal(torch.cat(model.seen), expected)
