"""The layers whose time a pruning changes: every convolution or per-position Linear whose
input or output width belongs to a prunable channel group, with the shape it runs at
(the deployment's input size) and the groups that set its widths."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..groups import Group, is_depthwise
from ..surgery import output_shape


@dataclass(frozen=True)
class Site:
    """One layer: its kind and shape (`signature`), dense widths, and the indices of the
    groups that set its input and output widths (None: that width stays)."""

    name: str
    signature: str  # kind, kernel, stride, padding, dilation, grouping, input positions
    cin: int
    cout: int
    in_group: int | None
    out_group: int | None
    depthwise: bool = False
    conv_groups: int = 1

    def widths(self, widths: list[int]) -> tuple[int, int]:
        """(cin, cout) of this layer when the groups have `widths`."""
        if self.depthwise:
            w = widths[self.out_group] if self.out_group is not None else self.cout
            return w, w
        cin = widths[self.in_group] if self.in_group is not None else self.cin
        cout = widths[self.out_group] if self.out_group is not None else self.cout
        return cin, cout


def _signature(m: nn.Module, in_shape: tuple[int, ...]) -> str:
    if isinstance(m, nn.Conv2d):
        grouping = "dw" if is_depthwise(m) else f"g{m.groups}"
        return (f"conv{m.kernel_size[0]}x{m.kernel_size[1]}s{m.stride[0]}x{m.stride[1]}"
                f"p{m.padding[0]}x{m.padding[1]}d{m.dilation[0]}x{m.dilation[1]}{grouping}"
                f"@{in_shape[-2]}x{in_shape[-1]}")
    positions = "x".join(str(s) for s in in_shape[1:-1])
    return f"linear@{positions}"


def input_shapes(model: nn.Module, size: tuple[int, ...]) -> dict[nn.Module, tuple[int, ...]]:
    """The input shape (batch 1) of every conv and Linear at images of `size`, traced on a
    meta-device copy (shapes only, no arithmetic)."""
    memo: dict = {id(t): t.to("meta") for t in [*model.parameters(), *model.buffers()]}
    traced = copy.deepcopy(model, memo)
    original = dict(zip(traced.modules(), model.modules(), strict=True))
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        shapes.setdefault(original[mod], tuple(inp[0].shape))

    hooks = [m.register_forward_hook(record) for m in traced.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        output_shape(traced, torch.zeros((1, *size), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def find_sites(model: nn.Module, groups: list[Group], size: tuple[int, ...]) -> list[Site]:
    """The layers whose widths the groups set, in module order."""
    outs: dict[nn.Module, int] = {}
    ins: dict[nn.Module, int] = {}
    for gi, g in enumerate(groups):
        dg = g.graph
        for item in g.pruning_group():
            m, fn = item.dep.target.module, item.dep.handler
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if dg.is_out_channel_pruning_fn(fn):
                outs.setdefault(m, gi)
            elif dg.is_in_channel_pruning_fn(fn):
                ins.setdefault(m, gi)
    shapes = input_shapes(model, size)
    sites = []
    for name, m in model.named_modules():
        if m not in outs and m not in ins or m not in shapes:
            continue
        dw = is_depthwise(m)
        cin = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        cout = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        out_group = outs.get(m, ins.get(m) if dw else None)
        sites.append(Site(name=name, signature=_signature(m, shapes[m]), cin=cin, cout=cout,
                          in_group=ins.get(m) if not dw else out_group, out_group=out_group,
                          depthwise=dw,
                          conv_groups=m.groups if isinstance(m, nn.Conv2d) and not dw else 1))
    return sites


def layer_module(site: Site, cin: int, cout: int) -> nn.Module:
    """A stand-alone layer of the site's kind at widths (cin, cout): a convolution with a bias
    (a BatchNorm folded into it at deployment) or a Linear."""
    kind, _, _ = site.signature.partition("@")
    if not kind.startswith("conv"):
        return nn.Linear(cin, cout)
    k, s, p, d = _conv_numbers(kind)
    groups = cin if site.depthwise else site.conv_groups
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=groups, bias=True)


def _conv_numbers(kind: str) -> tuple[tuple[int, int], ...]:
    body = kind[len("conv"):]
    k, rest = body.split("s", 1)
    s, rest = rest.split("p", 1)
    p, rest = rest.split("d", 1)
    d = rest.split("g", 1)[0].removesuffix("dw") if "g" in rest else rest.removesuffix("dw")

    def pair(t: str) -> tuple[int, int]:
        a, b = t.split("x")
        return int(a), int(b)
    return pair(k), pair(s), pair(p), pair(d)


def layer_input(site: Site, cin: int, batch: int) -> torch.Tensor:
    """A random input batch of the site's shape with `cin` channels."""
    _, _, where = site.signature.partition("@")
    dims = [int(v) for v in where.split("x")] if where else []
    if site.signature.startswith("conv"):
        return torch.randn(batch, cin, *dims)
    return torch.randn(batch, *dims, cin)


__all__ = ["Site", "find_sites", "input_shapes", "layer_input", "layer_module"]
