"""Hydra entry point: ``python -m lightning_3d.train recipe=tiny parallel.tp=2 trainer.devices=4``.

``conf/config.yaml`` composes one option of each group (model, data, parallel, trainer,
optim) and then one of the ``recipe`` group (``conf/recipe/*.yaml``: ``# @package _global_``
files that override any of them). The composed config is checked against the :class:`Config`
dataclasses, so a misspelt key fails with its name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import traceback
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Union

import hydra
import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_3d.callbacks.checkpoint import StepCheckpoint
from lightning_3d.callbacks.comm import CommAccounting
from lightning_3d.callbacks.performance import PerformanceMonitor
from lightning_3d.callbacks.summary import RunSummary
from lightning_3d.checkpoint import fit_problems, raise_if_problems, resolve_resume
from lightning_3d.config import Config
from lightning_3d.data import TextDataModule
from lightning_3d.data.sources import data_file_problems
from lightning_3d.dims import ParallelDims
from lightning_3d.errors import ConfigError
from lightning_3d.flops import flops_per_token
from lightning_3d.health import summary
from lightning_3d.models.hf import HFCausalLM
from lightning_3d.models.llama import PretrainedWeights, Transformer
from lightning_3d.module import CausalLM
from lightning_3d.nonfinite import NonFiniteError, policy_problems
from lightning_3d.plans.hf import context_parallel_problems, hf_plan, hf_shape_problems, pipeline_problems
from lightning_3d.pretrained import HFFolder, model_config_of
from lightning_3d.strategy import ModelParallel4DStrategy
from lightning_3d.validation import (
    Hardware,
    layout_problems,
    perf_problems,
    raise_problems,
    trainer_problems,
)

# config groups chosen by name on the command line (`recipe=tiny`), besides Config's own fields
CONFIG_GROUPS = ("model", "data", "parallel", "trainer", "optim", "recipe")


def _find_dir(name: str) -> Path:
    """``conf`` inside an installed wheel (``lightning_3d/_conf``), else at the top of the checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / f"_{name}", package.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ directory next to {package}")


CONF_DIR = _find_dir("conf")
RECIPES_DIR = CONF_DIR / "recipe"  # a config group like the others, selected as recipe=NAME
RECIPE_HEADER = "# @package _global_"


def register_configs() -> None:
    """Store the schema that ``conf/config.yaml`` starts from in Hydra's ConfigStore."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Composed Hydra config → typed :class:`Config` (unknown keys and bad types raise)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(merged)


def override_key_problems(args: list[str]) -> list[str]:
    """Command-line overrides whose key is not in :class:`Config`, each with the valid keys there.

    Checked before Hydra composes anything, so the message can list what would have been
    accepted there (and the closest match) rather than only the key.
    """
    problems = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # a Hydra flag (--cfg job, -m), not an override
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.split(".")[0].split("/")[0] == "hydra" or key in CONFIG_GROUPS:
            continue
        node: Any = Config
        path: list[str] = []
        for part in key.split("."):
            if not dataclasses.is_dataclass(node):
                break  # inside a list or dict value
            names = [f.name for f in dataclasses.fields(node)] + (list(CONFIG_GROUPS) if not path else [])
            if part not in names:
                where = ".".join(path) or "the top level"
                close = difflib.get_close_matches(part, names, n=1)
                hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
                problems.append(f"unknown config key {key!r}{hint}; valid keys at {where}: {', '.join(names)}")
                break
            node = typing.get_type_hints(node)[part]
            path.append(part)
    return problems


def _dotted_keys(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict) or not tree:
        return [prefix]
    return [key for name, value in tree.items() for key in _dotted_keys(value, f"{prefix}{name}.")]


def recipe_key_problems(args: list[str]) -> list[str]:
    """Keys of the chosen recipe file that are not in :class:`Config`, with the valid keys there
    (or the file's missing ``# @package _global_`` line)."""
    chosen = [arg.split("=", 1)[1] for arg in args if arg.lstrip("+").startswith("recipe=")]
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").defaults)
    name = chosen[-1] if chosen else next(entry["recipe"] for entry in defaults if isinstance(entry, dict) and "recipe" in entry)
    path = RECIPES_DIR / f"{name}.yaml"
    if not path.is_file():
        return []  # Hydra lists the available recipes
    if not path.read_text().startswith(RECIPE_HEADER):
        # without it Hydra would put the recipe's keys under `recipe.` instead of overriding the groups
        return [f"recipe {path} must start with {RECIPE_HEADER!r}"]
    tree = OmegaConf.to_container(OmegaConf.load(path))
    keys = [key.rstrip(".") for key in _dotted_keys({k: v for k, v in tree.items() if k != "defaults"})]
    return [f"{path}: {problem}" for problem in override_key_problems([f"{key}=" for key in keys])]


def world_size_of(config: Config) -> int:
    devices = config.trainer.devices
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices={devices!r} must be a positive number of processes per node")
    return devices * config.trainer.num_nodes


def _problem_of(check: Callable[[], Any]) -> list[str]:
    try:
        check()
    except (ValueError, FileNotFoundError) as error:
        return [str(error)]
    return []


def preflight(config: Config, hardware: Optional[Hardware] = None) -> ParallelDims:
    """Every check that needs no process group, all at once: the layout against the world size,
    the model and the data; the trainer against the machine; the training, checkpoint and resume
    options; the data files and the weights to start from. Raises ``ValueError`` listing every
    problem, each with its numbers and a fix."""
    problems = trainer_problems(config.trainer, hardware)
    if config.model.source not in ("reference", "hf"):
        problems.append(f"model.source={config.model.source!r} must be 'reference' or 'hf'")
    if config.model.source == "hf" and not config.model.path:
        problems.append("model=hf needs the model folder: model.path=/path/to/folder (config.json + safetensors)")
    if config.model.path:
        try:
            folder_problems = use_model_folder(config)
        except ValueError as error:
            folder_problems = [str(error)]
        if folder_problems:  # every other check needs the folder's shapes
            raise_problems(problems + folder_problems)
    dims = None
    try:
        world_size: Optional[int] = world_size_of(config)
    except ValueError:
        world_size = None  # trainer_problems says why
    if world_size is not None and config.trainer.num_nodes >= 1:
        dims, layout = layout_problems(
            config.parallel, world_size, config.model, config.data, config.trainer.accumulate_grad_batches
        )
        problems += layout
    model_problems = _problem_of(config.model.validate)
    problems += [p for p in model_problems if p not in problems]
    problems += perf_problems(config.perf, dims, config.trainer.accelerator, hardware)
    problems += policy_problems(config.training.on_nonfinite, config.training.max_skipped)
    problems += _problem_of(lambda: checkpoint_callback(config))
    problems += data_file_problems(config.data, config.model.vocab_size)
    if not model_problems:
        problems += _problem_of(lambda: check_resume(config))
        if config.model.init_from:
            problems += _problem_of(lambda: PretrainedWeights(config.model))
    raise_problems(problems)
    assert dims is not None  # no problems means the layout resolved
    return dims


def use_model_folder(config: Config) -> list[str]:
    """``model=hf``: the model's shapes come from the folder's ``config.json``, and text is
    tokenized with the folder's own tokenizer unless the data config names another one.
    Returns what the layout asks of the model that it cannot give."""
    folder = HFFolder(config.model.path)
    if config.model.init_from:
        raise ConfigError(f"model.path={config.model.path} is the starting point; model.init_from={config.model.init_from} cannot be used with it")
    config.model = model_config_of(folder, config.model)
    # the plan the strategy will derive, and what the layout asks of the model, before any process starts
    model = folder.meta_model()
    plan = hf_plan(model, "model", config.parallel.tp) if (config.parallel.tp, config.parallel.pp, config.parallel.cp) != (1, 1, 1) else None
    problems = hf_shape_problems(model, config.parallel.tp, plan) if plan is not None else []
    problems += context_parallel_problems(model, config.parallel.cp) if config.parallel.cp > 1 else []
    problems += pipeline_problems(model, config.parallel.pp) if config.parallel.pp > 1 else []
    if config.data.tokenizer == "byte" and (folder.path / "tokenizer.json").is_file():
        config.data.tokenizer = str(folder.path)
    return problems


def checkpoint_callback(config: Config) -> Optional[StepCheckpoint]:
    ckpt = config.checkpoint
    StepCheckpoint.check_options(ckpt.every_n_steps, ckpt.keep_last)
    if ckpt.every_n_steps is None:
        return None
    return StepCheckpoint(config.checkpoint_dir, ckpt.every_n_steps, ckpt.keep_last)


def resume_path(config: Config) -> Optional[str]:
    """The checkpoint ``trainer.fit`` resumes from (``resume=auto``: the latest complete one, or none)."""
    return resolve_resume(config.resume, config.checkpoint_dir)


def check_resume(config: Config) -> None:
    """A resume checkpoint that is missing, incomplete, truncated or shaped for another model
    fails here, before any process starts."""
    path = resume_path(config)
    if path is not None:
        with torch.device("meta"):
            model = HFFolder(config.model.path).meta_model() if config.model.path else Transformer(config.model)
            shapes = {f"model.{name}": t.shape for name, t in model.state_dict().items()}
        raise_if_problems(f"resume={path} does not fit model config", fit_problems(path, shapes))


def build(
    config: Config, callbacks: Optional[list[Callback]] = None, strategy: Optional[Union[str, Strategy]] = None
) -> tuple[L.Trainer, L.LightningModule, TextDataModule]:
    """Everything a run needs, checked up front (:func:`preflight`); shared by the CLI and the tests.

    ``strategy``: a Lightning strategy to run instead of :class:`ModelParallel4DStrategy` with
    everything else the same (the benchmarks compare against Lightning's own).
    """
    preflight(config)
    checkpointing = checkpoint_callback(config)
    L.seed_everything(config.seed, workers=True, verbose=False)
    tcfg = config.trainer
    if tcfg.accelerator == "cpu":
        # several processes share the cores: one thread pool each avoids oversubscription
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tcfg.devices))
    run_dir = Path(config.run_dir)
    val_every = (tcfg.val_check_interval or tcfg.max_steps) * tcfg.accumulate_grad_batches
    trainer = L.Trainer(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        num_nodes=tcfg.num_nodes,
        strategy=strategy or ModelParallel4DStrategy(
            config.parallel,
            perf=config.perf,
            init_seed=config.seed,
            async_save=config.checkpoint.async_save,
            on_nonfinite=config.training.on_nonfinite,
            max_skipped=config.training.max_skipped,
        ),
        precision=tcfg.precision,
        max_steps=tcfg.max_steps,
        log_every_n_steps=tcfg.log_every_n_steps,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=tcfg.num_sanity_val_steps,
        gradient_clip_val=tcfg.gradient_clip_val,
        accumulate_grad_batches=tcfg.accumulate_grad_batches,
        deterministic=tcfg.deterministic,
        enable_progress_bar=tcfg.enable_progress_bar,
        enable_checkpointing=checkpointing is not None,
        use_distributed_sampler=False,  # the datamodule's sampler already follows the global order
        logger=CSVLogger(save_dir=str(run_dir), name="", version=""),
        callbacks=[
            RunSummary(config.data.global_batch_size * config.data.seq_len, run_dir),
            PerformanceMonitor(flops_per_token(config.model, config.data.seq_len), config.perf.peak_flops),
            LearningRateMonitor(logging_interval="step"),
            *([CommAccounting()] if config.perf.comm_accounting else []),
            *([checkpointing] if checkpointing else []),
            *(callbacks or []),
        ],
        default_root_dir=str(run_dir),
    )
    model = HFCausalLM(config.model.path, config.optim) if config.model.path else CausalLM(config.model, config.optim)
    datamodule = TextDataModule(config.data, vocab_size=config.model.vocab_size, seed=config.seed)
    return trainer, model, datamodule


def shutdown_distributed() -> None:
    """Destroy the process groups once every rank is done with them.

    Without it, gloo's worker threads can still hold pending work (e.g. a pipeline
    schedule's last receives) when the interpreter exits, which aborts the process; the
    barrier keeps one rank from tearing down while a peer's last collective is in flight.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


register_configs()


def _flush_loggers(trainer: L.Trainer) -> None:
    """Write what the loggers still hold in memory (CSVLogger saves every 100 steps): ``os._exit`` skips it."""
    for logger in trainer.loggers:
        try:
            logger.finalize("failed")
        except Exception as error:  # a broken logger must not keep the rank from exiting
            print(f"warning (rank {trainer.global_rank}): {type(logger).__name__} not flushed: {summary(error)}", file=sys.stderr)


def exit_after_failure(trainer: L.Trainer, error: BaseException) -> NoReturn:
    """End a rank whose training failed: the loggers flushed, one line saying why (last on screen), exit code 1.

    The project's own errors (:class:`ConfigError`, :class:`NonFiniteError`) are raised by every
    rank alike and printed by rank 0 only, without a traceback; after a failed collective each
    rank prints which peer broke the job. Any other error, a ``ValueError`` from torch or the
    user's code included, keeps its traceback. ``os._exit``: a process group with a lost peer can
    block the interpreter's normal shutdown.
    """
    report = getattr(trainer.strategy, "failure_report", None)
    own = isinstance(error, (ConfigError, NonFiniteError))
    _flush_loggers(trainer)
    if not own and report is None:
        traceback.print_exception(error)
    alike = own and report is None
    if trainer.global_rank == 0 or not alike:
        line = f"error (rank {trainer.global_rank}): {error if alike else summary(error)}"
        print(line + (f"\n  {report}" if report else ""), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def exit_after_config_error(error: BaseException) -> NoReturn:
    """End a run whose config could not be built: exit code 2, the message last on screen.

    The project's own checks and OmegaConf's say everything in one line; any other error keeps
    its traceback above that line.
    """
    if not isinstance(error, (ConfigError, OmegaConfBaseException)):
        traceback.print_exception(error)
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        config = to_config(cfg)
        trainer, model, datamodule = build(config)
    except (ValueError, OmegaConfBaseException) as error:
        exit_after_config_error(error)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(config))
    except Exception as error:
        exit_after_failure(trainer, error)
    shutdown_distributed()


def main() -> Any:
    """``python -m lightning_3d.train [overrides]``: unknown keys (on the command line or in the
    recipe) fail before Hydra composes anything."""
    problems = override_key_problems(sys.argv[1:]) + recipe_key_problems(sys.argv[1:])
    if problems:
        print("error: " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(2)
    return _hydra_main()


def cli(argv: Optional[list[str]] = None) -> Any:
    """Console script ``lightning-3d-train``."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    return main()


if __name__ == "__main__":
    main()
