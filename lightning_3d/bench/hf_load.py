"""Loading a pretrained Hugging Face folder: peak memory per rank, against the model's size.

    python -m lightning_3d.bench.hf_load [--hidden 768] [--layers 8] [--vocab 32000] [--ranks 4]
                                         [--layouts dp_shard4,dp_shard2_tp2] [--quick]

Writes a random Llama (``transformers.LlamaConfig``: ``--hidden``, intermediate size
8/3 × hidden rounded to 256, ``--layers``, a head per 64 dims, 4 key/value heads,
``--vocab``, untied head) to a temporary folder with ``save_pretrained`` (fp32 safetensors,
100 MB shard files; the defaults give about 400 MB), and frees it. Then, for each layout,
starts ``--ranks`` processes that load the folder with :class:`~lightning_3d.models.hf.HFCausalLM`
under ``ModelParallel4DStrategy(**layout)``: a callback reads each rank's memory in
``on_train_start`` (the weights are in place, no step has run) and stops the fit there.
Side by side, in the same run: ``AutoModelForCausalLM.from_pretrained(folder)`` in one process,
measured right after it returns and again after every parameter was read once: transformers
keeps fp32 weights as views of the memory-mapped files, so they count in RSS only once read.

Reported per rank (``/proc/self/status``): the peak RSS growth during the load (``VmHWM`` in
``on_train_start`` minus ``VmRSS`` after the imports, the high-water mark reset there), the
RSS still held then, the bytes of this rank's local parameter shards, and the parameters that
were read whole instead of as this rank's slice (the fall-back of
:func:`lightning_3d.parallel.materialize.materialize`). Not ``getrusage``: its peak survives
``exec``, so it would report the launcher's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_3d.bench.launch import run_workers

MODULE = "lightning_3d.bench.hf_load"
DIMS = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
MIB = 2**20
SEQ = 16
QUICK = {"hidden": 256, "layers": 4, "vocab": 8000}


def parse_layout(text: str) -> dict[str, int]:
    """``"dp_shard2_tp2"`` → ``{"dp_shard": 2, "tp": 2}``."""
    found = re.findall(r"(dp_replicate|dp_shard|cp|tp|pp)(\d+)", text)
    if not found or "_".join(f"{dim}{n}" for dim, n in found) != text:
        raise SystemExit(f"layout {text!r}: expected e.g. dp_shard4 or dp_shard2_tp2")
    return {dim: int(n) for dim, n in found}


def layout_name(layout: dict[str, int]) -> str:
    return " × ".join(f"{dim}={layout[dim]}" for dim in DIMS if layout.get(dim, 1) > 1) or "1 process"


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS`` now, ``VmHWM`` peak) in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) * 1024


def _start_measuring() -> int:
    """Free what the imports left, reset the RSS high-water mark; returns the RSS now."""
    from lightning_3d.bench.measure import release_memory, reset_peak_rss

    release_memory()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs): the peak would include the imports")
    return _status("VmRSS")


# ----------------------------------------------------------------------------- the folder


def llama_config(hidden: int, layers: int, vocab: int) -> Any:
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    kv_heads = 4 if heads % 4 == 0 else heads  # grouped-query attention where the heads allow
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=round(hidden * 8 / 3 / 256) * 256 or 256, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False,
        max_position_embeddings=256,
    )


def write_folder(folder: Path, hidden: int, layers: int, vocab: int) -> dict[str, Any]:
    """A random fp32 Llama saved as 100 MB safetensors shards; the model is freed before returning."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from lightning_3d.bench.measure import release_memory

    config = llama_config(hidden, layers, vocab)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="100MB")
    del model
    gc.collect()
    release_memory()
    files = sorted(folder.glob("*.safetensors"))
    return {
        "params": params,
        "files": len(files),
        "on_disk_bytes": sum(f.stat().st_size for f in files),
        "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")},
    }


# ----------------------------------------------------------------------------- the workers


def _memory(rank: int, start: float, rss_before: int, file_before: int, shard_bytes: int) -> dict[str, Any]:
    """What one process reports: its peak and held memory since the measurement started."""
    return {
        "rank": rank,
        "seconds": time.perf_counter() - start,
        "rss_before": rss_before,
        "peak": _status("VmHWM"),
        "held": _status("VmRSS"),
        "held_file": _status("RssFile") - file_before,
        "shard_bytes": shard_bytes,
    }


class _CountingInit:
    """Wraps the module's ``init_parameter`` (a :class:`~lightning_3d.pretrained.FolderInit`) to note
    which parameters were read as a slice and which whole."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sliced: list[str] = []
        self.whole: list[tuple[str, int]] = []

    def __call__(self, name: str, full: Any, generator: Any) -> None:
        self.whole.append((name, full.numel() * full.element_size()))
        self.inner(name, full, generator)

    def read_shard(self, name: str, index: tuple[slice, ...]) -> Any:
        self.sliced.append(name)
        return self.inner.read_shard(name, index)


def _worker(out: Path, folder: Path, layout: dict[str, int]) -> None:
    """One rank: load ``folder`` under ``layout``, measure in ``on_train_start``, stop there."""
    import lightning as L
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (imported before the baseline RSS, as HFCausalLM needs it)
    from torch.distributed.tensor import DTensor
    from torch.utils.data import DataLoader

    from lightning_3d.models.hf import HFCausalLM
    from lightning_3d.strategy import ModelParallel4DStrategy

    world = int(os.environ["WORLD_SIZE"])
    rss_before = _start_measuring()
    file_before = _status("RssFile")
    start = time.perf_counter()
    module = HFCausalLM(folder)
    counting = _CountingInit(module.init_parameter)
    module.init_parameter = counting
    result: dict[str, Any] = {}

    class Measure(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            local = [p.to_local() if isinstance(p, DTensor) else p for p in pl_module.parameters()]
            largest_whole = max(counting.whole, key=lambda item: item[1], default=("", 0))
            mine = {
                **_memory(trainer.global_rank, start, rss_before, file_before, sum(t.numel() * t.element_size() for t in local)),
                "sliced": len(counting.sliced),
                "whole": len(counting.whole),
                "whole_bytes": sum(size for _, size in counting.whole),
                "largest_whole": list(largest_whole),
                "whole_names": sorted({re.sub(r"\.\d+\.", ".N.", name) for name, _ in counting.whole}),
            }
            every: list[Any] = [None] * world
            dist.all_gather_object(every, mine)
            result["ranks"] = every
            trainer.should_stop = True  # the weights are in place: no step is needed

    samples = [{"input_ids": torch.zeros(SEQ, dtype=torch.long), "labels": torch.zeros(SEQ, dtype=torch.long)}] * 8
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy=ModelParallel4DStrategy(**layout), max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[Measure()], default_root_dir=str(out.parent),
    )
    trainer.fit(module, DataLoader(samples, batch_size=1))
    if trainer.global_step != 0:
        raise RuntimeError(f"{trainer.global_step} training steps ran; the measurement expects none")
    if trainer.global_rank == 0:
        out.write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def _pretrained_worker(folder: Path) -> None:
    """The naive way: ``from_pretrained`` in one process, then every weight read once; prints JSON.

    transformers keeps fp32 weights as views of the memory-mapped files: a page counts in
    RSS once read. Measured right after ``from_pretrained`` and after summing every
    parameter (what a first forward does)."""
    import torch
    from transformers import AutoModelForCausalLM

    rss_before = _start_measuring()
    file_before = _status("RssFile")
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    params = list(model.parameters())

    def figures() -> dict[str, Any]:
        return {
            **_memory(0, start, rss_before, file_before, sum(p.numel() * p.element_size() for p in params)),
            "dtype": str(params[0].dtype).removeprefix("torch."),
        }

    loaded = figures()
    with torch.no_grad():
        for param in params:
            param.sum()
    print(json.dumps({"loaded": loaded, "read": figures()}))


def run_pretrained(folder: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", MODULE, "--pretrained-worker", str(folder)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"from_pretrained worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the report


def row(label: str, ranks: int, model_bytes: int, measured: list[dict[str, Any]]) -> dict[str, Any]:
    growth = [(r["peak"] - r["rss_before"]) / MIB for r in measured]
    held = [(r["held"] - r["rss_before"]) / MIB for r in measured]
    shards = [r["shard_bytes"] / MIB for r in measured]
    return {
        "layout": label,
        "ranks": ranks,
        "model_mib": model_bytes / MIB,
        "growth_max": max(growth),
        "ratio": max(growth) / (model_bytes / MIB),
        "held_max": max(held),
        "shard_max": max(shards),
        "seconds_max": max(r["seconds"] for r in measured),
        "per_rank": measured,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layouts", default="dp_shard4,dp_shard2_tp2", help="comma-separated, e.g. dp_shard4,dp_shard2_tp2")
    parser.add_argument("--quick", action="store_true", help=f"a small model ({QUICK}) for a fast check")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--pretrained-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker, args.folder, parse_layout(args.layout))
        return
    if args.pretrained_worker is not None:
        _pretrained_worker(args.pretrained_worker)
        return
    if args.quick:
        args.hidden, args.layers, args.vocab = QUICK["hidden"], QUICK["layers"], QUICK["vocab"]
    layouts = args.layouts.split(",")
    for text in layouts:
        total = 1
        for n in parse_layout(text).values():
            total *= n
        if total != args.ranks:
            raise SystemExit(f"layout {text}: {total} ranks, --ranks is {args.ranks}")
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        info = write_folder(folder, args.hidden, args.layers, args.vocab)
        model_bytes = info["on_disk_bytes"]
        print(f"model: Llama {info['config']}, {info['params'] / 1e6:.1f} M parameters, fp32, "
              f"{model_bytes / MIB:.1f} MiB in {info['files']} safetensors files", flush=True)
        rows = []
        for text in layouts:
            layout = parse_layout(text)
            measured = run_workers(MODULE, args.ranks, "--folder", str(folder), "--layout", text)["ranks"]
            rows.append(row(layout_name(layout), args.ranks, model_bytes, measured))
        pretrained = run_pretrained(folder)
        rows.append(row("`from_pretrained`, right after (weights mapped from the files, not yet read)", 1, model_bytes,
                        [pretrained["loaded"]]))
        rows.append(row("`from_pretrained`, then every weight read once (as a first forward does)", 1, model_bytes,
                        [pretrained["read"]]))
    print("| layout | ranks | model on disk MiB | peak RSS growth per rank, max MiB | ratio to model size | "
          "RSS held after loading, max MiB | this rank's parameters MiB, max |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['ranks']} | {r['model_mib']:.1f} | {r['growth_max']:.1f} | {r['ratio']:.2f} | "
              f"{r['held_max']:.1f} | {r['shard_max']:.1f} |")
    print()
    print("per rank: peak RSS growth / RSS held (of it file-backed) / local parameters, MiB; how the parameters "
          "were read; seconds from HFCausalLM() to on_train_start (from_pretrained: to the figure)")
    for r in rows[:-2]:
        for m in r["per_rank"]:
            name, size = m["largest_whole"]
            whole = (f"{m['whole']} read whole ({m['whole_bytes'] / MIB:.2f} MiB in all, largest {name} {size / MIB:.2f} MiB)"
                     if m["whole"] else "none read whole")
            print(f"  {r['layout']}, rank {m['rank']}: {(m['peak'] - m['rss_before']) / MIB:.1f} / "
                  f"{(m['held'] - m['rss_before']) / MIB:.1f} ({m['held_file'] / MIB:.1f}) / {m['shard_bytes'] / MIB:.1f}; "
                  f"{m['sliced']} parameters read as a slice, {whole}; {m['seconds']:.1f} s")
        kinds = sorted({kind for m in r["per_rank"] for kind in m["whole_names"]})
        if kinds:
            print(f"  {r['layout']}: read whole: {kinds}")
    for key, m in pretrained.items():
        print(f"  from_pretrained, {key}: {(m['peak'] - m['rss_before']) / MIB:.1f} / "
              f"{(m['held'] - m['rss_before']) / MIB:.1f} ({m['held_file'] / MIB:.1f}) / "
              f"{m['shard_bytes'] / MIB:.1f} ({m['dtype']}); {m['seconds']:.1f} s")
    for r in rows[:-2]:
        print(f"RATIO peak_growth {r['layout']} / from_pretrained_read: {r['growth_max'] / rows[-1]['growth_max']:.3f}")
    print(f"total {time.perf_counter() - began:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps({"model": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
