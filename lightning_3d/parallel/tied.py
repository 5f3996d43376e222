"""Keep shared (tied) parameters shared when a transform replaces them.

``parallelize_module`` and ``Module.to_empty`` both create new parameter objects module by
module, which silently unties a weight shared by two modules (e.g. embedding and output).
"""

from __future__ import annotations

from torch import nn


def tied_parameter_names(root: nn.Module) -> list[list[str]]:
    """Groups of names that refer to one shared parameter."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    return [names for names in names_by_param.values() if len(names) > 1]


def retie(root: nn.Module, tied: list[list[str]]) -> None:
    """Point every alias of a group back at the group's first parameter."""
    for first, *aliases in tied:
        shared = root.get_parameter(first)
        for alias in aliases:
            owner_name, _, param_name = alias.rpartition(".")
            owner = root.get_submodule(owner_name)
            if getattr(owner, param_name) is not shared:
                setattr(owner, param_name, shared)


# set on a pipeline stage's own copy of a weight tied to one on another stage: counted once in norms
TIED_COPY = "_lightning_3d_tied_copy"


def tied_aliases(root: nn.Module, prefix: str) -> dict[str, str]:
    """Each alias of a tied group → the group's first name, both under ``prefix``."""
    join = (lambda name: f"{prefix}.{name}") if prefix else (lambda name: name)
    return {join(alias): join(first) for first, *aliases in tied_parameter_names(root) for alias in aliases}
