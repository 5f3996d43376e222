"""``python -m lightning_3d.plan [--top K] [--measure] [overrides]``: rank every layout of a job.

The overrides are the training CLI's (``recipe=``, ``model=``, ``data.*``, ``trainer.*``) plus
``cluster.*`` (the machines: ``cluster.gpus=64 cluster.gpus_per_node=8 cluster.gpu=H100``, or
``cluster=h100_8x8``). Prints the layouts ranked by predicted step time, each with its memory
per device by part, its communication per mesh dim, its pipeline bubble, its step time and
MFU, and the overrides that run it with ``python -m lightning_3d.train``. ``--measure`` runs a
few steps of each shown layout on this machine and ranks them by measured time. Bad input
exits with code 2 and one message. The model of the world is in :mod:`lightning_3d.planner`.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
from typing import Any, NoReturn, Optional

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_3d.errors import ConfigError
from lightning_3d.planner.api import PlanRequest, nothing_fits_message, plan, rank_layouts
from lightning_3d.planner.cluster import ClusterConfig, resolve_cluster
from lightning_3d.planner.config import CONFIG_NAME, PlanConfig, register_plan_config
from lightning_3d.planner.memory import Precision
from lightning_3d.planner.report import report
from lightning_3d.planner.shapes import ModelShape

USAGE = __doc__.split("\n\n")[0] + "\n\nOptions: --top K (layouts shown, default 10), --measure, --measure-steps N (default 6), -h"


def _flags(args: list[str]) -> tuple[dict[str, int | bool], list[str]]:
    """(the planner's own flags, the Hydra overrides)."""
    flags: dict[str, int | bool] = {"top": 10, "measure": False, "measure_steps": 6}
    rest, index = [], 0
    while index < len(args):
        arg = args[index]
        name, _, value = arg.partition("=")
        if name in ("--top", "--measure-steps"):
            if not value:
                index += 1
                value = args[index] if index < len(args) else ""
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{name} takes a positive number, got {value!r}")
            flags[name[2:].replace("-", "_")] = int(value)
        elif arg == "--measure":
            flags["measure"] = True
        elif arg.startswith("-"):
            raise ConfigError(f"unknown option {arg!r}; options: --top K, --measure, --measure-steps N (the rest are Hydra overrides)")
        else:
            rest.append(arg)
        index += 1
    return flags, rest


def _key_problems(overrides: list[str]) -> list[str]:
    """Unknown keys, before anything is composed: the training CLI's checks for all but ``cluster``."""
    from lightning_3d.train import override_key_problems, recipe_key_problems

    training = [o for o in overrides if not o.lstrip("+~").startswith("cluster")]
    problems = override_key_problems(training) + recipe_key_problems(training)
    names = [f.name for f in dataclasses.fields(ClusterConfig)]
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("cluster.") and key.removeprefix("cluster.") not in names:
            close = difflib.get_close_matches(key.removeprefix("cluster."), names, n=1)
            hint = f" (did you mean cluster.{close[0]}?)" if close else ""
            problems.append(f"unknown config key {key!r}{hint}; valid keys at cluster: {', '.join(names)}")
    return problems


def compose(overrides: list[str]) -> PlanConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_3d.train import CONF_DIR

    register_plan_config()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg: DictConfig = hydra_compose(config_name=CONFIG_NAME, overrides=overrides)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(PlanConfig), cfg))


def request_of(config: PlanConfig, name: str = "") -> PlanRequest:
    """What to plan, from the composed config."""
    model = config.model
    if model.source == "hf" or model.path:
        if not model.path:
            raise ConfigError("model=hf needs the model folder: model.path=/path/to/folder (only its config.json is read)")
        shape = ModelShape.of_hf_folder(model.path)
    else:
        model.validate()
        shape = ModelShape.of_config(model, name)
    trainer = config.trainer
    devices = trainer.devices if isinstance(trainer.devices, int) and trainer.devices > 0 else 1
    cluster = resolve_cluster(config.cluster, devices, trainer.num_nodes, trainer.accelerator, str(trainer.precision))
    data = config.data
    problems = [f"data.{key}={getattr(data, key)} must be > 0" for key in ("seq_len", "global_batch_size") if getattr(data, key) <= 0]
    if problems:
        raise ConfigError("; ".join(problems))
    return PlanRequest(shape, cluster, data.seq_len, data.global_batch_size, Precision.of(str(trainer.precision)))


def _name(overrides: list[str]) -> str:
    for key in ("model", "recipe"):
        found = [o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")]
        if found:
            return found[-1]
    return "tiny"


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[list[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in args):
        print(USAGE)
        return
    try:
        flags, overrides = _flags(args)
        problems = _key_problems(overrides)
        if problems:
            raise ConfigError("\n  ".join(problems))
        config = compose(overrides)
        request = request_of(config, _name(overrides))
        ranking = rank_layouts(request)
    except (ConfigError, OmegaConfBaseException, HydraException) as error:
        _fail(str(error))
    from lightning_3d.planner.measure import training_overrides

    command = training_overrides(overrides, request.cluster)
    top = int(flags["top"])
    if not ranking.fitting:
        print(report(ranking, ranking.plans[:top], command))
        _fail(nothing_fits_message(ranking))
    shown = ranking.plans[:top]
    if flags["measure"]:
        from lightning_3d.planner.measure import measure

        try:
            shown = measure(ranking, shown, overrides, steps=int(flags["measure_steps"]))
        except ConfigError as error:
            _fail(str(error))
    print(report(ranking, shown, command))


class _CallableModule(types.ModuleType):
    """Importing this module binds ``lightning_3d.plan`` to it, over the package's ``plan``
    function; calling the module keeps ``lightning_3d.plan(...)`` working after such an import."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
