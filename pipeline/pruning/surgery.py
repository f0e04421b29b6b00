"""The channel removal itself: torch-pruning's dependency graph and its surgery.

torch-pruning cannot trace through the option-A shortcut (subsample, then place the
input channels among zero channels), so it is registered as a layer of its own with a
pruner that keeps its channel maps consistent: pruning its output channels drops the
matching entries of the map (and renumbers the rest); pruning its input channels drops
those inputs. The residual stream before and after a stage boundary can then be pruned
independently, which is what `policy: all` needs on an option-A ResNet.

Per-channel parameters that belong to no layer (ConvNeXt's `layer_scale`, shape (C, 1, 1))
are given to the graph as unwrapped parameters pruned along dim 0, so they shrink with the
residual stream they scale.

Swin's patch merging (the 2x2 neighbours' channels concatenated, LayerNorm over the 4C,
Linear 4C -> 2C) is likewise one layer with a pruner of its own: torch-pruning's trace of
its strided slices and concatenation maps a removed input channel to one of its four
copies only; here input channel i removes positions i, C+i, 2C+i and 3C+i of the norm and
of the reduction's columns, so `policy: all` can prune Swin's stage widths. Both kinds of
layer are traced as one autograd node each (`_opaque_layers`), so their inner crops and
strided slices do not reach torch-pruning's index mapping.

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
from torchvision.models.convnext import CNBlock
from torchvision.models.swin_transformer import PatchMerging

from ..attention import ATTENTION_TYPES, SelfAttention
from ..errors import first_line
from ..models import PadShortcut, sync_model_widths
from ..modes import eval_mode
from .groups import Group, conv_groups, out_convs
from .selection import Selection
from .spec import PruningError

# --------------------------------------------------------------------------- graph


def _pairs(layer: PadShortcut) -> list[tuple[int, int]]:
    """(input channel, output channel) of every channel the shortcut carries."""
    return list(zip(layer.in_index.tolist(), layer.out_index.tolist(), strict=True))


class PadShortcutPruner(tp.pruner.function.BasePruningFunc):
    TARGET_MODULES = (PadShortcut,)

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(int(i) for i in idxs)
        keep = [c for c in range(layer.out_channels) if c not in removed]
        new_pos = {old: new for new, old in enumerate(keep)}
        pairs = [(int(i), new_pos[int(o)]) for i, o in _pairs(layer) if int(o) in new_pos]
        layer.set_maps(pairs, layer.in_channels, len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        removed = set(int(i) for i in idxs)
        keep = [c for c in range(layer.in_channels) if c not in removed]
        new_id = {old: new for new, old in enumerate(keep)}
        pairs = [(new_id[int(i)], int(o)) for i, o in _pairs(layer) if int(i) in new_id]
        layer.set_maps(pairs, len(keep), layer.out_channels)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


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


class _LinearOutPruner(tp.pruner.function.BasePruningFunc):
    """A layer torch-pruning sees whole whose outputs are the rows of one inner Linear
    (`_out`)."""

    @staticmethod
    def _out(layer: nn.Module) -> nn.Linear:  # every subclass names its Linear
        raise TypeError(f"no output Linear for {type(layer).__name__}")

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        lin = self._out(layer)
        keep = sorted(set(range(lin.out_features)) - set(int(i) for i in idxs))
        lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 0)
        if lin.bias is not None:
            lin.bias = self._prune_parameter_and_grad(lin.bias, keep, 0)
        lin.out_features = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return self._out(layer).out_features


class AttentionPruner(_LinearOutPruner):
    """The embedding width through an attention module (`attention.SelfAttention`,
    `attention.WindowAttention`): its inputs are the q/k/v projection's columns, its
    outputs the out-projection's rows; the heads and their width stay (heads are removed
    by `heads.prune_heads`). torch-pruning treats the module as one layer."""

    TARGET_MODULES = ATTENTION_TYPES

    @staticmethod
    def _out(layer: nn.Module) -> nn.Linear:
        return layer.out_proj if isinstance(layer, SelfAttention) else layer.proj


    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(self.get_in_channels(layer))) - set(int(i) for i in idxs))
        if isinstance(layer, SelfAttention):
            layer.in_proj_weight = self._prune_parameter_and_grad(layer.in_proj_weight, keep, 1)
        else:
            layer.qkv.weight = self._prune_parameter_and_grad(layer.qkv.weight, keep, 1)
            layer.qkv.in_features = len(keep)
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        w = layer.in_proj_weight if isinstance(layer, SelfAttention) else layer.qkv.weight
        return int(w.shape[1])


def root_handler(dg: tp.DependencyGraph, m: nn.Module):
    """The graph's handler that removes m's output channels."""
    return dg.get_pruner_of_module(m).prune_out_channels


class PatchMergingPruner(_LinearOutPruner):
    """torchvision's Swin `PatchMerging` as one layer: C inputs, each present four times
    in the concatenated 4C (its norm's and reduction's positions i + kC); the outputs are
    the reduction's rows."""

    TARGET_MODULES = (PatchMerging,)

    @staticmethod
    def _out(layer: nn.Module) -> nn.Linear:
        return layer.reduction

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        c = self.get_in_channels(layer)
        gone = set(int(i) for i in idxs)
        kept = [i for i in range(c) if i not in gone]
        keep = [k * c + i for k in range(4) for i in kept]
        norm, lin = layer.norm, layer.reduction
        if getattr(norm, "weight", None) is not None:
            norm.weight = self._prune_parameter_and_grad(norm.weight, keep, 0)
        if getattr(norm, "bias", None) is not None:
            norm.bias = self._prune_parameter_and_grad(norm.bias, keep, 0)
        if isinstance(norm, nn.LayerNorm):
            norm.normalized_shape = (len(keep),)
        lin.weight = self._prune_parameter_and_grad(lin.weight, keep, 1)
        lin.in_features = len(keep)
        layer.dim = len(kept)
        return layer

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // 4


def customized_pruners() -> dict:
    """The custom pruners to pass to torch-pruning's DependencyGraph."""
    attention = AttentionPruner()
    return {PadShortcut: PadShortcutPruner(), PatchMerging: PatchMergingPruner(),
            **{t: attention for t in ATTENTION_TYPES}}


def unwrapped_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """(parameter, channel dim) of the per-channel parameters outside any layer:
    ConvNeXt's layer_scale (C, 1, 1), which multiplies each block's output channels."""
    return [(m.layer_scale, 0) for m in model.modules() if isinstance(m, CNBlock)]


class _Opaque(torch.autograd.Function):
    """A layer's whole forward as one autograd node, for the trace only: torch-pruning then
    sees one op between the layer's input and its output and passes channel indices
    straight to the layer's own pruner, instead of reading the layer's inner padding crops
    (Swin's windows) or strided 2x2 slices (Swin's patch merging) as channel slices."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module, kwargs: dict):
        out = type(layer).forward(layer, x, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # SelfAttention: (output, None)

    @staticmethod
    def backward(ctx, *grads):  # the trace never runs backward
        raise RuntimeError("a layer traced as one node has no backward")


@contextmanager
def _opaque_layers(model: nn.Module):
    """Trace the layers torch-pruning handles through a pruner of ours (attention, patch
    merging) as one node each."""
    layers = [m for m in model.modules() if isinstance(m, (PatchMerging, *ATTENTION_TYPES))]

    def forward(self, x, *same, **kwargs):  # ViT passes (x, x, x, need_weights=False)
        out = _Opaque.apply(x, self, kwargs)
        return (out, None) if isinstance(self, SelfAttention) else out

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


__all__ = ["AttentionPruner", "GroupedConvPruner", "PadShortcutPruner", "PatchMergingPruner",
           "PruneReport",
           "apply_selection", "build_graph", "customized_pruners", "forward_check",
           "output_shape", "pruning_report", "remove_filters", "root_handler",
           "unwrapped_parameters"]
