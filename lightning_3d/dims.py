"""ParallelDims: validate the layout, then build the one DeviceMesh everything uses.

Mesh dims, outermost first: ``(pp, dp_replicate, dp_shard, cp, tp)`` — tp innermost so
tensor-parallel groups are the ranks with the fastest links. Flattened views:

- ``dp``   = dp_replicate × dp_shard: which slice of the global batch a rank loads;
- ``fsdp`` = dp_shard × cp: parameters are sharded (and grads reduced) over CP ranks too;
- ``loss`` = dp_replicate × dp_shard × cp: the token-weighted loss is reduced over it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_3d.compat import flatten_mesh
from lightning_3d.config import ParallelConfig
from lightning_3d.errors import ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    world_size: int

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> "ParallelDims":
        """Resolve ``dp_shard=-1`` and check the degrees against the world size.

        Raises ``ValueError`` naming every size involved; touches no process group.
        """
        degrees = {name: getattr(config, name) for name in MESH_DIMS}
        problems = [
            f"parallel.{name}={value} must be >= 1" for name, value in degrees.items() if value <= 0 and not (name == "dp_shard" and value == -1)
        ]
        if world_size <= 0:
            problems.append(f"world size {world_size} must be >= 1")
        if problems:
            raise ConfigError("invalid parallel layout: " + "; ".join(problems))
        others = degrees["pp"] * degrees["dp_replicate"] * degrees["cp"] * degrees["tp"]
        if degrees["dp_shard"] == -1:
            if world_size % others:
                raise ConfigError(
                    f"pp={degrees['pp']} × dp_replicate={degrees['dp_replicate']} × cp={degrees['cp']} × "
                    f"tp={degrees['tp']} = {others} does not divide the world size {world_size}, so dp_shard=-1 "
                    f"cannot take the leftover ranks; degrees that divide {world_size}: {divisors(world_size)}"
                )
            degrees["dp_shard"] = world_size // others
        product = others * degrees["dp_shard"]
        if product != world_size:
            shown = " × ".join(f"{name}={degrees[name]}" for name in MESH_DIMS)
            raise ConfigError(
                f"{shown} = {product} ranks, but the world size is {world_size} (devices × nodes); "
                f"make the product equal the world size, or set dp_shard=-1 to use the leftover ranks"
            )
        return cls(world_size=world_size, **degrees)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        return self.dp_shard * self.cp

    @property
    def loss(self) -> int:
        return self.dp * self.cp

    @property
    def data_parallel_enabled(self) -> bool:
        return self.dp_replicate * self.fsdp > 1

    def __str__(self) -> str:
        return " × ".join(f"{name}={getattr(self, name)}" for name in MESH_DIMS)

    def build_mesh(self, device_type: str, lightning_names: bool = True) -> tuple[DeviceMesh, dict[str, DeviceMesh]]:
        """One mesh over all ranks, and a view for every name the parallelisms use.

        Views: the five dims, the flattened ``dp``, ``fsdp``, ``loss``, and, only when
        dp_replicate > 1, ``hsdp`` (dp_replicate, fsdp) — the 2-D mesh FSDP2 shards on. With
        pp = cp = 1 and ``lightning_names`` the root mesh also answers to Lightning's names
        ``data_parallel`` and ``tensor_parallel`` (two more process groups).
        Flattened views are kept here because torch wants them bookkept, not re-sliced.
        """
        mesh = init_device_mesh(device_type, tuple(getattr(self, name) for name in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        views = {name: mesh[name] for name in MESH_DIMS}
        views["dp"] = flatten_mesh(mesh["dp_replicate", "dp_shard"], "dp")
        views["fsdp"] = flatten_mesh(mesh["dp_shard", "cp"], "fsdp")
        views["loss"] = flatten_mesh(mesh["dp_replicate", "dp_shard", "cp"], "loss")
        if lightning_names and self.pp == self.cp == 1:
            # the names Lightning's ModelParallelStrategy gives its 2-D mesh, for modules that
            # parallelize themselves in configure_model() (self.device_mesh["tensor_parallel"])
            flatten_mesh(mesh["dp_replicate", "dp_shard"], "data_parallel")
            flatten_mesh(mesh["tp"], "tensor_parallel")
        if self.dp_replicate > 1:
            # with cp > 1 this re-slices the flattened fsdp dim (torch warns); built only when used
            views["hsdp"] = mesh["dp_replicate", "dp_shard"] if self.cp == 1 else mesh["dp_replicate", "fsdp"]
        return mesh, views
