"""Consolidate a sharded checkpoint into one safetensors file plus the model config.

    python -m lightning_3d.export CHECKPOINT_FOLDER OUT_FOLDER

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
import sys
from pathlib import Path

from safetensors.torch import save_file

from lightning_3d.checkpoint import load_model_weights

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the consolidated weights and config of ``checkpoint`` into ``out``; return the weights file."""
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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    try:
        target = export(args[0], args[1])
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {target} and {target.with_name(CONFIG_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
