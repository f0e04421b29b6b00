"""The networks of the papers, their construction from data, and MAC/parameter counts.

Architectures are described by a plain dict (`arch`: {"name", "num_classes", ...}) so a
checkpoint can rebuild them without pickled code. A pruned model is the same
architecture with narrower layers: `build_model(arch)` makes the dense network and
`shrink_to(model, state_dict)` narrows every layer to the shapes stored in the state
dict, after which `load_state_dict(strict=True)` succeeds. `pipeline.load_model(path)`
does both from a checkpoint file.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
import torchvision
import torchvision.models.resnet as tvr
from torchvision.models.swin_transformer import PatchMerging
from torchvision.models.vision_transformer import VisionTransformer

from ..attention import ATTENTION_TYPES, convert, fix_heads
from ..checkpoint import CheckpointError, load_weights_file, misfit, payload_parts
from ..checkpoint import load as load_checkpoint
from ..config import opt
from ..errors import did_you_mean, first_line
from ..modes import eval_mode

CIFAR_RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32,
                       "resnet44": 44, "resnet56": 56, "resnet110": 110, "resnet1202": 1202}
CIFAR_VGG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}
# the same features with the classifier of Li et al. 2017 (Rethinking's l1-norm-pruning):
# Linear(512, 512) + BN + ReLU + Linear(512, classes); plain `vggN` has one Linear (as
# network slimming and Rethinking's other CIFAR VGGs)
CIFAR_VGG_L1 = {f"{k}_l1": v for k, v in CIFAR_VGG.items()}
TORCHVISION_PREFIX = "torchvision."  # `torchvision.vgg16` reaches torchvision's ImageNet VGG


@dataclass
class ModelConfig:
    arch: str = opt(
        "resnet20", "network name: resnet20/32/44/56/110 (CIFAR), vgg11/13/16/19 (CIFAR, BN, one "
        "linear classifier), vgg16_l1 (CIFAR, the L1 paper's two-layer classifier), or any "
        "torchvision classification model (resnet18, resnet50, ...; `torchvision.NAME` where a "
        "CIFAR name shadows it, e.g. torchvision.vgg16)")
    shortcut: Literal["A", "B"] = opt(
        "A", "CIFAR ResNet shortcut: A = zero-padding identity (the papers'), B = 1x1 projection")
    pretrained: str | None = opt(
        None, "local file of weights (a state dict such as torchvision's .pth, or a pipeline "
        "checkpoint) loaded strictly into the dense model before pretraining")
    zero_init_residual: bool = opt(False, "init the last BN gamma of every residual block to 0")


# --------------------------------------------------------------------------- CIFAR ResNet


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially and place input channels among zero channels.

    Input channel `in_index[k]` goes to output channel `out_index[k]`; every other
    output channel is zero. The maps and sizes are buffers, so a pruned shortcut (fewer
    input or output channels) is stored and rebuilt as data.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        pad = (out_planes - in_planes) // 2
        self.stride = stride
        self.in_channels, self.out_channels = in_planes, out_planes
        self.register_buffer("in_index", torch.arange(in_planes))
        self.register_buffer("out_index", torch.arange(in_planes) + pad)
        self.register_buffer("sizes", torch.tensor([in_planes, out_planes]))

    def set_maps(self, pairs: list[tuple[int, int]], in_channels: int, out_channels: int) -> None:
        """Replace the channel maps (used by the pruner)."""
        dev = self.in_index.device
        self.in_index = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=dev)
        self.out_index = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=dev)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.sizes = torch.tensor([in_channels, out_channels], device=dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x[:, :, :: self.stride, :: self.stride]
        if self.in_index.numel() != x.shape[1]:
            xs = xs.index_select(1, self.in_index)
        out = xs.new_zeros(xs.shape[0], self.out_channels, xs.shape[2], xs.shape[3])
        return out.index_copy(1, self.out_index, xs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.in_channels, self.out_channels = (int(v) for v in self.sizes.tolist())

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016, sec. 4.2): depth = 6n + 2."""

    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class CifarVGG(nn.Module):
    """VGG with BN for 32x32 inputs, as in Li et al. 2017 and Liu et al. 2019 (Rethinking)."""

    def __init__(self, cfg: list, num_classes: int = 10, two_layer_classifier: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                in_ch = v
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Module = nn.Linear(in_ch, num_classes)
        if two_layer_classifier:  # Li et al. 2017
            self.classifier = nn.Sequential(nn.Linear(in_ch, 512), nn.BatchNorm1d(512),
                                            nn.ReLU(inplace=True), nn.Linear(512, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)  # as in the Rethinking code (BN1d keeps 1)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


# --------------------------------------------------------------------------- registry


def torchvision_names() -> list[str]:
    """torchvision's classification models (by the name `get_model` takes)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def cifar_names() -> list[str]:
    return sorted(CIFAR_RESNET_DEPTHS, key=CIFAR_RESNET_DEPTHS.get) + sorted(CIFAR_VGG) + sorted(
        CIFAR_VGG_L1)


def known_archs() -> list[str]:
    return cifar_names() + torchvision_names()


def _torchvision_name(name: str) -> str | None:
    """The torchvision model a name refers to, or None (CIFAR names take precedence)."""
    if name.startswith(TORCHVISION_PREFIX):
        name = name[len(TORCHVISION_PREFIX):]
        return name if name in torchvision_names() else None
    if name in CIFAR_RESNET_DEPTHS or name in CIFAR_VGG or name in CIFAR_VGG_L1:
        return None
    return name if name in torchvision_names() else None


def check_arch(name: str) -> str | None:
    """None when `name` is a known architecture, else a message listing the known ones."""
    if name in cifar_names() or _torchvision_name(name) is not None:
        return None
    hint = did_you_mean(name.removeprefix(TORCHVISION_PREFIX), known_archs())
    return (f"unknown architecture {name!r}{hint}; known: CIFAR {', '.join(cifar_names())}; "
            f"torchvision {', '.join(torchvision_names())}")


def arch_spec(cfg: ModelConfig, num_classes: int) -> dict:
    """The plain-data description of the dense network that `build_model` rebuilds."""
    return {"name": cfg.arch, "num_classes": int(num_classes), "shortcut": cfg.shortcut}


def build_model(arch: dict, zero_init_residual: bool = False) -> nn.Module:
    """Dense network from its plain-data description (randomly initialized)."""
    name, nc = arch["name"], int(arch["num_classes"])
    if name in CIFAR_RESNET_DEPTHS:
        model: nn.Module = CifarResNet(CIFAR_RESNET_DEPTHS[name], nc, arch.get("shortcut", "A"))
    elif name in CIFAR_VGG:
        model = CifarVGG(CIFAR_VGG[name], nc)
    elif name in CIFAR_VGG_L1:
        model = CifarVGG(CIFAR_VGG_L1[name], nc, two_layer_classifier=True)
    else:
        tv_name = _torchvision_name(name)
        if tv_name is None:
            raise ValueError(check_arch(name))
        extra = {}
        if tv_name in ("googlenet", "inception_v3"):  # a plain logits output, like the rest
            extra = {"aux_logits": False, "init_weights": True}
        model = torchvision.models.get_model(tv_name, weights=None, num_classes=nc, **extra)
        # ViT's and Swin's attention as modules whose heads can be removed (same function,
        # same state-dict keys: torchvision's weights load unchanged)
        convert(model)
    if zero_init_residual:
        zero_init_last_bn(model)
    return model


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local weights file into `model`, strictly: every tensor must exist in both
    with the same shape. Any problem is one CheckpointError line naming the file."""
    p = os.fspath(path)
    if os.path.isfile(p) and not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's pre-1.6 pickle format
        if not legacy:
            raise CheckpointError(f"{p}: not a torch weights file (model.pretrained)")
    state = load_weights_file(p)  # weights_only=True; one-line errors of its own
    own = model.state_dict()
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if bad_shape:
        k = bad_shape[0]
        problems.append(f"{len(bad_shape)} tensor(s) of another shape, e.g. {k} "
                        f"{tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} here")
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if problems:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hint = ""
        if last and any(k.endswith("weight") and state[k].dim() == 2 for k in bad_shape):
            hint = (f"; the model has {last[-1].out_features} classes: are these weights for "
                    "another data set or architecture?")
        raise CheckpointError(f"{path}: weights do not fit the model (model.pretrained): "
                              f"{'; '.join(problems)}{hint}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # dtype or other problems the checks above missed
        raise CheckpointError(f"{path}: weights do not fit the model "
                              f"({first_line(err)})") from None
    return model


def residual_last_bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BN of the residual branch of every residual block (CIFAR and torchvision)."""
    out = []
    for m in model.modules():
        if isinstance(m, BasicBlock) or isinstance(m, tvr.BasicBlock):
            out.append(m.bn2)
        elif isinstance(m, tvr.Bottleneck):
            out.append(m.bn3)
    return out


def zero_init_last_bn(model: nn.Module) -> int:
    """Bag of Tricks: gamma = 0 in each block's last BN, so blocks start as identities."""
    bns = residual_last_bns(model)
    for bn in bns:
        nn.init.zeros_(bn.weight)
    return len(bns)


# --------------------------------------------------------------------------- pruned shapes


def shrink_to(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Narrow every layer of `model` to the parameter shapes in `state_dict` (in place).

    This is how a pruned architecture is rebuilt from data: the state dict's tensor
    shapes are the per-layer widths. Every parameter and buffer takes its stored shape
    (free parameters too, e.g. ConvNeXt's layer_scale), and the Conv, BatchNorm, Linear,
    LayerNorm (normalized_shape; LayerNorm2d alike), option-A shortcut and attention
    (`num_heads` = q/k/v rows / head_dim) attributes are updated to match.
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
        _fix_attributes(module)


def sync_model_widths(model: nn.Module) -> None:
    """After torch-pruning's surgery (which updates the layers it knows): the widths that
    whole models keep as attributes, e.g. the embedding width ViT's input reshape uses."""
    for m in model.modules():
        if isinstance(m, VisionTransformer):
            m.hidden_dim = int(m.class_token.shape[-1])


def _fix_attributes(m: nn.Module) -> None:
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
    elif isinstance(m, PadShortcut):
        m.in_channels = m.out_channels = -1  # set from the `sizes` buffer on load
    elif isinstance(m, ATTENTION_TYPES):
        fix_heads(m)
    elif isinstance(m, VisionTransformer):  # the embedding width its input reshape uses
        m.hidden_dim = int(m.class_token.shape[-1])
    elif isinstance(m, PatchMerging):  # Swin: C inputs, concatenated 4x before the reduction
        m.dim = int(m.reduction.weight.shape[1]) // 4


# --------------------------------------------------------------------------- counting


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
def model_from_payload(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """Rebuild the (possibly pruned) network stored in a checkpoint dict."""
    arch, sd = payload_parts(ckpt, source)
    try:
        model = build_model(arch)
        shrink_to(model, sd)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: arch: cannot rebuild {arch['name'][:60]!r} "
                              f"({first_line(err)[:160]})") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{source}: weights do not fit the architecture "
                              f"{arch['name']!r}: {misfit(model.state_dict(), sd)}") from None
    return model


def check_forward(model: nn.Module, input_size: tuple[int, ...], source: str) -> None:
    """One image through the network on the CPU: a hand-made or damaged checkpoint whose
    shapes load but do not chain (a conv of the wrong rank, widths that disagree) is a
    CheckpointError naming the file, not a traceback in the middle of an evaluation."""
    p = next(model.parameters(), None)
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_size), dtype=p.dtype if p is not None else None))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"{source}: the weights do not form a working network "
                              f"({first_line(err)[:160]})") from None


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a network (dense or pruned) from any pipeline checkpoint file.

    >>> model = pipeline.load_model("checkpoints/cifar10_fpgm/prune/model.pt")

    Works on stage outputs (`model.pt`) and trainer checkpoints (`last.pt`, `best.pt`);
    nothing is unpickled (weights_only=True) and no pruning is re-run.
    """
    ckpt = load_checkpoint(Path(path), map_location=map_location)
    return model_from_payload(ckpt, str(path))


