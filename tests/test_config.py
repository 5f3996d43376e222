"""Tests of the Hydra configs: every group option and recipe composes, converts and validates.

The parametrizations read ``conf/`` (recipes in its ``recipe`` group) from disk, so a new file is covered
without touching this module. ``run_dir`` is overridden because ``${hydra:run.dir}`` only
resolves inside a real Hydra run, not in ``compose``.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import hydra
import pytest
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_3d import train
from lightning_3d.config import Config, ParallelConfig
from lightning_3d.train import CONF_DIR, RECIPES_DIR, to_config, world_size_of
from lightning_3d.validation import Hardware, check_layout, perf_problems

# the training config's groups; conf/cluster belongs to the planner's config (conf/plan.yaml)
CLUSTER_DIR = CONF_DIR / "cluster"
GROUP_FILES = sorted(path for path in CONF_DIR.glob("*/*.yaml") if path.parent not in (RECIPES_DIR, CLUSTER_DIR))
CLUSTER_FILES = sorted(CLUSTER_DIR.glob("*.yaml"))
RECIPE_FILES = sorted(RECIPES_DIR.glob("*.yaml"))
GROUPS = sorted({path.parent.name for path in GROUP_FILES})


# values a config needs from the command line, given as a user would
MANDATORY = {"model/hf": ["model.path=/models/example"], "recipe/finetune": ["model.path=/models/example"]}


def _mandatory(path: Path) -> list[str]:
    return MANDATORY.get(f"{path.parent.name}/{path.stem}", [])


def compose(*overrides: str) -> DictConfig:
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose(config_name="config", overrides=[*overrides, "run_dir=/tmp/x"])


def load(*overrides: str) -> Config:
    return to_config(compose(*overrides))


def test_the_config_folders_are_found() -> None:
    assert (CONF_DIR / "config.yaml").is_file()
    assert {"model", "data", "parallel", "trainer", "optim"} <= set(GROUPS)
    assert "tiny" in {path.stem for path in RECIPE_FILES}
    assert "debug" in {path.stem for path in RECIPE_FILES}


def test_recipes_are_a_native_group_of_the_config_dir() -> None:
    # Hydra finds them on disk like any group: nothing registers them by hand
    assert RECIPES_DIR == CONF_DIR / "recipe"
    assert ConfigStore.instance().repo.get("recipe") is None
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        options = GlobalHydra.instance().config_loader().get_group_options("recipe")
    assert options == sorted(path.stem for path in RECIPE_FILES)


def test_a_recipe_without_the_global_header_fails_before_hydra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "local.yaml").write_text("data:\n  seq_len: 32\n")
    monkeypatch.setattr(train, "RECIPES_DIR", tmp_path)
    assert train.recipe_key_problems(["recipe=local"]) == [f"recipe {tmp_path / 'local.yaml'} must start with '# @package _global_'"]


# ----------------------------------------------------------------------------- group options


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_group_option_composes_and_converts(path: Path) -> None:
    group = path.parent.name
    # without the default recipe, the option's own values must come through untouched
    config = load(f"{group}={path.stem}", "~recipe", *_mandatory(path))
    assert isinstance(config, Config)
    section = asdict(config)[group]
    expected = OmegaConf.to_container(OmegaConf.load(path))
    assert expected, f"{path} sets nothing"
    given = {override.partition("=")[0] for override in _mandatory(path)}
    for key, value in expected.items():
        if f"{group}.{key}" not in given:
            assert section[key] == value, f"{group}.{key}"


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_group_option_composes_under_the_default_recipe(path: Path) -> None:
    config = load(f"{path.parent.name}={path.stem}", *_mandatory(path))
    assert isinstance(config, Config)
    assert config.run_dir == "/tmp/x"


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.stem)
def test_every_cluster_option_composes_into_the_planner_config(path: Path) -> None:
    from lightning_3d.plan import compose as compose_plan

    cluster = asdict(compose_plan([f"cluster={path.stem}"]).cluster)
    expected = OmegaConf.to_container(OmegaConf.load(path))
    assert expected, f"{path} sets nothing"
    assert {key: cluster[key] for key in expected} == expected


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_recipe_file_is_global(path: Path) -> None:
    assert path.read_text().startswith("# @package _global_")


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_composes_and_validates_on_its_world_size(path: Path) -> None:
    config = load(f"recipe={path.stem}", *_mandatory(path))
    world_size = world_size_of(config)  # devices × nodes: a GPU recipe is checked on its own cluster
    dims = check_layout(
        config.parallel, world_size, config.model, config.data, config.trainer.accumulate_grad_batches
    )
    assert dims.world_size == world_size
    gpus = Hardware(cuda_devices=8, bf16=True, name="NVIDIA H100 80GB HBM3", capability=(9, 0))
    assert perf_problems(config.perf, dims, config.trainer.accelerator, gpus) == []
    # what the recipe sets wins over the group defaults
    recipe = OmegaConf.to_container(OmegaConf.load(path))
    recipe.pop("defaults", None)
    converted = asdict(config)
    for group, values in recipe.items():
        for key, value in values.items():
            assert converted[group][key] == value, f"{path.stem}: {group}.{key}"


def test_a_model_folder_left_unnamed_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"model=hf needs the model folder: model\.path="):
        train.preflight(load("recipe=finetune"))


def test_default_is_the_tiny_recipe() -> None:
    default = load()
    assert default == load("recipe=tiny")
    assert default.parallel.tp == 2
    assert default.parallel.pp == 2
    assert default.parallel.dp_shard == -1
    assert default.trainer.devices == 8
    assert default.model.dim == 128  # model/tiny
    assert check_layout(default.parallel, world_size_of(default), default.model, default.data).dp_shard == 2


def test_debug_recipe_is_made_for_parity_tests() -> None:
    config = load("recipe=debug")
    assert config.trainer.precision == "32-true"
    assert config.trainer.deterministic is True
    assert config.trainer.log_every_n_steps == 1
    assert config.model.n_layers >= 4
    # every tp (and cp) degree up to 4 divides the heads; every tp × cp up to 16 divides seq_len
    assert config.model.n_heads % 4 == 0
    assert config.model.kv_heads % 4 == 0
    assert config.data.seq_len % 16 == 0
    assert config.data.seq_len <= config.model.max_seq_len
    for tp in (1, 2, 4):
        dims = check_layout(ParallelConfig(tp=tp), 2 * tp, config.model, config.data)
        assert dims.dp == 2


def test_command_line_overrides_apply() -> None:
    config = load("recipe=debug", "parallel.tp=2", "trainer.devices=4", "model.n_layers=6")
    assert (config.parallel.tp, config.trainer.devices, config.model.n_layers) == (2, 4, 6)


# ----------------------------------------------------------------------------- errors


def test_unknown_key_override_is_named() -> None:
    with pytest.raises(HydraException, match=r"tpp"):
        compose("parallel.tpp=2")


def test_bad_type_override_raises() -> None:
    with pytest.raises(HydraException, match=r"parallel\.tp=abc") as error:
        compose("parallel.tp=abc")
    # the underlying cause names the value that could not become an int
    assert "abc" in str(error.value.__cause__)


def test_unknown_recipe_lists_the_available_ones() -> None:
    with pytest.raises(HydraException) as error:
        compose("recipe=nope")
    message = str(error.value)
    assert "recipe/nope" in message
    for path in RECIPE_FILES:
        assert path.stem in message


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("model", "n_layerz", 3),
        ("parallel", "tpp", 2),
        ("data", "sequence_length", 64),
        ("trainer", "max_step", 10),
        ("optim", "learning_rate", 0.1),
    ],
)
def test_misspelt_key_in_a_group_file_is_caught_by_to_config(section: str, key: str, value: object) -> None:
    # what Hydra would hand over if a yaml file (merged without the schema) had a typo
    raw = OmegaConf.to_container(compose(), resolve=True)
    raw[section][key] = value
    with pytest.raises(OmegaConfBaseException, match=rf"Key '{key}' not in"):
        to_config(OmegaConf.create(raw))


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("model", "n_layers", "four"),
        ("parallel", "sequence_parallel", "maybe"),
        ("data", "global_batch_size", 1.5),
    ],
)
def test_bad_type_in_a_group_file_is_caught_by_to_config(section: str, key: str, value: object) -> None:
    raw = OmegaConf.to_container(compose(), resolve=True)
    raw[section][key] = value
    with pytest.raises(OmegaConfBaseException, match=rf"{section}\.{key}"):
        to_config(OmegaConf.create(raw))


@pytest.mark.parametrize(
    "devices, num_nodes, expected",
    [(1, 1, 1), (4, 1, 4), (8, 8, 64)],
)
def test_world_size_of(devices: int, num_nodes: int, expected: int) -> None:
    config = Config()
    config.trainer.devices, config.trainer.num_nodes = devices, num_nodes
    assert world_size_of(config) == expected


@pytest.mark.parametrize("devices", ["auto", 0, -1, [0, 1]])
def test_world_size_of_needs_a_positive_count(devices: object) -> None:
    config = Config()
    config.trainer.devices = devices
    with pytest.raises(ValueError, match=re.escape(f"trainer.devices={devices!r} must be a positive number")):
        world_size_of(config)
