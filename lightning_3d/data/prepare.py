"""Tokenize text, jsonl, json, parquet or arrow files into ``.bin`` token shards with their sidecars.

    python -m lightning_3d.data.prepare --tokenizer TOKENIZER --out FOLDER [--eos-token TOKEN]
        [--text-key text] [--workers N] [--shard-tokens N] INPUT [INPUT ...]

Inputs are files, folders or globs, as in ``data.paths``. Each input file becomes the shards
``FOLDER/<input number>-<shard number>.bin`` with their sidecars (see
:mod:`lightning_3d.data.shards`), so that ``data=files data.paths=[FOLDER]`` trains on them
in input order and its startup reads no token. ``--workers`` processes tokenize input
files at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from lightning_3d.data.paths import expand_paths
from lightning_3d.data.shards import DEFAULT_SHARD_TOKENS, prepare
from lightning_3d.data.token_files import read_sidecar


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_3d.data.prepare", description=__doc__.strip().splitlines()[0]
    )
    parser.add_argument("inputs", nargs="+", help="files, folders or globs (as data.paths)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.json, a folder holding one, or 'byte'")
    parser.add_argument("--eos-token", default=None, help="the end-of-document token (default: the tokenizer folder's eos_token)")
    parser.add_argument("--text-key", default="text", help="the text column of jsonl / parquet / arrow files")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes tokenizing input files at once")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard at most")
    args = parser.parse_args(argv)
    try:
        files = [file.path for file in expand_paths(args.inputs)]
        shards = prepare(files, args.out, args.tokenizer, args.eos_token, args.text_key, args.workers, args.shard_tokens)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokens = sum(read_sidecar(shard)["tokens"] for shard in shards)
    print(f"{len(shards)} shards, {tokens:,} tokens in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
