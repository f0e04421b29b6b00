"""The registry of network families: architecture name -> family, and the questions the
rest of the pipeline asks of all families at once (module by module).

Each family module registers its `Family` with `@register`; `pipeline/models/__init__.py`
imports every module of the package, so a new family is one new file. CIFAR names take
precedence over torchvision's (`torchvision.NAME` reaches a shadowed one); a torchvision
name belongs to the family that claims it, else to the catch-all torchvision family.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
import torchvision

from ..errors import did_you_mean
from .family import Family

FAMILIES: dict[str, Family] = {}
TORCHVISION_PREFIX = "torchvision."  # `torchvision.vgg16` reaches torchvision's ImageNet VGG


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add the family; its names must be new."""
    family = cls()
    if family.name in FAMILIES:
        raise ValueError(f"network family {family.name!r} registered twice")
    taken = set(cifar_names())
    if clash := sorted(taken.intersection(family.names())):
        raise ValueError(f"network family {family.name!r}: names already taken: {clash}")
    FAMILIES[family.name] = family
    return cls


# --------------------------------------------------------------------------- names


def torchvision_names() -> list[str]:
    """torchvision's classification models (by the name `get_model` takes)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def cifar_names() -> list[str]:
    """The names of the networks defined here (the CIFAR ones), family by family."""
    return [n for f in FAMILIES.values() if not f.from_torchvision for n in f.names()]


def known_archs() -> list[str]:
    return cifar_names() + torchvision_names()


def _torchvision_name(name: str) -> str | None:
    """The torchvision model a name refers to, or None (CIFAR names take precedence)."""
    if name.startswith(TORCHVISION_PREFIX):
        name = name[len(TORCHVISION_PREFIX):]
        return name if name in torchvision_names() else None
    if name in cifar_names():
        return None
    return name if name in torchvision_names() else None


def resolve(name: str) -> tuple[Family, str] | None:
    """(family, the name the family builds) of an architecture name, or None."""
    for family in FAMILIES.values():
        if not family.from_torchvision and name in family.names():
            return family, name
    tv_name = _torchvision_name(name)
    if tv_name is None:
        return None
    tv = [f for f in FAMILIES.values() if f.from_torchvision]
    claimed = [f for f in tv if f.claims(tv_name)]
    if len(claimed) > 1:
        raise ValueError(f"{tv_name!r} is claimed by several families: "
                         f"{[f.name for f in claimed]}")
    return (claimed or [f for f in tv if f.catch_all])[0], tv_name


def family_of(name: str) -> Family | None:
    """The family of an architecture name (None: unknown)."""
    found = resolve(name)
    return None if found is None else found[0]


def check_arch(name: str) -> str | None:
    """None when `name` is a known architecture, else a message listing the known ones."""
    if resolve(name) is not None:
        return None
    hint = did_you_mean(name.removeprefix(TORCHVISION_PREFIX), known_archs())
    return (f"unknown architecture {name!r}{hint}; known: CIFAR {', '.join(cifar_names())}; "
            f"torchvision {', '.join(torchvision_names())}")


def arch_label(name: str) -> str:
    """The architecture as papers write it (resnet56 -> ResNet-56, vgg16 -> VGG-16)."""
    found = resolve(name)
    return name if found is None else found[0].label(name)


# --------------------------------------------------------------------------- all families


def fix_family_widths(m: nn.Module) -> bool:
    """A family's width fix-up of m (`Family.fix_widths`); False when no family owns m."""
    return any(f.fix_widths(m) for f in FAMILIES.values())


def sync_model_widths(model: nn.Module) -> None:
    """After torch-pruning's surgery (which updates the layers it knows): the widths that
    whole models keep as attributes, e.g. the embedding width ViT's input reshape uses."""
    for m in model.modules():
        for f in FAMILIES.values():
            f.sync_widths(m)


def projection_parts() -> frozenset[str]:
    """Module-name parts that mark a shortcut projection, over all families."""
    return frozenset(p for f in FAMILIES.values() for p in f.projections)


def residual_layers() -> tuple[type[nn.Module], ...]:
    """Layers that carry a residual stream, over all families."""
    return tuple(t for f in FAMILIES.values() for t in f.residual_layers)


def opaque_layers() -> tuple[type[nn.Module], ...]:
    """Layers torch-pruning traces as one node, over all families."""
    return tuple(t for f in FAMILIES.values() for t in f.opaque_layers)


def custom_pruners() -> dict[type[nn.Module], Any]:
    """The families' torch-pruning pruners (layer type -> pruner)."""
    return {t: p for f in FAMILIES.values() for t, p in f.pruners().items()}


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(parameter, channel dim) of the per-channel parameters outside any layer."""
    return [u for m in model.modules() for f in FAMILIES.values()
            for u in f.unwrapped_parameters(m)]


__all__ = ["FAMILIES", "TORCHVISION_PREFIX", "arch_label", "check_arch", "cifar_names",
           "custom_pruners", "family_of", "fix_family_widths", "known_archs", "opaque_layers",
           "projection_parts", "register", "residual_layers", "resolve",
           "sync_model_widths", "torchvision_names", "unwrapped_parameters"]
