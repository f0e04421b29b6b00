"""Modern torchvision architectures under pruning: ResNeXt's grouped convolutions pruned
group-consistently (the same number of channels from every convolution group); Linear
layers applied per position (transformer-style MLPs) as pruning roots. Each is checked by
output equivalence (zeroing the selected channels in the dense model gives the pruned
model's output) and a load_model round trip; the full-size model is counted on the meta
device."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import resnext50_32x4d
from torchvision.models.resnet import Bottleneck, ResNet

from pipeline import checkpoint as ckpt
from pipeline.models import build_model, count_macs, load_model, shrink_to
from pipeline.pruning import PruneSpec, PruningError, layer_numbers, prune_model, select_filters
from pipeline.pruning.groups import candidate_groups, following_bn
from pipeline.pruning.spec import checked
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


# --------------------------------------------------------------------------- Linear roots


class TokenMLP(nn.Module):
    """A transformer-style network: patch embedding conv -> tokens (N, T, C) -> one
    pre-norm residual MLP block (fc1 -> GELU -> fc2) -> mean over tokens -> a two-layer
    head on the flattened features (head.0 -> ReLU -> head.2, the classifier)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 24)
        self.fc2 = nn.Linear(24, 8)
        self.head = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 10))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(nn.functional.gelu(self.fc1(self.norm(t))))
        return self.head(t.mean(1))


def test_linear_roots_are_the_per_position_linears_and_numbered_after_convs():
    model = TokenMLP().eval()
    dg = build_graph(model, X[:1])
    assert dg.token_linears == {model.fc1, model.fc2}  # the head acts on flat features
    # convs keep their numbers; the per-position Linears take theirs in module order
    assert layer_numbers(model) == {"embed": 1}
    assert layer_numbers(model, dg) == {"embed": 1, "fc1": 2, "fc2": 3}
    inner = candidate_groups(model, dg, checked(PruneSpec(policy="block_internal")))
    assert [(g.name, g.number, g.convs, g.coupled) for g in inner] == [
        ("fc1", 2, ["fc1"], False)]  # fc1 -> GELU -> fc2 meets no addition (Addmm is none)
    every = candidate_groups(model, dg, checked(PruneSpec(policy="all")))
    assert [(g.name, g.convs, g.coupled) for g in every] == [
        ("embed", ["embed", "fc2"], True), ("fc1", ["fc1"], False)]
    # head.0 is no root (flattened features), the classifier never
    assert not any("head" in c for g in every for c in g.convs)
    with pytest.raises(PruningError, match=r"skip\[0\]: no layer numbered 4 \(the model has 1-3"):
        candidate_groups(model, dg, checked(PruneSpec(skip=[4])))
    assert candidate_groups(model, dg, checked(PruneSpec(skip=[2]))) == []


def test_cnn_groups_and_numbers_are_unchanged_by_linear_roots():
    """The L1 paper's VGG-16 has a hidden fc layer (classifier.0 -> BN1d -> classifier.3):
    it stays unpruned, and the conv numbers do not move."""
    model = build_model({"name": "vgg16_l1", "num_classes": 10}).eval()
    dg = build_graph(model, X[:1])
    assert dg.token_linears == frozenset()
    assert layer_numbers(model, dg) == layer_numbers(model)
    assert len(layer_numbers(model)) == 13
    groups = candidate_groups(model, dg, checked(PruneSpec(policy="all")))
    assert len(groups) == 13 and all(isinstance(g.root, nn.Conv2d) for g in groups)


@pytest.mark.parametrize("method", ["fpgm", "l1", "l2", "random", "taylor", "group_l2"])
def test_linear_root_output_equivalence_for_every_criterion(method):
    """Zeroing fc1's selected rows and bias entries (GELU(0) = 0, so fc2 sees zeros) gives
    exactly the output of the network with those hidden units removed."""
    model = TokenMLP().eval()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(10, (4,), generator=g))]
    spec = PruneSpec(method=method, ratio=0.5)
    record = select_filters(model, spec, X[:1], batches=lambda: data)
    assert [(e["name"], e["before"], e["after"]) for e in record] == [("fc1", 24, 12)]
    dense = copy.deepcopy(model)
    with torch.no_grad():
        dense.fc1.weight[record[0]["removed"]] = 0
        dense.fc1.bias[record[0]["removed"]] = 0
    pruned = copy.deepcopy(model)
    prune_model(pruned, spec, X[:1], batches=lambda: data)
    assert (pruned.fc1.out_features, pruned.fc2.in_features) == (12, 12)
    torch.testing.assert_close(pruned(X), dense(X), atol=1e-5, rtol=1e-5)
    if method == "l1":  # the rows of a Linear weight are its filters
        kept = sorted(set(range(24)) - set(record[0]["removed"]))
        norms = model.fc1.weight.abs().sum(1)
        assert norms[kept].min() >= norms[record[0]["removed"]].max()


def test_bn_scale_on_a_linear_group_is_a_clear_error():
    model = TokenMLP().eval()
    with pytest.raises(PruningError, match="bn_scale: fc1 is followed by no BatchNorm"):
        prune_model(model, PruneSpec(method="bn_scale", ratio=0.5), X[:1])
