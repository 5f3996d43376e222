"""Tests of lightning_3d.data: tokenizer, sources and split, windows, global-order sampler, data module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Callable, Iterator

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
    TokenStream,
    TokenWindowDataset,
    load_token_splits,
)
from lightning_3d.data.sources import data_file_problems, stdlib_documents
from lightning_3d.data.token_files import DTYPE_SCAN_ELEMENTS

EOS = ByteTokenizer.eos_id
NOBODY = 65534  # uid and gid of user nobody


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
    # read from the file through the index, not copied into memory
    assert isinstance(train, TokenStream) and train.dtype == np.dtype(dtype)
    assert [(segment.origin, segment.start, segment.stop) for segment in train.segments] == [(str(path), 0, 4500)]
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


def files_config(*paths: Path, **overrides) -> DataConfig:
    return DataConfig(source="files", paths=[str(path) for path in paths], **overrides)


def load_error(config: DataConfig, vocab_size: int = 512) -> str:
    """``load_token_splits``' error as ``"Type: message"``, to compare with ``data_file_problems``."""
    with pytest.raises((OSError, ValueError)) as error:
        load_token_splits(config, vocab_size)
    return f"{error.type.__name__}: {error.value}"


def test_error_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        load_token_splits(files_config(missing), 512)
    assert data_file_problems(files_config(missing)) == [f"data path {missing} does not exist"]
    (tmp_path / "file.txt").write_text("text")
    under_file = tmp_path / "file.txt" / "child.txt"  # ENOTDIR is missing too, not unreadable
    assert load_error(files_config(under_file)) == f"FileNotFoundError: data path {under_file} does not exist"
    broken = tmp_path / "broken.txt"
    broken.symlink_to(tmp_path / "gone.txt")
    message = f"data path {broken} is a symbolic link to {tmp_path / 'gone.txt'}, which does not exist"
    assert load_error(files_config(broken)) == f"FileNotFoundError: {message}"
    assert data_file_problems(files_config(broken)) == [message]


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A fresh folder that user nobody can reach (pytest's tmp_path is under a root-only folder)."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    for parent, subfolders, _ in os.walk(folder):
        for name in subfolders:  # give back what the test locked, so that the walk and rmtree get in
            os.chmod(os.path.join(parent, name), 0o755)
    shutil.rmtree(folder)


def run_as_nobody(call: Callable[[], object], locked_file: Path) -> object:
    """``call()`` in a forked child that runs as user nobody when this process is root.

    Root reads chmod 000 files, so permission errors need another user. Forked, not a new
    interpreter: nobody may not reach the interpreter's folder. Skips when the drop fails
    or does not stop the child reading ``locked_file``.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must never return into pytest
        try:
            os.close(read_end)
            with os.fdopen(write_end, "w") as pipe:
                json.dump(_nobody_payload(call, locked_file), pipe)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    payload = json.loads(answer) if answer else {"error": "the child died without an answer"}
    if "skip" in payload:
        pytest.skip(payload["skip"])
    assert "error" not in payload, payload["error"]
    return payload["value"]


def _nobody_payload(call: Callable[[], object], locked_file: Path) -> dict:
    signal.alarm(60)  # a hung child must not hang the test run
    if os.getuid() == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        except OSError as error:
            return {"skip": f"cannot drop root privileges to uid {NOBODY}: {error}"}
    if os.access(locked_file, os.R_OK):
        return {"skip": f"uid {os.getuid()} still reads the chmod 000 file {locked_file}"}
    try:
        return {"value": call()}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def load_error_or_none(config: DataConfig) -> str | None:
    try:
        load_token_splits(config, 512)
    except (OSError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def test_error_unreadable_files(world_readable_dir: Path) -> None:
    root = world_readable_dir
    secrets = [root / "secret.txt", root / "secret.jsonl", root / "secret.bin"]
    secrets[0].write_text("hidden text")
    secrets[1].write_text('{"text": "hidden"}\n')
    np.arange(100, dtype=np.uint16).tofile(secrets[2])
    (root / "locked").mkdir()
    (root / "locked" / "inner.txt").write_text("behind a folder nobody may enter")
    (root / "corpus" / "sub").mkdir(parents=True)
    (root / "corpus" / "good.txt").write_text("readable")
    (root / "corpus" / "sub" / "deeper.txt").write_text("unlisted")
    for path in secrets:
        path.chmod(0)
    (root / "locked").chmod(0o700)  # root's, so nobody cannot even stat inside it
    (root / "corpus" / "sub").chmod(0)
    inner, sub, missing = root / "locked" / "inner.txt", root / "corpus" / "sub", root / "missing.txt"
    cases = [*secrets, inner, root / "corpus", missing]

    def outcomes() -> dict:
        loads = [load_error_or_none(files_config(path)) for path in cases]
        return {"loads": loads, "problems": data_file_problems(files_config(*cases))}

    result = run_as_nobody(outcomes, secrets[0])
    denied = [f"cannot read data file {path}: Permission denied" for path in [*secrets, inner]]
    expected = [*denied, f"cannot read data folder {sub}: Permission denied", f"data path {missing} does not exist"]
    assert result["problems"] == expected
    assert result["loads"] == [f"ConfigError: {message}" for message in expected[:-1]] + [
        f"FileNotFoundError: {expected[-1]}"
    ]


def returns_promptly(call: Callable[[], object], seconds: float = 30.0) -> object:
    """``call()``'s result or raised exception, failing instead of hanging if it blocks (a FIFO opened)."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(call())
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s: was a FIFO opened?"
    return outcome[0]


def test_error_special_file_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    message = f"data path {fifo} is not a regular file but a named pipe (FIFO)"
    error = returns_promptly(lambda: load_token_splits(files_config(fifo), 512))
    assert isinstance(error, ValueError) and str(error).startswith(message)
    problems = returns_promptly(lambda: data_file_problems(files_config(fifo)))
    assert problems == [str(error)]
    # inside a folder too: every file a folder holds is data
    write_docs(tmp_path / "corpus", 3)
    os.mkfifo(tmp_path / "corpus" / "zz.pipe")
    error = returns_promptly(lambda: load_token_splits(files_config(tmp_path / "corpus"), 512))
    assert isinstance(error, ValueError) and "zz.pipe is not a regular file but a named pipe" in str(error)
    if os.path.exists("/dev/null"):
        assert load_error(files_config(Path("/dev/null"))).startswith(
            "ConfigError: data path /dev/null is not a regular file but a character device"
        )


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", "is empty (0 bytes)"),
        ("empty.jsonl", b"", "is empty (0 bytes)"),
        ("blank.jsonl", b"\n  \n\n", "holds no .jsonl records (only blank lines)"),
        ("empty.bin", b"", "is empty (0 bytes)"),
    ],
)
def test_error_empty_file_named_directly(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    write_docs(tmp_path / "good", 5)
    expected = f"data file {path} {message}"
    assert load_error(files_config(tmp_path / "good", path)) == f"ConfigError: {expected}"
    assert load_error(files_config(tmp_path / "good", val_paths=[str(path)])) == f"ConfigError: {expected}"
    assert data_file_problems(files_config(tmp_path / "good", val_paths=[str(path)])) == [expected]


def test_empty_files_in_folder_are_skipped(tmp_path: Path) -> None:
    texts = write_docs(tmp_path / "corpus", 4)
    for name, content in [("__init__.py", b""), ("empty.bin", b""), ("blank.jsonl", b"\n\n")]:
        (tmp_path / "corpus" / name).write_bytes(content)
    config = files_config(tmp_path / "corpus", val_fraction=0.5)
    train, val = load_token_splits(config, 512)
    assert sorted(documents_of(train) + documents_of(val)) == texts
    assert data_file_problems(config) == []


def test_error_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty corpus.*empty"):
        load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "empty")]), 512)
    assert data_file_problems(files_config(tmp_path / "empty")) == []  # no bad file, just no data


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
    assert data_file_problems(config) == [load_error(config).removeprefix("ConfigError: ")]


def test_error_uint32_read_as_uint16(tmp_path: Path) -> None:
    path = tmp_path / "wide.bin"
    (np.arange(1000) % 500 + 1).astype(np.uint32).tofile(path)
    config = files_config(path)  # token_dtype defaults to uint16
    message = (
        f"{path} looks like uint32 tokens read as data.token_dtype='uint16': all 1000 odd-position elements "
        "of its first 2000 are 0, as the high halves of uint32 ids below 65536 are; "
        "set data.token_dtype=uint32 if it was written as uint32"
    )
    assert load_error(config) == f"ConfigError: {message}"
    assert data_file_problems(config) == [message]
    train, val = load_token_splits(files_config(path, token_dtype="uint32", seq_len=16), 512)
    assert len(train) + len(val) == 1000


def test_uint32_heuristic_scans_a_bounded_prefix_only(tmp_path: Path) -> None:
    ids = np.ones(600_000, dtype=np.uint32)  # 1.2M uint16 elements
    ids[-1] = 1 << 20  # a non-zero high half past the scanned prefix
    path = tmp_path / "long.bin"
    ids.tofile(path)
    with pytest.raises(ValueError, match=rf"long.bin looks like uint32 .* of its first {DTYPE_SCAN_ELEMENTS} are 0"):
        load_token_splits(files_config(path), 512)


def test_uint32_heuristic_spares_real_uint16_files(tmp_path: Path) -> None:
    short = tmp_path / "short.bin"
    np.ones(31, dtype=np.uint32).tofile(short)  # 62 uint16 elements: too few to tell
    zeros = tmp_path / "zeros.bin"
    np.zeros(200, dtype=np.uint16).tofile(zeros)  # even positions all 0 as well: no sign of uint32
    assert data_file_problems(files_config(short, zeros)) == []
    load_token_splits(files_config(short, seq_len=4), 512)
    load_token_splits(files_config(zeros, seq_len=4), 512)


def test_error_token_id_out_of_vocab(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    ids = np.zeros(1000, dtype=np.uint16)
    ids[777] = 600
    ids.tofile(path)
    with pytest.raises(ValueError, match=r"big.bin holds token id 600.*vocab_size=512") as error:
        load_token_splits(DataConfig(source="files", paths=[str(path)]), 512)
    assert "token_dtype" not in str(error.value)  # ids that fit uint16 do not suggest a wrong dtype
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"t.txt.*256.*vocab_size=200.*257"):
        load_token_splits(DataConfig(source="files", paths=[str(tmp_path / "t.txt")]), 200)


def test_error_token_ids_out_of_vocab_suggest_dtype(tmp_path: Path) -> None:
    path = tmp_path / "narrow.bin"
    ids = (np.arange(1000) % 500).astype(np.uint16)
    ids.tofile(path)
    as_uint32 = ids.view(np.uint32)  # what reading pairs of uint16 ids as one uint32 gives
    offset = int(np.flatnonzero(as_uint32 >= 512)[0])
    assert as_uint32[offset] > 65535
    config = files_config(path, token_dtype="uint32")
    assert load_error(config) == (
        f"ConfigError: {path} holds token id {as_uint32[offset]} at token offset {offset} (byte {4 * offset}), "
        "not below vocab_size=512; ids this large are "
        "what a file written as uint16 gives when read as uint32: is data.token_dtype=uint32 the dtype it was "
        "written with?"
    )
    assert data_file_problems(config) == []  # the pre-flight reads no whole file, so it cannot see the ids


def test_data_file_problems_reports_every_bad_file(tmp_path: Path) -> None:
    write_docs(tmp_path / "good", 3)
    corpus = tmp_path / "corpus"
    write_docs(corpus, 2)
    np.arange(7, dtype=np.uint8).tofile(corpus / "odd.bin")  # 7 bytes: not whole uint16 tokens
    (corpus / "skipped.txt").write_text("")  # empty inside a folder: not a problem
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n")
    (np.arange(100) + 1).astype(np.uint32).tofile(tmp_path / "wide.bin")
    missing_val = tmp_path / "val" / "missing.txt"
    paths = [tmp_path / "good", corpus, tmp_path / "nope", tmp_path / "pipe", tmp_path / "empty.txt"]
    paths += [tmp_path / "blank.jsonl", tmp_path / "wide.bin"]
    config = files_config(*paths, val_paths=[str(tmp_path / "good" / "doc000.txt"), str(missing_val)])
    problems = returns_promptly(lambda: data_file_problems(config))
    assert problems == [
        f"{corpus / 'odd.bin'} has 7 bytes, not a multiple of 2 bytes per uint16 token: "
        "is data.token_dtype='uint16' the dtype it was written with?",
        f"data path {tmp_path / 'nope'} does not exist",
        f"data path {tmp_path / 'pipe'} is not a regular file but a named pipe (FIFO); "
        "data paths must be text, .jsonl or .bin files or folders of them",
        f"data file {tmp_path / 'empty.txt'} is empty (0 bytes)",
        f"data file {tmp_path / 'blank.jsonl'} holds no .jsonl records (only blank lines)",
        f"{tmp_path / 'wide.bin'} looks like uint32 tokens read as data.token_dtype='uint16': all 100 "
        "odd-position elements of its first 200 are 0, as the high halves of uint32 ids below 65536 are; "
        "set data.token_dtype=uint32 if it was written as uint32",
        f"data path {missing_val} does not exist",
    ]
    # load_token_splits stops at one of them (paths are all listed before .bin files are mapped)
    assert load_error(config).split(": ", 1)[1] in problems
    assert data_file_problems(files_config(tmp_path / "good", val_paths=[str(corpus / "doc000.txt")])) == []
    assert data_file_problems(DataConfig(source="stdlib")) == []


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


class ValidatingModule(RecordingModule):
    """Also remembers its validation batches."""

    def __init__(self) -> None:
        super().__init__()
        self.val_seen: list[torch.Tensor] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.val_seen.append(batch["input_ids"].clone())


def fit_one_step(tmp_path: Path, accumulate: int, val_batches: int) -> tuple[ValidatingModule, TextDataModule]:
    """One optimizer step, then the validation at the end of the (cut) epoch."""
    module = TextDataModule(small_files_config(tmp_path, val_batches=val_batches), vocab_size=512, seed=2)
    model = ValidatingModule()
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=accumulate,
        accumulate_grad_batches=accumulate,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=module)
    return model, module


@pytest.mark.parametrize("val_batches", [2, 1000], ids=["capped", "whole_split"])
def test_validation_batches_are_training_sized_and_cover_the_same_samples(tmp_path: Path, val_batches: int) -> None:
    model, module = fit_one_step(tmp_path, accumulate=4, val_batches=val_batches)
    # global batch 8 / 4 accumulated micro-batches: 2 sequences in training and validation alike
    assert [b.shape for b in model.seen] == [(2, 16)] * 4
    whole = min(val_batches, len(module.val_dataset) // 8)
    assert [b.shape for b in model.val_seen] == [(2, 16)] * (whole * 4)
    reference, _ = fit_one_step(tmp_path, accumulate=1, val_batches=val_batches)
    assert [b.shape for b in reference.val_seen] == [(8, 16)] * whole
    # the first `whole` global batches of the unshuffled split, with accumulation or without
    assert torch.equal(torch.cat(model.val_seen), torch.cat(reference.val_seen))


def test_validation_needs_one_global_batch_whatever_the_micro_batch(tmp_path: Path) -> None:
    module = TextDataModule(small_files_config(tmp_path, global_batch_size=256), vocab_size=512)
    module.trainer = lightning.Trainer(accumulate_grad_batches=128, logger=False, enable_progress_bar=False)
    module.setup("fit")
    count = len(module.val_dataset)
    with pytest.raises(ValueError, match=rf"validation split has {count} sequences of seq_len 16, fewer than one global batch of 256"):
        module.val_dataloader()


def test_val_batches_must_be_positive(tmp_path: Path) -> None:
    module = TextDataModule(small_files_config(tmp_path, val_batches=0), vocab_size=512)
    with pytest.raises(ValueError, match=r"data.val_batches=0 must be > 0"):
        module.val_dataloader()
