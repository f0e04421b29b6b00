"""Network families (`pipeline.models`): every name has one family, and a family written in
one place is all the pipeline needs to build, label, init, prune and rebuild a network."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.models import (
    FAMILIES,
    Family,
    arch_label,
    build_model,
    check_arch,
    cifar_names,
    family_of,
    known_archs,
    model_from_payload,
    register,
    reinitialize,
    torchvision_names,
    zero_init_last_bn,
)
from pipeline.pruning import PruneSpec, build_graph, layer_numbers, prune_model


def test_every_known_name_belongs_to_exactly_one_family():
    names = known_archs() + [f"torchvision.{n}" for n in torchvision_names()]
    for name in names:  # two families claiming one name would raise here
        assert family_of(name) is not None, name
    assert family_of("resnet56").name == "cifar_resnet"
    assert family_of("vgg16").name == "cifar_vgg"
    assert family_of("torchvision.vgg16").name == "tv_vgg"
    assert family_of("resnet50").name == "tv_resnet"
    assert family_of("convnext_tiny").name == "tv_convnext"
    assert family_of("swin_t").name == "vision_transformer"
    assert family_of("efficientnet_b0").name == "torchvision"  # the catch-all
    assert family_of("resnet57") is None


@pytest.mark.parametrize("name, label", [
    ("resnet56", "ResNet-56"), ("vgg16", "VGG-16"), ("vgg16_l1", "VGG-16_l1"),
    ("resnet50", "ResNet-50"), ("torchvision.resnet50", "torchvision.resnet50"),
    ("vgg11_bn", "vgg11_bn"), ("convnext_tiny", "convnext_tiny"), ("nonsense", "nonsense"),
])
def test_labels_are_written_as_the_papers_write_them(name, label):
    assert arch_label(name) == label


# --------------------------------------------------------------------------- a new family


class Gate(nn.Module):
    """A per-channel scale outside any layer whose width is also kept as an attribute."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels, 1, 1))
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise RuntimeError(f"Gate of {self.channels} channels got {x.shape[1]}")
        return x * self.scale


class Block(nn.Module):
    def __init__(self, c_in: int, c: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.gate = Gate(c)
        self.proj = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.gate(self.bn2(self.conv2(out))) + self.proj(x))


class TinyNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class TinyNets(Family):
    """The whole description of a new CIFAR network family, as one file would hold it."""

    name = "test_tinynet"
    init_scheme = "tinynet"
    projections = ("proj",)

    def names(self) -> list[str]:
        return ["tinynet3"]

    def build(self, name: str, num_classes: int, arch: dict) -> nn.Module:
        return TinyNet(num_classes)

    def label(self, name: str) -> str:
        return "TinyNet-3"

    def init_conv(self, m: nn.Conv2d) -> None:
        nn.init.constant_(m.weight, 0.25)

    def residual_bn(self, m: nn.Module) -> nn.Module | None:
        return m.bn2 if isinstance(m, Block) else None

    def fix_widths(self, m: nn.Module) -> bool:
        if isinstance(m, Gate):
            m.channels = int(m.scale.shape[0])
            return True
        return False

    def sync_widths(self, m: nn.Module) -> None:
        self.fix_widths(m)

    def unwrapped_parameters(self, m: nn.Module) -> list[tuple[nn.Parameter, int]]:
        return [(m.scale, 0)] if isinstance(m, Gate) else []


@pytest.fixture
def tinynets():
    register(TinyNets)
    yield FAMILIES[TinyNets.name]
    del FAMILIES[TinyNets.name]


def test_a_family_registers_once_and_its_names_must_be_new(tinynets):
    with pytest.raises(ValueError, match="registered twice"):
        register(TinyNets)

    class Clash(TinyNets):
        name = "test_clash"

    with pytest.raises(ValueError, match="already taken"):
        register(Clash)
    assert "test_clash" not in FAMILIES


def test_a_new_family_in_one_class_is_all_the_pipeline_needs(tinynets):
    arch = {"name": "tinynet3", "num_classes": 4}
    assert check_arch("tinynet3") is None and "tinynet3" in cifar_names()
    assert arch_label("tinynet3") == "TinyNet-3"
    model = build_model(arch)
    assert zero_init_last_bn(model) == 2  # its residual BNs
    assert reinitialize(model, "tinynet3", seed=0) == "tinynet"
    assert all((m.weight == 0.25).all() for m in model.modules() if isinstance(m, nn.Conv2d))

    example = torch.randn(2, 3, 16, 16)
    numbers = layer_numbers(model, build_graph(model, example))
    assert not any(".proj." in n for n in numbers)  # projections are not numbered
    assert len(numbers) == 5  # the stem and two convs per block

    torch.manual_seed(0)
    model = build_model(arch).eval()
    prune_model(model, PruneSpec(method="l1", ratio=0.5, policy="all"), example)
    gate = model.blocks[1].gate
    assert gate.scale.shape[0] == gate.channels == 8  # pruned with its stream, synced
    expected = model(example)

    rebuilt = model_from_payload({"arch": arch, "state_dict": model.state_dict()}).eval()
    assert rebuilt.blocks[1].gate.channels == 8  # fixed from the stored shapes
    assert torch.allclose(rebuilt(example), expected, atol=1e-6)


def test_the_test_family_is_gone_after_its_test():
    assert "test_tinynet" not in FAMILIES and check_arch("tinynet3") is not None
