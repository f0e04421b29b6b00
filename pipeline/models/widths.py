"""A pruned architecture rebuilt from data: every layer narrowed to the shapes of a state
dict (`shrink_to`), and the width attributes made to agree (`fix_attributes`)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import fix_family_widths


def shrink_to(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Narrow every layer of `model` to the parameter shapes in `state_dict` (in place).

    This is how a pruned architecture is rebuilt from data: the state dict's tensor
    shapes are the per-layer widths. Every parameter and buffer takes its stored shape
    (free parameters too, e.g. ConvNeXt's layer_scale), and the Conv, BatchNorm, Linear,
    LayerNorm (normalized_shape; LayerNorm2d alike) attributes are updated to match, as
    are those of each family's own layers (`Family.fix_widths`: option-A shortcut,
    attention `num_heads` = q/k/v rows / head_dim, ...).
    """
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, tensor in list(module.named_parameters(recurse=False)):
            stored = state_dict.get(prefix + pname)
            if stored is not None and stored.shape != tensor.shape:
                new = nn.Parameter(torch.empty(stored.shape, dtype=tensor.dtype,
                                               device=tensor.device),
                                   requires_grad=tensor.requires_grad)
                setattr(module, pname, new)
        for bname, buf in list(module.named_buffers(recurse=False)):
            stored = state_dict.get(prefix + bname)
            if buf is not None and stored is not None and stored.shape != buf.shape:
                module._buffers[bname] = torch.empty(stored.shape, dtype=buf.dtype,
                                                     device=buf.device)
    fix_attributes(model)
    return model


def fix_attributes(model: nn.Module) -> None:
    """Make every module's size attributes agree with its parameters' shapes (after
    they were replaced by narrower ones, before the state dict is loaded)."""
    for module in model.modules():
        if not _fix_layer(module):
            fix_family_widths(module)


def _fix_layer(m: nn.Module) -> bool:
    """The layers every family uses; False when m is none of them."""
    if isinstance(m, nn.Conv2d):
        out_c, in_per_group = m.weight.shape[:2]
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise
            m.groups = out_c
        m.out_channels, m.in_channels = out_c, in_per_group * m.groups
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        ref = m.weight if m.weight is not None else m.running_mean
        m.num_features = ref.shape[0]
    elif isinstance(m, nn.Linear):
        m.out_features, m.in_features = m.weight.shape
    elif isinstance(m, nn.LayerNorm) and m.weight is not None:  # also torchvision's LayerNorm2d
        m.normalized_shape = (*m.normalized_shape[:-1], int(m.weight.shape[-1]))
    else:
        return False
    return True


__all__ = ["fix_attributes", "shrink_to"]
