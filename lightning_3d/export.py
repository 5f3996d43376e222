"""Consolidate a sharded checkpoint into safetensors plus the model config.

    python -m lightning_3d.export CHECKPOINT_FOLDER OUT_FOLDER [--max-shard-mb N]

A run of a Hugging Face model (``model=hf``, :class:`~lightning_3d.models.hf.HFCausalLM`)
exports to a Hugging Face folder: ``config.json``, the tokenizer files of the folder it
started from, and safetensors shards of at most N MB (default 2000) with their
``model.safetensors.index.json`` — ``AutoModelForCausalLM.from_pretrained(OUT_FOLDER)``
loads it. The checkpoint is read one output shard at a time, so the export never holds the
whole model in memory.

For the reference model it

writes ``OUT_FOLDER/model.safetensors`` (full tensors, the reference model's own parameter
names) and ``OUT_FOLDER/config.json`` (the ModelConfig fields), loadable without this
library's strategy:

    model = Transformer(ModelConfig(**json.load(open("config.json"))))
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

and usable as ``model.init_from=OUT_FOLDER`` to start training from it under any layout.
Runs on one process; no process group is created.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_3d.checkpoint import (
    DCP_METADATA,
    MODEL_KEY,
    TRAINER_STATE,
    SafeLoadPlanner,
    SafeReader,
    check_shards,
    is_complete,
    load_model_weights,
    load_trainer_state,
    read_metadata,
)
from lightning_3d.errors import ConfigError
from lightning_3d.models.hf import HF_CONFIG_KEY
from lightning_3d.pretrained import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export(checkpoint: str | Path, out: str | Path, max_shard_mb: float = 2000) -> Path:
    """Write the consolidated weights and config of ``checkpoint`` into ``out``; return the weights file."""
    if not is_complete(checkpoint):
        raise ConfigError(f"{checkpoint} is not a complete checkpoint (no {DCP_METADATA} or {TRAINER_STATE})")
    trainer_state = load_trainer_state(checkpoint)
    if HF_CONFIG_KEY in trainer_state:
        return export_hf(Path(checkpoint), Path(out), trainer_state, int(max_shard_mb * 2**20))
    weights, trainer_state = load_model_weights(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / WEIGHTS_FILE
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(target), metadata={"format": "pt"})
    model_config = dict(trainer_state.get("hyper_parameters", {}).get("model", {}))
    if model_config:
        model_config["init_from"] = None  # the exported weights are the starting point now
        (out / CONFIG_FILE).write_text(json.dumps(model_config, indent=2) + "\n")
    return target


def export_hf(checkpoint: Path, out: Path, trainer_state: dict[str, Any], max_shard_bytes: int) -> Path:
    """A Hugging Face folder from a checkpoint of an HFCausalLM run, one output shard in memory at a time."""
    metadata = read_metadata(checkpoint)
    check_shards(checkpoint, metadata)
    config = dict(trainer_state[HF_CONFIG_KEY])
    prefix = f"{MODEL_KEY}.{trainer_state.get('model_root', 'model')}."
    tied = bool(config.get("tie_word_embeddings"))
    items = [
        (key, item) for key, item in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata)
        and not (tied and key[len(prefix):] == "lm_head.weight")  # stored once, as the embedding
    ]
    groups: list[list[tuple[str, TensorStorageMetadata]]] = [[]]
    size = 0
    for key, item in items:
        nbytes = item.size.numel() * torch.empty((), dtype=item.properties.dtype).element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, item))
        size += nbytes
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for index, group in enumerate(groups):
        state = {key: torch.empty(tuple(item.size), dtype=item.properties.dtype) for key, item in group}
        dcp.load(state, storage_reader=SafeReader(checkpoint), planner=SafeLoadPlanner(), no_dist=True)
        file = SINGLE_FILE if len(groups) == 1 else f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({key[len(prefix):]: tensor.contiguous() for key, tensor in state.items()}, str(out / file), metadata={"format": "pt"})
        weight_map.update({key[len(prefix):]: file for key in state})
        total += sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        del state
    if len(groups) > 1:
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    saved_dtype = str(items[0][1].properties.dtype).removeprefix("torch.") if items else None
    for key in ("dtype", "torch_dtype"):  # from_pretrained(dtype="auto") loads what was written
        if key in config or key == "dtype":
            config[key] = saved_dtype
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    source = Path(trainer_state.get("hyper_parameters", {}).get("hf_path", ""))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return out / (SINGLE_FILE if len(groups) == 1 else INDEX_FILE)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    max_shard_mb = 2000
    if "--max-shard-mb" in args:
        at = args.index("--max-shard-mb")
        max_shard_mb = float(args[at + 1])
        args = args[:at] + args[at + 2 :]
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        target = export(args[0], args[1], max_shard_mb)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target} and {target.with_name(CONFIG_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
