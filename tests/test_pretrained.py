"""Pretrained Hugging Face folders: sharded load under any layout, training, export, reload.

Tiny random Llama / Qwen2 models are saved with ``save_pretrained`` (nothing is downloaded),
loaded by HFCausalLM under dp_shard=2 × tp=2 and under pp=2 (× dp_shard=2) in one group of
4 ranks (real gloo), trained 3 steps, exported with ``lightning_3d.export`` and reloaded with
``AutoModelForCausalLM.from_pretrained``. The bad-input cases run without processes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_worker import hf_config
from test_parity import _torchrun

from lightning_3d.errors import ConfigError
from lightning_3d.pretrained import HFFolder

WORKER = Path(__file__).with_name("hf_worker.py")
PP = {"pp_schedule": "1f1b", "microbatches": 2}
LOGITS_ATOL = 1e-5


def save_model(folder: Path, arch: str, shard: bool = False, **overrides) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides))
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pretrained_models")
    return {
        "llama": save_model(root / "llama", "llama", shard=True),
        "qwen2": save_model(root / "qwen2", "qwen2"),
        "llama_tied": save_model(root / "llama_tied", "llama", tie_word_embeddings=True),
    }


LAYOUTS = {"dp_shard2_tp2": {"dp_shard": 2, "tp": 2}, "dp_shard2_pp2": {"dp_shard": 2, "pp": 2, **PP}}
CASES = {
    **{f"{model}_{name}": (model, layout) for model in ("llama", "qwen2") for name, layout in LAYOUTS.items()},
    "llama_tied_dp_shard2_pp2": ("llama_tied", LAYOUTS["dp_shard2_pp2"]),
    # from_pretrained inside configure_model: the weights the meta device dropped are read from its folder
    "llama_from_pretrained_dp_shard2_tp2": ("llama", LAYOUTS["dp_shard2_tp2"]),
}


@pytest.fixture(scope="module")
def roundtrips(folders, tmp_path_factory) -> dict[str, dict]:
    out_dir = tmp_path_factory.mktemp("roundtrip")
    cases = {
        name: {
            "kind": "roundtrip", "folder": str(folders[model]), "layout": layout, "max_shard_mb": 0.05 if model == "qwen2" else 2000,
            "from_pretrained": "from_pretrained" in name,
        }
        for name, (model, layout) in CASES.items()
    }
    _torchrun(4, cases, out_dir, worker=WORKER)
    return {name: torch.load(out_dir / f"{name}.pt", weights_only=False) for name in cases}


def _ok(result: dict) -> dict:
    assert "failed" not in result, result.get("traceback")
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip(case, roundtrips):
    result = _ok(roundtrips[case])
    # the first step's loss is the transformers model's own on the same global batch
    assert math.isclose(result["losses"][0], result["reference_loss"], rel_tol=1e-5)
    if "loaded_logits" in result:
        torch.testing.assert_close(result["loaded_logits"], result["reference_logits"], atol=LOGITS_ATOL, rtol=0.0)
        torch.testing.assert_close(result["exported_logits"], result["trained_logits"], atol=LOGITS_ATOL, rtol=0.0)
    else:  # pipeline parallel: the model call gives the loss, computed from the logits on the last stage
        assert math.isclose(result["trained_loss"], result["exported_loss"], rel_tol=1e-5)
    # three steps at lr 1e-3 moved the weights: the exported model is the trained one, not the start
    assert abs(result["exported_loss"] - result["reference_loss"]) > 1e-3


def test_export_writes_size_capped_shards_with_an_index(roundtrips):
    files = _ok(roundtrips["qwen2_dp_shard2_tp2"])["exported_files"]
    shards = [name for name in files if name.startswith("model-") and name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files and "config.json" in files


# ----------------------------------------------------------------------------- bad input, no processes


def test_folder_without_config(tmp_path):
    save_model(tmp_path, "llama")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        HFFolder(tmp_path)


def test_folder_without_weights(tmp_path):
    save_model(tmp_path, "llama")
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"no model\.safetensors or model\.safetensors\.index\.json .*pytorch_model\.bin"):
        HFFolder(tmp_path)


def test_missing_shard_named_in_the_index(tmp_path):
    save_model(tmp_path, "llama", shard=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / gone).unlink()
    with pytest.raises(ConfigError, match=rf"names {len(set(index['weight_map'].values()))} shard files; missing: \['{gone}'\]"):
        HFFolder(tmp_path)


def test_truncated_weights_file(tmp_path):
    save_model(tmp_path, "llama")
    file = tmp_path / "model.safetensors"
    size = file.stat().st_size
    with open(file, "r+b") as handle:
        handle.truncate(size - 1000)
    with pytest.raises(ConfigError, match=rf"model\.safetensors: its tensors need {size} bytes, the file has {size - 1000} \(truncated\)"):
        HFFolder(tmp_path)


def test_weights_that_disagree_with_the_config(tmp_path):
    save_model(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"mlp\.up_proj\.weight has shape \(64, 32\) in model\.safetensors, \(48, 32\) from config\.json"):
        HFFolder(tmp_path)


def _preflight(overrides: list[str]) -> None:
    import hydra

    from lightning_3d.train import CONF_DIR, preflight, to_config

    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra.compose(config_name="config", overrides=[*overrides, "run_dir=/tmp/x"])
    preflight(to_config(cfg))


def test_tokenizer_larger_than_the_embedding(tmp_path, folders):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path / "model"
    shutil.copytree(folders["qwen2"], folder)  # vocab 96
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["def f(x): return x"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(folder / "tokenizer.json"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 50)
    with pytest.raises(ConfigError, match=r"the tokenizer .* makes ids up to 2\d\d, but vocab_size=96"):
        _preflight(["recipe=finetune", f"model.path={folder}", f"data.paths=[{corpus}]", "trainer.devices=1", "data.seq_len=32", "data.eos_token='<unk>'"])


def test_architecture_the_strategy_cannot_plan(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96)).save_pretrained(tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 50)
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel declares no base_model_pp_plan"):
        _preflight(["recipe=finetune", f"model.path={tmp_path}", f"data.paths=[{corpus}]", "trainer.devices=2", "parallel.tp=2", "data.seq_len=32"])


# ----------------------------------------------------------------------------- the CLI recipe, end to end


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # a fresh shell's environment: an in-process run earlier in this pytest may have set launch variables
    launch_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "LOCAL_WORLD_SIZE")
    env = {key: value for key, value in os.environ.items() if key not in launch_vars} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)


def _tokenizer_folder(folder: Path, texts: list[str], vocab: int) -> None:
    """A small byte-level BPE tokenizer.json with an eos token, saved next to the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def test_finetune_recipe_end_to_end(tmp_path):
    """recipe=finetune on a saved tiny Qwen2 and a jsonl corpus tokenized by the folder's own tokenizer:
    train under tp=2, resume under pp=2, export, and load the export with from_pretrained."""
    texts = [f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": text}) for text in texts) + "\n")
    model_dir = save_model(tmp_path / "model", "qwen2", vocab_size=320, max_position_embeddings=64)
    _tokenizer_folder(model_dir, texts, vocab=300)
    common = [
        "lightning_3d.train", "recipe=finetune", f"model.path={model_dir}", f"data.paths=[{corpus}]", "data.seq_len=32",
        "data.global_batch_size=4", "trainer.devices=2", "optim.lr=1e-3", "checkpoint.every_n_steps=2", f"checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    first = _cli([*common, "parallel.tp=2", "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={tmp_path / 'run1'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    second = _cli(
        [*common, "parallel.pp=2", "parallel.pp_schedule=1f1b", "trainer.max_steps=4", "trainer.val_check_interval=2", "resume=auto",
         f"hydra.run.dir={tmp_path / 'run2'}"],
        tmp_path,
    )
    assert second.returncode == 0, second.stderr[-4000:]
    with open(tmp_path / "run2" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("train_loss")]
    assert steps and min(steps) >= 2  # resumed after step 2, under another layout
    exported = _cli(["lightning_3d.export", str(tmp_path / "ckpt" / "step-4"), str(tmp_path / "hf")], tmp_path)
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "hf").iterdir()}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokens = AutoTokenizer.from_pretrained(tmp_path / "hf")("def function_3(x):", return_tensors="pt")
    assert torch.isfinite(model(**tokens).logits).all()
