"""Modern torchvision architectures under pruning: ResNeXt's grouped convolutions pruned
group-consistently (the same number of channels from every convolution group). Each is
checked by output equivalence (zeroing the selected channels in the dense model gives the
pruned model's output) and a load_model round trip; the full-size model is counted on
the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import resnext50_32x4d
from torchvision.models.resnet import Bottleneck, ResNet

from pipeline import checkpoint as ckpt
from pipeline.models import build_model, count_macs, load_model, shrink_to
from pipeline.pruning import PruneSpec, prune_model, select_filters
from pipeline.pruning.groups import following_bn
from pipeline.pruning.surgery import build_graph

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def small_resnext() -> nn.Module:
    """torchvision's ResNeXt class at a small width: 4 groups of 4 channels."""
    torch.manual_seed(0)
    m = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=4, width_per_group=4)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def zeroed(model: nn.Module, record: list[dict]) -> nn.Module:
    """The dense model with every selected channel zeroed after its BN (gamma, beta 0)."""
    dense = copy.deepcopy(model)
    mods = dict(dense.named_modules())
    dg = build_graph(dense, X[:1])
    with torch.no_grad():
        for e in record:
            for conv in e["convs"]:
                bn = following_bn(dg, mods[conv])
                bn.weight[e["removed"]] = 0
                bn.bias[e["removed"]] = 0
    return dense


@pytest.mark.parametrize("policy", ["block_internal", "all"])
@pytest.mark.parametrize("method", ["l1", "group_l2", "fpgm"])
def test_resnext_grouped_convs_pruned_group_consistently(policy, method, tmp_path):
    model = small_resnext()
    spec = PruneSpec(method=method, ratio=0.5, policy=policy)
    record = select_filters(model, spec, X[:1])
    grouped = {n for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1}
    # the grouped convs' inputs (conv1 of each block) and outputs (conv2) are pruned
    assert {e["name"] for e in record} >= {g.replace("conv2", "conv1") for g in grouped}
    want = zeroed(model, record)(X)
    pruned = copy.deepcopy(model)
    prune_model(pruned, spec, X[:1])
    dense = dict(model.named_modules())
    for n, m in pruned.named_modules():
        if n in grouped:
            assert m.groups == 4 and m.in_channels % 4 == 0 and m.out_channels % 4 == 0
            assert m.in_channels == dense[n].in_channels // 2  # really pruned, 50%
    torch.testing.assert_close(pruned(X), want, atol=1e-5, rtol=1e-5)
    # the same number from each of the 4 blocks of every grouped conv's channels
    for e in record:
        if e["name"].endswith(("conv1", "conv2")) and e["before"] % 4 == 0 and "layer" in \
                e["name"]:
            size = e["before"] // 4
            counts = [sum(1 for i in e["removed"] if i // size == b) for b in range(4)]
            assert len(set(counts)) == 1, (e["name"], counts)
    path = tmp_path / "model.pt"
    ckpt.save_model(path, pruned, {"name": "resnext", "num_classes": 10}, {})
    payload = torch.load(path, weights_only=True)
    rebuilt = small_resnext()
    shrink_to(rebuilt, payload["state_dict"])
    rebuilt.load_state_dict(payload["state_dict"], strict=True)
    torch.testing.assert_close(rebuilt.eval()(X), pruned(X))


def test_resnext50_round_trip_and_full_size_on_meta(tmp_path):
    """resnext50_32x4d from YAML's arch name: pruned at a small input, saved, rebuilt by
    load_model; the full-size dense model counted on the meta device."""
    model = build_model({"name": "resnext50_32x4d", "num_classes": 10}).eval()
    ex = torch.zeros(1, 3, 32, 32)
    before = count_macs(model, (3, 32, 32))["total"]
    prune_model(model, PruneSpec(method="l1", ratio=0.25), ex)
    conv2 = model.layer1[0].conv2
    assert conv2.groups == 32 and conv2.in_channels == 96  # 128 -> 96: 1 of 4 per group
    assert count_macs(model, (3, 32, 32))["total"] < 0.8 * before
    path = tmp_path / "model.pt"
    ckpt.save_model(path, model, {"name": "resnext50_32x4d", "num_classes": 10}, {})
    rebuilt = load_model(path).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))
    with torch.device("meta"):
        full = resnext50_32x4d()
    assert sum(p.numel() for p in full.parameters()) == 25_028_904
