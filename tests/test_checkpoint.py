"""Sharded checkpoints: save on one layout, load on others, exact resume, crashes, export/import.

One 8-rank group trains the debug recipe on dp_shard=2 × tp=2 × pp=2 with checkpoints at
steps 3 and 6 (and resumes from step 3 on the same layout); a 1-rank and a 4-rank group
then load those checkpoints under other layouts. Real gloo process groups throughout.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity import DEBUG, LOSS_RTOL, _results, pp

from lightning_3d.checkpoint import DCP_METADATA, TRAINER_STATE, complete_checkpoints, resolve_resume
from lightning_3d.config import ModelConfig
from lightning_3d.errors import ConfigError
from lightning_3d.export import CONFIG_FILE, WEIGHTS_FILE, export
from lightning_3d.export import main as export_main
from lightning_3d.models.llama import PretrainedWeights, Transformer, rotary_pairs_to_halves

LAYOUT_3D = pp(2, "1f1b") + ["parallel.dp_shard=2", "parallel.tp=2"]
CRASH_WORKER = Path(__file__).with_name("crash_worker.py")


def every(directory: Path, steps: int, keep: int = 2) -> list[str]:
    return [f"checkpoint.dir={directory}", f"checkpoint.every_n_steps={steps}", f"checkpoint.keep_last={keep}"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, store):
    cases = {
        "save_3d": DEBUG + LAYOUT_3D + every(store / "3d", 3),
        "resume_3d_same": DEBUG + LAYOUT_3D + [f"resume={store / '3d' / 'step-3'}", f"checkpoint.dir={store / 'unused'}"],
        # async: the loop goes on while step 2 is written; keep_last=1 must not delete it before step 4 is complete
        "save_async_dp8": DEBUG + ["parallel.dp_shard=8", "checkpoint.async_save=true"] + every(store / "async", 2, keep=1),
    }
    return _results(tmp_path_factory, "save_eight_ranks", 8, cases)


@pytest.fixture(scope="module")
def exported(saved, store) -> Path:
    export(store / "3d" / "step-6", store / "export")
    # the same weights in Hugging Face Llama layout: names mapped, q/k rows in halves order
    config = ModelConfig(**json.loads((store / "export" / CONFIG_FILE).read_text()))
    ours = load_file(str(store / "export" / WEIGHTS_FILE))
    hf = {}
    for name, tensor in ours.items():
        hf_name = (
            name.replace("tok_embeddings", "model.embed_tokens").replace("output.weight", "lm_head.weight")
            .replace("attention.wq", "self_attn.q_proj").replace("attention.wk", "self_attn.k_proj")
            .replace("attention.wv", "self_attn.v_proj").replace("attention.wo", "self_attn.o_proj")
            .replace("feed_forward.w1", "mlp.gate_proj").replace("feed_forward.w3", "mlp.up_proj")
            .replace("feed_forward.w2", "mlp.down_proj").replace("attention_norm", "input_layernorm")
            .replace("ffn_norm", "post_attention_layernorm")
        )
        hf_name = hf_name if hf_name.startswith(("model.", "lm_head")) else f"model.{hf_name}"
        if name.endswith("attention.wq.weight"):
            tensor = rotary_pairs_to_halves(tensor, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = rotary_pairs_to_halves(tensor, config.kv_heads)
        hf[hf_name] = tensor.contiguous()
    (store / "hf").mkdir()
    save_file(hf, str(store / "hf" / "model-00001-of-00001.safetensors"))
    return store / "export"


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, saved, store):
    crash = store / "crash_copy"
    crash.mkdir()
    shutil.copytree(store / "3d" / "step-3", crash / "step-3")
    shutil.copytree(store / "3d" / "step-6", crash / "step-6")
    # step 6 as an interrupted save leaves it: a truncated shard and no metadata
    (crash / "step-6" / DCP_METADATA).unlink()
    shard = next((crash / "step-6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    cases = {
        "load_1": DEBUG + [f"resume={store / '3d' / 'step-6'}"],
        "resume_1": DEBUG + [f"resume={store / '3d' / 'step-3'}"],
        "resume_auto_after_crash_1": DEBUG + ["resume=auto"] + every(crash, 3),
    }
    return _results(tmp_path_factory, "load_one_rank", 1, cases)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, saved, exported, store):
    step6, step3 = ([f"resume={store / '3d' / f'step-{n}'}"] for n in (6, 3))
    frozen = ["optim.lr=0.0", "trainer.max_steps=1"]  # lr 0: the weights stay the imported ones
    cases = {
        "load_dp4": DEBUG + ["parallel.dp_shard=4"] + step6,
        "load_tp4": DEBUG + ["parallel.dp_shard=1", "parallel.tp=4"] + step6,
        "load_pp4": DEBUG + pp(4, "1f1b") + ["parallel.dp_shard=1"] + step6,
        "load_cp2_dp2": DEBUG + ["parallel.cp=2", "parallel.dp_shard=2"] + step6,
        "resume_dp4": DEBUG + ["parallel.dp_shard=4"] + step3,
        "resume_interleaved_pp2_tp2": DEBUG + pp(2, "interleaved_1f1b", 2) + ["parallel.dp_shard=1", "parallel.tp=2"] + step3,
        "init_from_export_dp2_tp2": DEBUG + ["parallel.dp_shard=2", "parallel.tp=2", f"model.init_from={exported}"] + frozen,
        "init_from_hf_pp2_tp2": DEBUG + pp(2, "1f1b") + ["parallel.dp_shard=1", "parallel.tp=2", f"model.init_from={store / 'hf'}"] + frozen,
        "init_from_export_trains": DEBUG + ["parallel.dp_shard=4", f"model.init_from={exported / WEIGHTS_FILE}", "trainer.max_steps=3"],
    }
    return _results(tmp_path_factory, "load_four_ranks", 4, cases)


def assert_same_state(loaded: dict, saved: dict) -> None:
    """Weights and optimizer states read back exactly (DCP copies bytes, whatever the layout)."""
    assert loaded["weights"].keys() == saved["weights"].keys()
    for name, tensor in loaded["weights"].items():
        assert torch.equal(tensor, saved["weights"][name]), name
    assert loaded["optimizer"].keys() == saved["optimizer"].keys()
    assert any(key.endswith("exp_avg_sq") for key in saved["optimizer"])
    for key, value in loaded["optimizer"].items():
        expected = saved["optimizer"][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, expected), key
        else:
            assert value == expected, key


# ----------------------------------------------------------------------------- save

def test_periodic_checkpoints_keep_last(saved, store):
    assert saved["save_3d"]["global_step"] == 6
    assert [path.name for path in complete_checkpoints(store / "3d")] == ["step-3", "step-6"]
    files = {path.name for path in (store / "3d" / "step-6").iterdir()}
    assert {DCP_METADATA, TRAINER_STATE, "rng"} <= files
    assert len([name for name in files if name.endswith(".distcp")]) == 8  # one shard file per rank
    assert len(list((store / "3d" / "step-6" / "rng").iterdir())) == 8


def test_async_save_keeps_only_the_newest_complete(saved, store):
    # steps 2, 4, 6 saved in the background with keep_last=1: only step 6 is left, complete
    assert [path.name for path in complete_checkpoints(store / "async")] == ["step-6"]
    assert sorted(path.name for path in (store / "async").iterdir()) == ["step-6"]
    weights, _ = export_weights(store / "async" / "step-6", store / "async_export")
    for name, tensor in saved["save_async_dp8"]["weights"].items():
        assert torch.equal(weights[name], tensor), name


def export_weights(checkpoint: Path, out: Path) -> tuple[dict, dict]:
    export(checkpoint, out)
    return load_file(str(out / WEIGHTS_FILE)), json.loads((out / CONFIG_FILE).read_text())


# ----------------------------------------------------------------------------- reshard

@pytest.mark.parametrize("case", ["load_dp4", "load_tp4", "load_pp4", "load_cp2_dp2"])
def test_load_under_another_layout(case, saved, four_ranks):
    assert four_ranks[case]["global_step"] == 6 and four_ranks[case]["losses"] == []
    assert_same_state(four_ranks[case], saved["save_3d"])


def test_load_on_one_process(saved, one_rank):
    assert one_rank["load_1"]["global_step"] == 6
    assert_same_state(one_rank["load_1"], saved["save_3d"])


# ----------------------------------------------------------------------------- exact resume

def test_resume_same_layout_is_bitwise(saved):
    uninterrupted, resumed = saved["save_3d"]["losses"], saved["resume_3d_same"]["losses"]
    assert len(uninterrupted) == 6 and len(resumed) == 3
    assert resumed == uninterrupted[3:]  # float equality: bit for bit
    assert resumed[0] != resumed[1]
    assert saved["resume_3d_same"]["val_loss"] == saved["save_3d"]["val_loss"]


@pytest.mark.parametrize("group, case", [("one", "resume_1"), ("four", "resume_dp4"), ("four", "resume_interleaved_pp2_tp2")])
def test_resume_other_layout_matches(group, case, saved, one_rank, four_ranks):
    result = (one_rank if group == "one" else four_ranks)[case]
    expected = saved["save_3d"]["losses"][3:]
    assert len(result["losses"]) == 3
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(expected), rtol=LOSS_RTOL, atol=0.0)


# ----------------------------------------------------------------------------- crash safety

def test_resume_auto_skips_an_interrupted_checkpoint(saved, one_rank, store):
    result = one_rank["resume_auto_after_crash_1"]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(saved["save_3d"]["losses"][3:]), rtol=LOSS_RTOL, atol=0.0)
    # step 6 was written again, whole this time
    assert [path.name for path in complete_checkpoints(store / "crash_copy")] == ["step-3", "step-6"]


def test_kill_during_save_torchrun_restarts_and_resumes(saved, tmp_path):
    """Rank 1 of 2 is SIGKILLed while writing step 4; torchrun restarts both workers, and with
    resume=auto they go on from step 2, the last complete checkpoint."""
    ckpt, run_dir, log = tmp_path / "ckpt", tmp_path / "run", tmp_path / "torchrun.log"
    overrides = ["recipe=debug", "trainer.devices=2", "parallel.tp=2", f"checkpoint.dir={ckpt}", "checkpoint.every_n_steps=2",
                 "checkpoint.keep_last=2", "resume=auto", f"run_dir={run_dir}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
               str(CRASH_WORKER), "1", "4", *overrides]
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300).returncode
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "exitcode: -9" in output or "Signal 9" in output or "SIGKILL" in output, output[-3000:]  # the first attempt died
    assert f"Restoring states from the checkpoint path at {ckpt / 'step-2'}" in output
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    losses = {int(row["step"]): float(row["train_loss"]) for row in rows if row.get("train_loss")}  # the restart's rows come last
    assert sorted(losses) == [2, 3, 4, 5]  # (0-based) steps 3..6: it went on from step 2
    expected = saved["save_3d"]["losses"][2:]
    torch.testing.assert_close(torch.tensor([losses[s] for s in range(2, 6)]), torch.tensor(expected), rtol=LOSS_RTOL, atol=0.0)
    # keep_last=2 dropped nothing: Lightning never deletes the checkpoint a run resumed from
    assert [path.name for path in complete_checkpoints(ckpt)] == ["step-2", "step-4", "step-6"]


# ----------------------------------------------------------------------------- export / import

def test_export_loads_into_plain_model_with_same_logits(four_ranks, exported):
    config = ModelConfig(**json.loads((exported / CONFIG_FILE).read_text()))
    model = Transformer(config)
    model.load_state_dict(load_file(str(exported / WEIGHTS_FILE)))  # strict: every name, every shape
    with torch.no_grad():
        logits = model((torch.arange(32) * 7 % config.vocab_size)[None])
    parallel = four_ranks["load_tp4"]["logits"]  # the checkpoint loaded at tp=4, run through the parallel model
    torch.testing.assert_close(logits, parallel, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize("case", ["init_from_export_dp2_tp2", "init_from_hf_pp2_tp2"])
def test_import_starts_from_the_exported_weights(case, saved, four_ranks):
    result, trained = four_ranks[case], saved["save_3d"]
    assert result["weights"].keys() == trained["weights"].keys()
    for name, tensor in result["weights"].items():
        torch.testing.assert_close(tensor, trained["weights"][name], rtol=0.0, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # the first batch's loss is the trained model's, far below a fresh start's
    assert result["losses"][0] < 0.8 * trained["losses"][0]


def test_import_then_training_goes_on(saved, four_ranks):
    losses = four_ranks["init_from_export_trains"]["losses"]
    assert len(losses) == 3 and max(losses) < 0.8 * saved["save_3d"]["losses"][0]


# ----------------------------------------------------------------------------- bad input (no process group)

def test_resume_path_errors(tmp_path):
    with pytest.raises(ValueError, match="no such checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)
    (tmp_path / "step-1").mkdir()
    with pytest.raises(ValueError, match="is not a checkpoint"):
        resolve_resume(str(tmp_path / "step-1"), tmp_path)
    assert resolve_resume("auto", tmp_path) is None  # only an incomplete folder: fresh start
    assert resolve_resume(None, tmp_path) is None


def test_export_cli_errors(tmp_path, capsys):
    assert export_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "is not a complete checkpoint" in capsys.readouterr().err
    assert export_main([]) == 2


def test_init_from_shape_mismatch_names_parameter(saved, exported):
    config = ModelConfig(**{**json.loads((exported / CONFIG_FILE).read_text()), "dim": 32, "init_from": str(exported)})
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(512, 64\) in the file but \(512, 32\)"):
        PretrainedWeights(config)


def test_resume_into_another_model_shape_names_parameter(saved, exported, store):
    from lightning_3d.config import Config
    from lightning_3d.train import check_resume

    model = ModelConfig(**json.loads((exported / CONFIG_FILE).read_text()))
    config = Config(model=model, resume=str(store / "3d" / "step-6"))
    check_resume(config)  # the debug model fits
    model.dim = 32
    with pytest.raises(ValueError, match=r"model.tok_embeddings.weight has shape \(512, 64\) in the checkpoint but \(512, 32\) in the model"):
        check_resume(config)


def test_truncated_shard_is_named(saved, store, tmp_path):
    from lightning_3d.checkpoint import fit_problems

    copy = tmp_path / "step-6"
    shutil.copytree(store / "3d" / "step-6", copy)
    shard = sorted(copy.glob("*.distcp"))[3]
    shard.write_bytes(shard.read_bytes()[:-10])
    (problem,) = fit_problems(copy, {})
    assert f"shard {shard.name} is truncated" in problem and "the index needs" in problem


def test_metadata_unpickler_refuses_foreign_objects(tmp_path):
    import pickle

    from lightning_3d.checkpoint import read_metadata

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    (tmp_path / DCP_METADATA).write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match="refers to posix.system, which is not allowed"):
        read_metadata(tmp_path)


def test_old_checkpoint_is_removed_only_after_the_pending_save_completes(tmp_path):
    from concurrent.futures import Future

    from lightning_3d.runtime import Checkpointer

    checkpointer = Checkpointer("model", pipelined=False, layout={}, rank=0, world_size=1)
    old = tmp_path / "step-2"
    old.mkdir()
    checkpointer._pending_save = Future()  # a background save of a newer step, still running
    checkpointer.remove(old)
    assert old.exists()
    checkpointer._pending_save.set_result(None)
    checkpointer.finish_pending()
    assert not old.exists()
    (tmp_path / "step-4").mkdir()
    checkpointer.remove(tmp_path / "step-4")  # nothing pending: removed at once
    assert not (tmp_path / "step-4").exists()


def test_hugging_face_llama_imports_with_the_same_logits(tmp_path):
    """A real transformers LlamaForCausalLM, saved as safetensors, read through model.init_from."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
    )
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.normal_(0.0, 0.2)  # not the HF init: every weight matters
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    config = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96, max_seq_len=64, init_from=str(tmp_path))
    weights = PretrainedWeights(config)
    assert weights.hf_format
    model = Transformer(config).eval()
    model.load_state_dict({name: weights.tensor(name) for name, _ in model.named_parameters()})
    tokens = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"rope_theta": 500000.0}, r"rope_theta=500000\.0, but model\.rope_theta=10000\.0"),
        ({"rms_norm_eps": 1e-6}, r"rms_norm_eps=1e-06, but model\.norm_eps=1e-05"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope scaling .*llama3.* is not implemented by the reference model; use model=hf"),
    ],
    ids=["rope_theta", "norm_eps", "rope_scaling"],
)
def test_hugging_face_config_fields_must_agree_with_the_model_config(tmp_path, change, expected):
    """config.json is read: a field the forward uses that disagrees is an error naming both values."""
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(change)
    if "rope_theta" in change or "rope_scaling" in change:
        saved.pop("rope_parameters", None)  # transformers 5 keeps both there; give them the older way
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_dim=96, max_seq_len=64, init_from=str(tmp_path))
    with pytest.raises(ConfigError, match=expected):
        PretrainedWeights(config)
