"""The channel removal itself: torch-pruning's dependency graph and its surgery.

What a network family needs for its own layers comes from the family (`pipeline.models`):
custom pruners (the option-A shortcut, attention, Swin's patch merging), layers traced as
one autograd node each (`_opaque_layers`: their inner crops and strided slices must not
reach torch-pruning's index mapping), per-channel parameters outside any layer (ConvNeXt's
`layer_scale`, pruned along dim 0 with the residual stream it scales) and the widths a
model keeps as attributes. Grouped convolutions (ResNeXt) get a conv pruner that keeps
every group's own inputs.

Every removal is followed by a forward pass that must give the output shape of before.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import first_line
from ..models import sync_model_widths
from ..models.registry import custom_pruners, opaque_layers, unwrapped_parameters
from ..modes import eval_mode
from .groups import Group, conv_groups, out_convs
from .selection import Selection
from .spec import PruningError

# --------------------------------------------------------------------------- graph


class GroupedConvPruner(tp.pruner.function.ConvPruner):
    """torch-pruning's conv pruner, with input removal that is right for grouped
    convolutions (ResNeXt): each group keeps its own remaining input positions (the
    selection removes the same number of channels from every group), where torch-pruning
    keeps the first group's positions for all."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        if layer.groups == 1 or layer.transposed:
            return super().prune_in_channels(layer, idxs)
        per = layer.in_channels // layer.groups
        gone = set(int(i) for i in idxs)
        kept = [[c - g * per for c in range(g * per, (g + 1) * per) if c not in gone]
                for g in range(layer.groups)]
        if len({len(k) for k in kept}) != 1:
            raise PruningError(f"a grouped convolution must lose as many inputs from every "
                               f"group (got {[per - len(k) for k in kept]})")
        out_per = layer.out_channels // layer.groups
        index = torch.tensor([kept[o // out_per] for o in range(layer.out_channels)],
                             device=layer.weight.device)
        w = layer.weight.data.gather(1, index.view(layer.out_channels, -1, 1, 1).expand(
            -1, -1, *layer.weight.shape[2:]))
        layer.weight = nn.Parameter(w, requires_grad=layer.weight.requires_grad)
        layer.in_channels = layer.groups * len(kept[0])
        return layer


def root_handler(dg: tp.DependencyGraph, m: nn.Module):
    """The graph's handler that removes m's output channels."""
    return dg.get_pruner_of_module(m).prune_out_channels


def customized_pruners() -> dict:
    """The custom pruners to pass to torch-pruning's DependencyGraph (the families')."""
    return custom_pruners()


class _Opaque(torch.autograd.Function):
    """A layer's whole forward as one autograd node, for the trace only: torch-pruning then
    sees one op between the layer's input and its output and passes channel indices
    straight to the layer's own pruner, instead of reading the layer's inner padding crops
    (Swin's windows) or strided 2x2 slices (Swin's patch merging) as channel slices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, kwargs: dict):
        out = type(layer).forward(layer, x, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # (output, weights): the output

    @staticmethod
    def backward(ctx, *grads):  # the trace never runs backward
        raise RuntimeError("a layer traced as one node has no backward")


@contextmanager
def _opaque_layers(model: nn.Module):
    """Trace the layers the families declare opaque (attention, patch merging) as one node
    each."""
    layers = [m for m in model.modules() if isinstance(m, opaque_layers())]

    def forward(self, x, *same, **kwargs):  # ViT passes (x, x, x, need_weights=False)
        out = _Opaque.apply(x, self, kwargs)
        return (out, None) if getattr(self, "returns_pair", False) else out

    for m in layers:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model` (traced in eval mode). The Linears the
    trace applies per position (input of more than two dimensions) and that the graph
    holds as layers of their own (not inside an attention or patch-merging module) are
    recorded as `dg.token_linears` (see `groups.token_linears`)."""
    seen: set[nn.Module] = set()

    def record(m, inp, out):
        if inp and isinstance(inp[0], torch.Tensor) and inp[0].dim() > 2:
            seen.add(m)

    hooks = [m.register_forward_hook(record) for m in model.modules()
             if isinstance(m, nn.Linear)]
    with eval_mode(model), _opaque_layers(model):
        try:
            dg = tp.DependencyGraph()
            dg.REGISTERED_PRUNERS[tp.ops.OPTYPE.CONV] = GroupedConvPruner()
            dg.build_dependency(model, example_inputs=example,
                                unwrapped_parameters=unwrapped_parameters(model),
                                customized_pruners=customized_pruners(), verbose=False)
        except Exception as err:
            raise PruningError(f"torch-pruning cannot trace this model "
                               f"({first_line(err)[:160]})") from None
        finally:
            for h in hooks:
                h.remove()
    dg.token_linears = frozenset(m for m in seen if m in dg.module2node)
    return dg


# --------------------------------------------------------------------------- removal


@dataclass
class PruneReport:
    """What was pruned: one entry per pruned group (dense numbering), plus the steps and
    one entry per attention module that lost heads."""

    layers: list[dict] = field(default_factory=list)
    steps: int = 1
    heads: list[dict] = field(default_factory=list)  # `heads.apply_heads` entries


def apply_selection(dg: tp.DependencyGraph, groups: list[Group], selection: Selection) -> None:
    """Remove the selected channels of each group (current numbering) from the model."""
    for gi, idxs in selection.items():
        g = groups[gi]
        pg = dg.get_pruning_group(g.root, root_handler(dg, g.root), idxs)
        if not dg.check_pruning_group(pg):
            raise PruningError(f"{g.name}: torch-pruning refuses to remove {len(idxs)} of "
                               f"{g.channels} channels (a layer would be left empty)")
        try:
            pg.prune()
        except Exception as err:
            raise PruningError(f"{g.name}: channel removal failed "
                               f"({first_line(err)[:160]})") from None
        gone = set(idxs)
        g.dense_ids = [d for i, d in enumerate(g.dense_ids) if i not in gone]
    sync_model_widths(dg.model)


def pruning_report(groups: list[Group], steps: int) -> PruneReport:
    """The pruned groups' widths before and after, and the removed dense indices."""
    layers = []
    for g in groups:
        width = g.width
        if g.channels == width:
            continue
        kept = set(g.dense_ids)
        layers.append({"name": g.name, "number": g.number, "convs": g.convs,
                       "coupled": g.coupled, "before": width, "after": g.channels,
                       "share": round(1 - g.channels / width, 6),
                       "removed": [i for i in range(width) if i not in kept]})
    return PruneReport(layers=layers, steps=steps)


def output_shape(model: nn.Module, example: torch.Tensor) -> torch.Size:
    """The model's output shape on `example` (eval mode, no gradients)."""
    with eval_mode(model), torch.no_grad():
        return model(example).shape


def forward_check(model: nn.Module, example: torch.Tensor, shape: torch.Size,
                  policy: str) -> None:
    """The pruned model must run and give the output shape of before."""
    try:
        out = output_shape(model, example)
    except Exception as err:
        raise PruningError(f"the pruned model fails its forward pass ({first_line(err)[:160]})"
                           f"; policy {policy!r} is not supported on this architecture") from None
    if out != shape:
        raise PruningError(f"the pruned model's output shape {tuple(out)} differs from "
                           f"{tuple(shape)}; policy {policy!r} is not supported here")


def remove_filters(model: nn.Module, record: list[dict], example: torch.Tensor) -> PruneReport:
    """Remove exactly the recorded filters (dense numbering), e.g. those soft pruning zeroed."""
    shape = output_shape(model, example)
    dg = build_graph(model, example)
    mods = dict(model.named_modules())
    names = {m: n for n, m in mods.items()}
    by_root = {}
    for group in conv_groups(model, dg):
        for m in out_convs(group, dg):
            by_root[names[m]] = group[0].dep.target.module
    groups, selection = [], {}
    for entry in record:
        root = by_root.get(entry["name"])
        if root is None:
            raise PruningError(f"soft-pruning record names {entry['name']!r}, which is no "
                               "prunable convolution of this model")
        if int(root.weight.shape[0]) != int(entry["before"]):
            raise PruningError(f"{entry['name']}: the record expects {entry['before']} "
                               f"channels, the model has {int(root.weight.shape[0])}")
        selection[len(groups)] = list(entry["removed"])
        groups.append(Group(root=root, name=names[root], convs=list(entry["convs"]),
                            modules=[mods[c] for c in entry["convs"]],
                            coupled=bool(entry["coupled"]), number=entry.get("number"),
                            graph=dg))
    apply_selection(dg, groups, selection)
    forward_check(model, example, shape, "all")
    return pruning_report(groups, 1)


__all__ = ["GroupedConvPruner", "PruneReport",
           "apply_selection", "build_graph", "customized_pruners", "forward_check",
           "output_shape", "pruning_report", "remove_filters", "root_handler",
           "unwrapped_parameters"]
