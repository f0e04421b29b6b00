"""Prunable channel groups: what torch-pruning's dependency graph removes together, which
of them a spec prunes, and the layer numbering the spec's references use.

When several convolutions produce a group's channels (residual-coupled layers: the convs
feeding one residual stream, a projection shortcut), they are pruned together. Which
groups are pruned:
  policy block_internal   groups that meet no residual addition (the inner convs of
                          residual blocks, the L1 paper's ResNet rule; every conv of a
                          plain network);
  policy all              every group, residual streams included (option-A shortcuts
                          through the custom pruner in `surgery`);
  include / skip          layer names, glob patterns or layer numbers (see `layer_numbers`);
  layer_ratios            ratio per name pattern or layer number (per-stage ratios);
  skip_downsample         groups containing a downsample/shortcut projection are kept.
Groups that meet grouped (not depthwise) convolutions (ResNeXt) are pruned
group-consistently: the same number of channels from every convolution group
(`Group.channel_groups` blocks), so the grouped convs keep their group count.

Roots: every Conv2d, and every Linear applied per position (`token_linears`: its input
has more than two dimensions, tokens or a channels-last feature map, as the MLPs of
ConvNeXt blocks and transformer blocks); such a Linear is a 1x1 convolution, its output
features are channels. Linear layers on flattened features (classifier heads, VGG's fc
layers) are not roots, so CNN pruning is what it was, and the classifier is never pruned.
A group's producers (`Group.convs`, `Group.modules`) are the convs and Linears whose
output channels it removes; a depthwise conv only follows its input.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn
from torch_pruning import ops

from ..errors import did_you_mean
from ..models.registry import projection_parts, residual_layers
from .criteria import PruningError, filter_matrix
from .spec import PruneSpec

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- layers


def is_projection(name: str) -> bool:
    """A shortcut projection, by a part of its name the families declare (`Family.projections`:
    torchvision ResNets' `downsample`, the CIFAR ResNets' option-B `shortcut`)."""
    parts = projection_parts()
    return any(part in parts for part in name.split("."))


def token_linears(dg) -> frozenset[nn.Module]:
    """The Linear layers the dependency graph saw applied per position (input of more than
    two dimensions), recorded by `surgery.build_graph`; empty without a graph."""
    return getattr(dg, "token_linears", frozenset()) if dg is not None else frozenset()


def layer_numbers(model: nn.Module, dg=None) -> dict[str, int]:
    """Layer name -> layer number, as the L1 paper's code counts: 1-based, in module order,
    every Conv2d of the main path (the stem is 1); shortcut projections are not numbered.
    With the dependency graph `dg`, the Linears it applies per position (`token_linears`)
    are numbered too, in the same module order (ConvNeXt: the stem 1, then per block the
    depthwise conv, fc1, fc2, and each downsampling conv in its place); a CNN has none, so
    its numbers do not depend on `dg`. The classifier is never numbered.

    On a CIFAR ResNet-56 this gives the stem 1, layerS.B.conv1 = 2 + 18(S-1) + 2B and
    conv2 one more, so the ResNet-56-B skip list [16, 18, 20, 34, 38, 54] names
    layer1.7.conv1, layer1.8.conv1, layer2.0.conv1, layer2.7.conv1, layer3.0.conv1 and
    layer3.8.conv1.
    """
    out, n = {}, 0
    linears = token_linears(dg)
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) or m in linears) and not is_projection(name):
            n += 1
            out[name] = n
    return out


def _matches(name: str, number: int | None, ref: int | str) -> bool:
    if isinstance(ref, int):
        return number == ref
    if ref.isdigit():
        return number == int(ref)
    return name == ref or fnmatch.fnmatchcase(name, ref)


class LayerRefError(PruningError):
    """A layer reference (`include`, `skip`, `layer_ratios`) that names no convolution:
    `key` is the spec key with its index (`skip[0]`, `layer_ratios.layer9.*`)."""

    def __init__(self, key: str, problem: str, hint: str):
        super().__init__(f"{problem} ({hint})", key)
        self.bare, self.hint = problem, hint


def _check_refs(refs, key: str, names: list[str], numbers: dict[str, int],
                linears: bool = False) -> None:
    what = "layer" if linears else "conv"
    for i, ref in enumerate(refs):
        if any(_matches(n, numbers.get(n), ref) for n in names):
            continue
        where = f"{key}.{ref}" if key == "layer_ratios" else f"{key}[{i}]"
        if isinstance(ref, int) or str(ref).isdigit():
            raise LayerRefError(where, f"no {what} numbered {ref}",
                                f"the model has 1-{len(numbers)}")
        nothing = "convolution or per-position linear layer" if linears else "convolution"
        raise LayerRefError(where, f"{ref!r} matches no {nothing}",
                            f"the model's {what}s: {', '.join(names[:3])}, ..."
                            f"{did_you_mean(str(ref), names, prefix='; ')}")


# --------------------------------------------------------------------------- groups


@dataclass(eq=False)
class Group:
    """A prunable channel group: the convs whose output channels are removed together."""

    root: nn.Module
    name: str  # the root conv's name
    convs: list[str]  # every conv/Linear producing the group's channels (root first)
    modules: list[nn.Module]
    coupled: bool
    number: int | None
    ratio: float = 0.0
    order: int = 0
    width: int = 0  # channels before any pruning
    dense_ids: list[int] = field(default_factory=list)  # original index of each channel
    graph: object = None  # torch-pruning's DependencyGraph the group was found in
    # gradient x weight row sums of the current weights (`criteria.gradient_products`)
    products: dict | None = None
    channel_groups: int = 1  # contiguous blocks that must lose equally (grouped convs)

    def __post_init__(self) -> None:
        self.width = self.width or self.channels
        self.dense_ids = self.dense_ids or list(range(self.width))

    @property
    def channels(self) -> int:
        return int(self.root.weight.shape[0])

    def weights(self) -> list[np.ndarray]:
        return [filter_matrix(m.weight) for m in self.modules]

    def norms(self) -> list[nn.Module | None]:
        """The BatchNorm directly after each producing layer (None where there is none)."""
        return [following_bn(self.graph, m) for m in self.modules]

    def bn_scales(self) -> list[np.ndarray]:
        return [bn.weight.detach().double().cpu().numpy() for bn in self.norms()
                if bn is not None and bn.weight is not None]

    def taylor_terms(self) -> list[np.ndarray]:
        if self.products is None:
            raise PruningError(f"taylor: no gradients were taken for {self.name} (the "
                               "criterion needs training batches)")
        out = []
        for m, bn in zip(self.modules, self.norms(), strict=True):
            t = self.products[m]
            if bn is not None and bn in self.products:
                t = t + self.products[bn]
            out.append(t)
        return out

    def pruning_group(self):
        """torch-pruning's group removing every channel (current numbering): each item
        names a layer, its handler and the indices it would delete."""
        handler = self.graph.get_pruner_of_module(self.root).prune_out_channels
        return self.graph.get_pruning_group(self.root, handler, list(range(self.channels)))

    def coupled_slices(self) -> list[tuple[np.ndarray, np.ndarray]]:
        dg, out, seen = self.graph, [], set()
        for item in self.pruning_group():
            m, fn = item.dep.target.module, item.dep.handler
            root = item.root_idxs
            if root is None or any(r is None for r in root) or (id(m), fn) in seen:
                continue
            seen.add((id(m), fn))
            rows = _param_rows(dg, m, fn, list(item.idxs))
            if rows is not None:
                out.append((rows, np.asarray(root, dtype=np.int64)))
        return out


def _param_rows(dg, m: nn.Module, fn, idxs: list[int]) -> np.ndarray | None:
    """The rows of m's parameters that removing `idxs` through handler `fn` deletes."""
    if isinstance(m, (nn.Conv2d, nn.Linear)) and dg.is_out_channel_pruning_fn(fn):
        return filter_matrix(m.weight)[idxs]
    if isinstance(m, (nn.Conv2d, nn.Linear)) and dg.is_in_channel_pruning_fn(fn):
        if is_depthwise(m):  # its weights are counted once, as output rows
            return None
        w = m.weight.detach().double().cpu()
        groups = m.groups if isinstance(m, nn.Conv2d) else 1
        # input channel c of a grouped conv feeds only the outputs of its group
        w = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).permute(0, 2, 1, 3)
        return w.reshape(groups * w.shape[1], -1).numpy()[idxs]
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)) \
            and getattr(m, "weight", None) is not None:
        return m.weight.detach().double().cpu().numpy()[idxs][:, None]
    return None


def following_bn(dg, m: nn.Module) -> nn.Module | None:
    """The BatchNorm that takes m's output directly, if any."""
    node = dg.module2node.get(m) if dg is not None else None
    for nxt in (node.outputs if node is not None else []):
        if isinstance(nxt.module, nn.modules.batchnorm._BatchNorm):
            return nxt.module
    return None


def out_convs(group, dg) -> list[nn.Module]:
    """The convs and Linears whose output channels a torch-pruning group removes (a
    yielded group holds only per-position Linears: `conv_groups` leaves the others out)."""
    out = []
    for item in group:
        m = item.dep.target.module
        if isinstance(m, (nn.Conv2d, nn.Linear)) \
                and dg.is_out_channel_pruning_fn(item.dep.handler):
            if m not in out:
                out.append(m)
    return out


def is_residual_coupled(group) -> bool:
    """True when the group's channels meet a residual addition: they pass through an
    element-wise add or a layer a family declares residual (`Family.residual_layers`: the
    option-A shortcut). (Several convs can share channels without one, e.g. a
    squeeze-excitation gate's multiplication: those stay block-internal.)"""
    residual = residual_layers()
    for item in group:
        m = item.dep.target.module
        if isinstance(m, residual):
            return True
        # AddBackward: a + b (not Addmm, a Linear's own bias addition)
        if isinstance(m, ops._ElementWiseOp) and str(m._grad_fn).startswith("AddBackward"):
            return True
    return False


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The final linear layer: never pruned (the output classes stay)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def conv_groups(model: nn.Module, dg):
    """torch-pruning's channel groups rooted at a convolution or a per-position Linear
    (`token_linears`); a group that would remove output features of the classifier or of
    any other Linear (one on flattened features) is left out."""
    linears = token_linears(dg)
    fixed = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in linears]
    return dg.get_all_groups(ignored_layers=classifier_layers(model) + fixed,
                             root_module_types=[nn.Conv2d, nn.Linear])


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels \
        == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    """A grouped, not depthwise, convolution (ResNeXt): its channel groups must shrink
    evenly."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not is_depthwise(m)


def candidate_groups(model: nn.Module, dg, spec: PruneSpec) -> list[Group]:
    """The groups `spec` prunes, in module order, each with its ratio."""
    names = {m: n for n, m in model.named_modules()}
    order = {m: i for i, (_, m) in enumerate(model.named_modules())}
    numbers = layer_numbers(model, dg)
    linears = token_linears(dg)
    conv_names = [n for n, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) or m in linears]
    for key, refs in (("include", spec.include), ("skip", spec.skip),
                      ("layer_ratios", list(spec.layer_ratios))):
        _check_refs(refs, key, conv_names, numbers, bool(linears))

    def hit(conv_list: list[str], refs) -> bool:
        return any(_matches(c, numbers.get(c), r) for c in conv_list for r in refs)

    out, skipped_by_policy = [], []
    for group in conv_groups(model, dg):
        mods = out_convs(group, dg)
        if not mods:
            continue
        # name the group by a full conv (a depthwise conv only follows its input)
        mods = sorted(mods, key=lambda m: (is_depthwise(m), order[m]))
        convs = [names[m] for m in mods]
        blocks = math.lcm(1, *(item.dep.target.module.groups for item in group
                                if _is_grouped(item.dep.target.module)))
        coupled = is_residual_coupled(group)
        if (spec.include and not hit(convs, spec.include)) or (
                spec.skip and hit(convs, spec.skip)) or (
                spec.skip_downsample and any(is_projection(c) for c in convs)):
            continue
        if spec.policy == "block_internal" and coupled:
            skipped_by_policy.append(convs)
            continue
        ratio = next((float(r) for ref, r in spec.layer_ratios.items() if hit(convs, [ref])),
                     spec.ratio or 0.0)
        out.append(Group(root=mods[0], name=convs[0], convs=convs, modules=mods,
                         coupled=coupled, number=numbers.get(convs[0]), ratio=ratio,
                         order=min(order[m] for m in mods), graph=dg,
                         channel_groups=blocks))
    if spec.include and skipped_by_policy:
        log.warning("include: %d matching group(s) are residual-coupled and not pruned under "
                    "policy block_internal (use policy: all)", len(skipped_by_policy))
    return sorted(out, key=lambda g: g.order)


def required(groups: list[Group], spec: PruneSpec) -> list[Group]:
    """`groups`, or a PruningError when the spec leaves nothing to prune."""
    if not groups:
        key = "include" if spec.include else "skip" if spec.skip else "policy"
        raise PruningError(f"nothing to prune: no channel group passes policy {spec.policy!r}"
                           " and the include/skip lists", key)
    return groups


__all__ = ["Group", "LayerRefError", "candidate_groups", "classifier_layers", "conv_groups",
           "following_bn",
           "is_depthwise", "is_projection", "is_residual_coupled", "layer_numbers", "out_convs",
           "required", "token_linears"]
