"""Parameters and MACs per image, counted the papers' way (and torch-pruning's)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch_pruning as tp

from ..attention import ATTENTION_TYPES
from ..modes import eval_mode


def count_params(model: nn.Module) -> int:
    """All parameters (BN affine included, buffers excluded), as the papers count them."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates for one image, the papers' way: convolutions and linear layers
    only (no BN, activation, pooling or bias additions); in attention modules also the
    packed q/k/v projection (linear) and the two attention products q k^T and attn v
    (attention), as ViT's and Swin's published counts include them.

    Returns {"conv": ..., "linear": ..., "attention": ..., "total": their sum}.
    """
    counts = {"conv": 0, "linear": 0, "attention": 0}

    def conv_hook(m: nn.modules.conv._ConvNd, inp, out):
        per_output = math.prod(m.kernel_size) * (m.in_channels // m.groups)
        counts["conv"] += out[0].numel() * per_output

    def linear_hook(m: nn.Linear, inp, out):
        positions = out[0].numel() // m.out_features  # tokens, for sequence inputs
        counts["linear"] += m.in_features * m.out_features * positions

    def attention_hook(m: nn.Module, inp, out):
        for key, n in m.macs(inp[0].shape).items():
            counts[key] += n

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, ATTENTION_TYPES):
            hooks.append(m.register_forward_hook(attention_hook))
    try:
        p = next(model.parameters())
        with eval_mode(model):
            model(torch.zeros((1, *input_size), device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
    counts["total"] = counts["conv"] + counts["linear"] + counts["attention"]
    return counts


def count_tp_macs(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """torch-pruning's MAC count (adds BN, ReLU and pooling to conv and linear)."""
    p = next(model.parameters())
    with eval_mode(model):
        macs, _ = tp.utils.count_ops_and_params(
            model, torch.zeros((1, *input_size), device=p.device, dtype=p.dtype))
    return int(macs)


def complexity(model: nn.Module, input_size: tuple[int, ...],
               torch_pruning: bool = True) -> dict[str, int]:
    """Parameters and MACs per image, both ways, under explicit keys:

    params       all parameters
    conv_macs    convolutions only
    macs         conv + linear (the papers' convention: ResNet-56 125.49M, ResNet-50 4.09G)
    tp_macs      torch-pruning's count (also BN, ReLU, pooling); with torch_pruning=True
    """
    m = count_macs(model, input_size)
    out = {"params": count_params(model), "conv_macs": m["conv"], "linear_macs": m["linear"],
           "macs": m["total"]}
    if torch_pruning:
        out["tp_macs"] = count_tp_macs(model, input_size)
    return out


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_complexity(c: dict[str, int]) -> str:
    """One labelled line, e.g. 'params 0.85M, MACs 125.49M (conv+linear), 126.55M
    (torch-pruning: +BN/ReLU/pool)'."""
    text = f"params {_human(c['params'])}, MACs {_human(c['macs'])} (conv+linear)"
    if "tp_macs" in c:
        text += f", {_human(c['tp_macs'])} (torch-pruning: +BN/ReLU/pool)"
    return text


__all__ = ["complexity", "count_macs", "count_params", "count_tp_macs", "format_complexity"]
