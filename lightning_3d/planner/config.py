"""The planner's Hydra config: the training config (``conf/config.yaml``'s groups) plus ``cluster``."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from lightning_3d.config import Config
from lightning_3d.planner.cluster import ClusterConfig

CONFIG_NAME = "plan"  # conf/plan.yaml
SCHEMA_NAME = "plan_schema"


@dataclass
class PlanConfig(Config):
    """What ``python -m lightning_3d.plan`` composes: a training config and the cluster to plan for.

    Read from it: the model (``model.*``, or ``model=hf model.path=...``), ``data.seq_len``,
    ``data.global_batch_size``, ``trainer.precision`` and, for defaults of ``cluster.*``,
    ``trainer.devices``, ``trainer.num_nodes`` and ``trainer.accelerator``. The recipe's
    ``parallel.*`` is not: choosing it is the planner's job.
    """

    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def register_plan_config() -> None:
    """Store the schema that ``conf/plan.yaml`` starts from in Hydra's ConfigStore."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=PlanConfig)
