"""Turn a parallelized meta-device model into real weights, identical for every layout.

Each parameter's FULL tensor is drawn from a generator seeded by (seed, parameter name)
and then cut to this rank's shard. The same seed thus gives the same full model on one
process or on any mesh, which is what makes loss-parity tests between layouts possible.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_3d.compat import compute_local_shape_and_global_offset
from lightning_3d.errors import ConfigError
from lightning_3d.parallel.tied import retie, tied_parameter_names

InitFn = Callable[[str, Tensor, torch.Generator], None]

# wrapper prefixes added by activation checkpointing and torch.compile
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Parameter name as in the unwrapped model."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@contextmanager
def meta_parameters() -> Iterator[None]:
    """Create parameters on the meta device and buffers as an eager build would.

    Inside, every parameter a module registers is moved to the meta device (its storage
    was only allocated, never filled: ``reset_parameters`` then runs on meta), while buffers
    (a rotary ``inv_freq``, a causal mask, running statistics) are computed by the model's
    own code on the default device. :func:`materialize` keeps them.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        # a DTensor parameter comes from parallelize_module / fully_shard in a module that
        # parallelizes itself: it keeps the values it was distributed with
        if param is not None and not param.is_meta and not isinstance(param, DTensor):
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def has_meta_parameters(module: nn.Module) -> bool:
    meta = [p.is_meta for p in module.parameters()]
    if any(meta) and not all(meta):
        raise ConfigError(
            f"{sum(meta)} of {len(meta)} parameters are on the meta device: create all of them in "
            "configure_model() (the strategy runs it on the meta device) or none"
        )
    return any(meta)


def _real_buffers(model: nn.Module, prefix: str) -> dict[str, Tensor]:
    """Every buffer of ``model`` by name (shared ones under each name); none may be on meta."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    on_meta = [join_name(prefix, canonical_name(name)) for name, buffer in buffers.items() if buffer.is_meta]
    if on_meta:
        raise ConfigError(
            f"{len(on_meta)} of {len(buffers)} buffers are on the meta device after configure_model(): "
            f"{on_meta[:5]}; the strategy keeps buffers as the model's code builds them (only "
            "parameters are initialized from init_parameter), so create them with real values"
        )
    return buffers


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (sharing its submodules) under its own class: FSDP2 and
    replicate swap in subclasses that cannot be copied, and init rules need only the original."""
    own_class = next(c for c in type(module).__mro__ if not c.__module__.startswith("torch.distributed"))
    twin = own_class.__new__(own_class)
    twin.__dict__.update(module.__dict__)
    return twin


def owner_init(full_model: nn.Module, prefix: str, rule: Callable[[nn.Module], None] | None = None) -> InitFn:
    """An ``init_fn`` that fills a parameter with its owner module's own init rule.

    The owner (found by name in ``full_model``, the unsplit model at ``prefix``) is copied
    with fresh full-size parameters, ``rule(copy)`` runs on it (default: the module's
    ``reset_parameters``) under the global RNG seeded from the parameter's generator, and
    the one parameter asked for is taken. Each parameter thus depends on its name and seed
    only, never on the layout.
    """

    def init(name: str, full: Tensor, generator: torch.Generator) -> None:
        owner_name, _, attr = name.removeprefix(f"{prefix}.").rpartition(".") if prefix else name.rpartition(".")
        owner = full_model.get_submodule(owner_name)
        # torch's own modules: reset_parameters, or _reset_parameters (MultiheadAttention)
        module_reset = getattr(type(owner), "reset_parameters", None) or getattr(type(owner), "_reset_parameters", None)
        if rule is None and module_reset is None:
            raise ConfigError(
                f"parameter {name!r} of {type(owner).__name__} has no init rule: give {type(owner).__name__} a "
                "reset_parameters(), or the LightningModule an init_parameter(name, full_tensor, generator)"
            )
        twin = _twin(owner)
        twin._parameters = {
            key: None if param is None else nn.Parameter(torch.empty(param.shape, dtype=torch.float32, device=full.device))
            for key, param in owner._parameters.items()
        }
        devices = [full.device] if full.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(generator.initial_seed())
            (rule or module_reset)(twin)
        full.copy_(twin._parameters[attr])

    return init


@torch.no_grad()
def materialize(
    model: nn.Module, prefix: str, device: torch.device, init_fn: InitFn, seed: int, aliases: Mapping[str, str] | None = None
) -> None:
    """Allocate every parameter of ``model`` on ``device`` and fill it from ``init_fn``.

    ``model`` is the plan root or one pipeline stage of it; ``prefix`` (the root's name in
    the LightningModule) makes the names ``init_fn`` sees the same for every layout.
    FSDP2 re-links its shards when ``to_empty`` runs on the sharded module. Buffers, built
    by the model's own code in ``configure_model()``, keep their values (moved to ``device``).
    ``aliases`` maps a name to the one it is tied to in the unsplit model (a pipeline stage
    holding its own copy of a tied weight): the copy is drawn as that weight.
    """
    buffers = _real_buffers(model, prefix)
    tied = tied_parameter_names(model)
    model.to_empty(device=device)
    retie(model, tied)
    # to_empty also wiped the buffers: put back the values the model computed
    moved: dict[int, Tensor] = {}  # by identity, so a buffer shared by modules stays shared
    for name, buffer in buffers.items():
        owner, _, attr = name.rpartition(".")
        if id(buffer) not in moved:
            moved[id(buffer)] = buffer.to(device)
        setattr(model.get_submodule(owner), attr, moved[id(buffer)])  # keeps it (non-)persistent
    read_shard = getattr(init_fn, "read_shard", None)  # weights from files: read only this rank's slice
    for name, param in model.named_parameters():
        name = join_name(prefix, canonical_name(name))
        if read_shard is not None and isinstance(param, DTensor):
            local = param.to_local()
            shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
            if tuple(shape) == tuple(local.shape):
                local.copy_(read_shard(name, tuple(slice(o, o + n) for o, n in zip(offset, shape))).to(local.dtype))
                continue
        name = (aliases or {}).get(name, name)
        generator = torch.Generator(device=device).manual_seed(_name_seed(seed, name))
        full = torch.empty(param.shape, dtype=torch.float32, device=device)
        init_fn(name, full, generator)
        full = full.to(param.dtype)
        if isinstance(param, DTensor):
            # every rank holds the same full tensor, so each can cut its shard locally
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
