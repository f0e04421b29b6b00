"""Initialization that depends on the family: from-scratch re-init at pruned widths (the
scratch stage) and zero-init of the residual BNs (Bag of Tricks)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .registry import FAMILIES, check_arch, family_of

log = logging.getLogger("pipeline")


@torch.no_grad()
def reinitialize(model: nn.Module, arch_name: str, seed: int) -> str:
    """Fresh weights by the architecture's own init scheme (its family's, see each family's
    docstring) at the current (pruned) widths; BN running statistics reset; buffers that
    describe the structure (option-A channel maps) kept. Returns the scheme's name.

    What a family does not init its own way: conv and linear by its `init_conv` /
    `init_linear` (PyTorch's default unless it says otherwise), BN gamma its `bn_weight`
    and beta 0, any other leaf layer its `reset_parameters()` (PyTorch's default). A
    family without a scheme of its own ("default") gets a warning.
    """
    family = family_of(arch_name)
    if family is None:
        raise ValueError(check_arch(arch_name))
    torch.manual_seed(seed)
    for m in model.modules():
        if family.init_module(m):
            continue
        if isinstance(m, nn.Conv2d):
            family.init_conv(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.constant_(m.weight, family.bn_weight(m))
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            family.init_linear(m)
        elif hasattr(m, "reset_parameters") and not list(m.children()):
            m.reset_parameters()
    if family.init_scheme == "default":
        log.warning("scratch: no known init scheme for %r; layers re-initialized with "
                    "PyTorch's defaults", arch_name)
    return family.init_scheme


def init_conv_fan_out(m: nn.Conv2d) -> None:
    """kaiming_normal_ (fan_out, relu), bias 0: the conv init of the VGG, ResNet,
    MobileNet and RegNet constructors."""
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def init_linear_small(m: nn.Linear) -> None:
    """N(0, 0.01) weights and bias 0 (after PyTorch's default): the linear init of the VGG,
    MobileNet and RegNet constructors."""
    m.reset_parameters()
    nn.init.normal_(m.weight, 0, 0.01)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def residual_last_bns(model: nn.Module) -> list[nn.Module]:
    """The last BN of the residual branch of every residual block, in module order (each
    family names its blocks': `Family.residual_bn`)."""
    out = []
    for m in model.modules():
        bn = next((b for f in FAMILIES.values() if (b := f.residual_bn(m)) is not None), None)
        if bn is not None:
            out.append(bn)
    return out


def zero_init_last_bn(model: nn.Module) -> int:
    """Bag of Tricks: gamma = 0 in each block's last BN, so blocks start as identities."""
    bns = residual_last_bns(model)
    for bn in bns:
        nn.init.zeros_(bn.weight)
    return len(bns)


__all__ = ["init_conv_fan_out", "init_linear_small", "reinitialize", "residual_last_bns",
           "zero_init_last_bn"]
