"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s") under pruning, on small-width
instances of torchvision's ConvNeXt class and on the full convnext_tiny.

Each block: depthwise 7x7 conv -> LayerNorm (channels-last) -> Linear(d, 4d) -> GELU ->
Linear(4d, d), times layer_scale, plus the residual. `block_internal` prunes the MLP
hidden units (a Linear root); `all` also the residual width of every stage (stem or
downsampling conv, depthwise convs, LayerNorms, layer_scale, fc2 rows, next downsampling
conv's and the classifier's inputs, all coupled)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
from torchvision.models import convnext_tiny
from torchvision.models.convnext import CNBlock, CNBlockConfig, ConvNeXt

from pipeline import checkpoint as ckpt
from pipeline.models import build_model, count_macs, count_params, load_model, shrink_to
from pipeline.pruning import (
    PruneSpec,
    PruningError,
    SoftPruner,
    layer_numbers,
    prune_model,
    remove_filters,
    select_filters,
)
from pipeline.pruning.surgery import build_graph

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
WIDTHS, DEPTHS = (16, 32, 48, 64), (1, 2, 1, 1)


def small_convnext(widths=WIDTHS, seed: int = 0) -> nn.Module:
    """torchvision's ConvNeXt class at a small width, with non-trivial LayerNorm affine
    parameters and layer_scale (torchvision initializes it to 1e-6)."""
    torch.manual_seed(seed)
    cfg = [CNBlockConfig(w, nxt, d) for w, nxt, d in
           zip(widths, [*widths[1:], None], DEPTHS, strict=True)]
    m = ConvNeXt(cfg, num_classes=10)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
            if isinstance(mod, CNBlock):
                mod.layer_scale.uniform_(0.5, 1.5)
    return m.eval()


def batches():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(10, (4,), generator=g))]


def round_trip(model: nn.Module, tmp_path) -> nn.Module:
    """Saved as a checkpoint, rebuilt on a dense small ConvNeXt by shrink_to."""
    path = tmp_path / "model.pt"
    ckpt.save_model(path, model, {"name": "convnext_small_test", "num_classes": 10}, {})
    payload = torch.load(path, weights_only=True)
    rebuilt = small_convnext(seed=1)
    shrink_to(rebuilt, payload["state_dict"])
    rebuilt.load_state_dict(payload["state_dict"], strict=True)
    return rebuilt.eval()


def test_layer_numbers_and_groups_of_each_policy():
    model = small_convnext()
    dg = build_graph(model, X[:1])
    numbers = layer_numbers(model, dg)
    # stem 1; per block dwconv, fc1, fc2; each downsampling conv in its place
    assert list(numbers.items())[:6] == [
        ("features.0.0", 1), ("features.1.0.block.0", 2), ("features.1.0.block.3", 3),
        ("features.1.0.block.5", 4), ("features.2.1", 5), ("features.3.0.block.0", 6)]
    assert len(numbers) == 1 + 3 * sum(DEPTHS) + 3 and "classifier.2" not in numbers
    inner = select_filters(model, PruneSpec(method="l1", ratio=0.5), X[:1])
    hidden = [f"features.{2 * s + 1}.{b}.block.3" for s, d in enumerate(DEPTHS)
              for b in range(d)]
    assert [e["name"] for e in inner] == hidden
    assert [e["before"] for e in inner] == [4 * w for w, d in zip(WIDTHS, DEPTHS, strict=True)
                                            for _ in range(d)]
    every = select_filters(model, PruneSpec(method="l1", ratio=0.5, policy="all"), X[:1])
    streams = {e["name"]: e["convs"] for e in every if e["name"] not in hidden}
    assert streams == {
        "features.0.0": ["features.0.0", "features.1.0.block.5", "features.1.0.block.0"],
        "features.2.1": ["features.2.1", "features.3.0.block.5", "features.3.1.block.5",
                         "features.3.0.block.0", "features.3.1.block.0"],
        "features.4.1": ["features.4.1", "features.5.0.block.5", "features.5.0.block.0"],
        "features.6.1": ["features.6.1", "features.7.0.block.5", "features.7.0.block.0"]}
    assert all(e["coupled"] for e in every if e["name"] in streams)
    # by number: skip fc1 of the first block
    assert select_filters(model, PruneSpec(method="l1", ratio=0.5, skip=[3]), X[:1])[0][
        "name"] == "features.3.0.block.3"


@pytest.mark.parametrize("method", ["fpgm", "l1", "l2", "random", "taylor", "group_l2"])
def test_block_internal_prunes_the_mlp_hidden_units_exactly(method, tmp_path):
    """Zeroing fc1's selected rows and bias entries in the dense model (GELU(0) = 0: fc2
    sees zeros) gives the pruned model's output; the residual widths are untouched."""
    model = small_convnext()
    spec = PruneSpec(method=method, ratio=0.5)
    record = select_filters(model, spec, X[:1], batches=batches)
    dense = copy.deepcopy(model)
    mods = dict(dense.named_modules())
    with torch.no_grad():
        for e in record:
            mods[e["name"]].weight[e["removed"]] = 0
            mods[e["name"]].bias[e["removed"]] = 0
    pruned = copy.deepcopy(model)
    prune_model(pruned, spec, X[:1], batches=batches)
    for m, d in zip(pruned.modules(), model.modules(), strict=True):
        if isinstance(m, CNBlock):
            dim = d.layer_scale.shape[0]
            assert m.layer_scale.shape == d.layer_scale.shape
            assert (m.block[3].in_features, m.block[3].out_features) == (dim, 2 * dim)
            assert (m.block[5].in_features, m.block[5].out_features) == (2 * dim, dim)
            assert m.block[0].out_channels == dim and m.block[2].normalized_shape == (dim,)
    torch.testing.assert_close(pruned(X), dense(X), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(round_trip(pruned, tmp_path)(X), pruned(X))


def kept_slices(model: nn.Module, record: list[dict]) -> nn.Module:
    """An independent reference for `policy: all`: a ConvNeXt built at the pruned widths
    whose every parameter is the dense parameter indexed by the kept channels (residual
    channels of each stage, hidden units of each block), written out layer by layer."""
    kept = {e["name"]: sorted(set(range(e["before"])) - set(e["removed"])) for e in record}
    stage_root = ["features.0.0", "features.2.1", "features.4.1", "features.6.1"]
    ks = [torch.tensor(kept[r]) for r in stage_root]
    ref = small_convnext([len(k) for k in ks], seed=2)
    d, r = dict(model.named_parameters()), dict(ref.named_parameters())

    def put(name: str, value: torch.Tensor) -> None:
        assert r[name].shape == value.shape, name
        r[name].data.copy_(value)

    put("features.0.0.weight", d["features.0.0.weight"][ks[0]])
    put("features.0.0.bias", d["features.0.0.bias"][ks[0]])
    for p in ("weight", "bias"):
        put(f"features.0.1.{p}", d[f"features.0.1.{p}"][ks[0]])
    for s, depth in enumerate(DEPTHS):
        k = ks[s]
        if s:  # downsampling: LayerNorm2d of the previous width, 2x2 conv
            prev = ks[s - 1]
            for p in ("weight", "bias"):
                put(f"features.{2 * s}.0.{p}", d[f"features.{2 * s}.0.{p}"][prev])
            put(f"features.{2 * s}.1.weight", d[f"features.{2 * s}.1.weight"][k][:, prev])
            put(f"features.{2 * s}.1.bias", d[f"features.{2 * s}.1.bias"][k])
        for b in range(depth):
            pre = f"features.{2 * s + 1}.{b}."
            h = torch.tensor(kept[pre + "block.3"])
            put(pre + "layer_scale", d[pre + "layer_scale"][k])
            for p in ("weight", "bias"):
                put(pre + f"block.0.{p}", d[pre + f"block.0.{p}"][k])
                put(pre + f"block.2.{p}", d[pre + f"block.2.{p}"][k])
            put(pre + "block.3.weight", d[pre + "block.3.weight"][h][:, k])
            put(pre + "block.3.bias", d[pre + "block.3.bias"][h])
            put(pre + "block.5.weight", d[pre + "block.5.weight"][k][:, h])
            put(pre + "block.5.bias", d[pre + "block.5.bias"][k])
    for p in ("weight", "bias"):
        put(f"classifier.0.{p}", d[f"classifier.0.{p}"][ks[-1]])
    put("classifier.2.weight", d["classifier.2.weight"][:, ks[-1]])
    put("classifier.2.bias", d["classifier.2.bias"])
    return ref.eval()


@pytest.mark.parametrize("method", ["fpgm", "l1", "group_l2"])
def test_policy_all_prunes_the_residual_widths(method, tmp_path):
    """Zeroing is no reference under `all`: every LayerNorm normalizes over all channels of
    the residual stream, and a zeroed channel still counts in its mean and variance, so a
    dense model with the selected channels zeroed does not give the pruned model's output
    (removing a channel changes the statistics of the others). Instead the pruned model
    must equal a ConvNeXt built at the pruned widths from the kept slices of every dense
    parameter (`kept_slices`), have the widths and MACs of a ConvNeXt of those widths, and
    round-trip through a checkpoint exactly."""
    model = small_convnext()
    spec = PruneSpec(method=method, ratio=0.5, policy="all")
    record = select_filters(model, spec, X[:1])
    pruned = copy.deepcopy(model)
    prune_model(pruned, spec, X[:1])
    ref = kept_slices(model, record)
    torch.testing.assert_close(pruned(X), ref(X), atol=1e-5, rtol=1e-5)
    half = small_convnext(tuple(w // 2 for w in WIDTHS))
    assert {k: v.shape for k, v in pruned.state_dict().items()} == \
        {k: v.shape for k, v in half.state_dict().items()}
    assert count_macs(pruned, (3, 32, 32)) == count_macs(half, (3, 32, 32))
    assert count_params(pruned) == count_params(half)
    blk = pruned.features[3][1]
    assert blk.layer_scale.shape == (16, 1, 1) and blk.block[0].groups == 16
    assert pruned.classifier[0].normalized_shape == (32,)
    assert pruned.classifier[2].in_features == 32
    torch.testing.assert_close(round_trip(pruned, tmp_path)(X), pruned(X))


def test_bn_scale_is_an_error_on_convnext():
    with pytest.raises(PruningError, match="bn_scale: features.1.0.block.3 is followed by "
                                           "no BatchNorm"):
        prune_model(small_convnext(), PruneSpec(method="bn_scale", ratio=0.5), X[:1])


def test_target_macs_reduction_on_convnext():
    model = small_convnext()
    before = count_macs(model, (3, 32, 32))["total"]
    prune_model(model, PruneSpec(method="l1", ratio=None, target_macs_reduction=0.4,
                                 policy="all"), X[:1])
    reduction = 1 - count_macs(model, (3, 32, 32))["total"] / before
    assert 0.4 <= reduction < 0.5
    assert model(X).shape == (2, 10)


def test_soft_pruning_then_removal_is_exact():
    """Soft pruning zeroes fc1's selected rows; the prune stage's removal of exactly those
    leaves the output unchanged."""
    model = small_convnext()
    soft = SoftPruner(model, PruneSpec(method="fpgm", ratio=0.5), X[:1])
    record = soft.step()
    assert record and all(e["name"].endswith("block.3") for e in record)
    fc1 = model.features[1][0].block[3].weight.detach()
    assert float(fc1[record[0]["removed"]].abs().sum()) == 0
    want = model(X)
    report = remove_filters(model, record, X[:1])
    assert len(report.layers) == len(record)
    assert model.features[1][0].block[3].out_features == 32
    torch.testing.assert_close(model(X), want, atol=1e-5, rtol=1e-5)


def test_count_macs_counts_linear_macs_per_position():
    """Hand count of the small ConvNeXt at 32x32: stem 4x4/4 -> 8x8; per block at HxW with
    width d: depthwise d*49*HW, fc1 and fc2 4d^2*HW each (Linear MACs per position);
    downsampling 2x2/2 d_out*d_in*4*HW_out; classifier 64*10."""
    sizes = (8 * 8, 4 * 4, 2 * 2, 1)
    conv = 16 * 3 * 16 * sizes[0]
    linear = 64 * 10
    for s, (d, depth, hw) in enumerate(zip(WIDTHS, DEPTHS, sizes, strict=True)):
        conv += depth * d * 49 * hw
        linear += depth * 8 * d * d * hw
        if s:
            conv += d * WIDTHS[s - 1] * 4 * hw
    assert count_macs(small_convnext(), (3, 32, 32)) == {
        "conv": conv, "linear": linear, "attention": 0, "total": conv + linear}


def test_convnext_tiny_from_yaml_name_pruned_saved_and_rebuilt(tmp_path):
    """convnext_tiny (the `model.arch` name) pruned under `all` at a 32x32 input (its
    widths do not depend on the size), saved, rebuilt by load_model (shrink_to fixes the
    LayerNorms, LayerNorm2d, layer_scale and Linear shapes); the full-size dense model
    counted on the meta device."""
    model = build_model({"name": "convnext_tiny", "num_classes": 10}).eval()
    ex = torch.zeros(1, 3, 32, 32)
    before = count_macs(model, (3, 32, 32))
    report = prune_model(model, PruneSpec(method="l1", ratio=0.25, policy="all"), ex)
    assert len(report.layers) == 4 + 18  # four residual widths, 18 blocks' hidden units
    blk = model.features[5][8]
    assert blk.layer_scale.shape == (288, 1, 1)  # 384 -> 288
    assert (blk.block[3].in_features, blk.block[3].out_features) == (288, 1152)
    assert model.classifier[0].normalized_shape == (576,)
    after = count_macs(model, (3, 32, 32))
    assert after["linear"] < 0.6 * before["linear"] and after["conv"] < 0.7 * before["conv"]
    path = tmp_path / "model.pt"
    ckpt.save_model(path, model, {"name": "convnext_tiny", "num_classes": 10}, {})
    rebuilt = load_model(path).eval()
    assert rebuilt.features[5][8].block[2].normalized_shape == (288,)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))
    with torch.device("meta"):
        full = convnext_tiny()
    assert sum(p.numel() for p in full.parameters()) == 28_589_128


def test_convnext_tiny_prune_stage_from_yaml(tiny_config, cli, tmp_path):
    """`model.arch: convnext_tiny` through `python -m pipeline run`: one pretrain epoch on
    32 synthetic 32x32 images, then a prune stage under `all` with a skip by layer number
    (3: the first block's fc1); the stage's model.pt rebuilds by load_model."""
    cfg = tiny_config({
        "data": {"synthetic": {"train_size": 32, "test_size": 16, "image_size": 32}},
        "model": {"arch": "convnext_tiny"},
        "stages": {"pretrain": {"epochs": 1, "lr": 0.001, "schedule": {"type": "constant"}},
                   "prune": {"method": "l1", "ratio": 0.25, "policy": "all", "skip": [3]}}})
    for stage in ("pretrain", "prune"):
        code, _, err = cli("run", cfg, "--stage", stage)
        assert code == 0, err
    stage = tmp_path / "runs/tiny/prune"
    s = json.loads((stage / "summary.json").read_text())
    assert s["status"] == "completed" and 0.3 < s["mac_reduction"] < 0.6
    layers = {e["name"]: e for e in json.loads((stage / "layers.json").read_text())}
    assert "features.1.0.block.3" not in layers
    assert layers["features.1.1.block.3"]["number"] == 6
    assert (layers["features.0.0"]["before"], layers["features.0.0"]["after"]) == (96, 72)
    model = load_model(stage / "model.pt").eval()
    assert model.features[1][0].block[3].out_features == 384  # skipped
    assert model.features[1][1].block[3].weight.shape == (288, 72)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_scratch_reinitializes_a_pruned_convnext_as_its_constructor(caplog):
    """scratch: normal (std 0.02, torchvision's trunc_normal_ at +-2) conv/linear weights,
    zero biases, LayerNorm 1/0 and layer_scale back at 1e-6 (a trained layer_scale must
    not survive)."""
    from stages import scratch

    model = small_convnext()
    prune_model(model, PruneSpec(method="l1", ratio=0.5, policy="all"), X[:1])
    assert scratch.reinitialize(model, "convnext_tiny", seed=0) == "tv_convnext"
    assert "no known init scheme" not in caplog.text
    for m in model.modules():
        if isinstance(m, CNBlock):
            assert torch.equal(m.layer_scale, torch.full_like(m.layer_scale, 1e-6))
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            assert not m.bias.any()
        elif isinstance(m, nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.any()
    weights = torch.cat([m.weight.flatten() for m in model.modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear))])
    assert 0.019 < float(weights.detach().std()) < 0.021


@pytest.mark.parametrize("policy, macs, params", [
    (None, 4_455_531_264, 28_589_128),
    ("block_internal", 3_415_081_728, 22_112_872),
    ("all", 2_528_797_248, 16_299_568)])
def test_convnext_tiny_224_figures_in_the_docs(policy, macs, params):
    """The docs' convnext_tiny figures (1000 classes, l1 at 25%, MACs at 224x224): pruned
    at 32x32, counted on the meta device."""
    model = build_model({"name": "convnext_tiny", "num_classes": 1000}).eval()
    if policy:
        prune_model(model, PruneSpec(method="l1", ratio=0.25, policy=policy),
                    torch.zeros(1, 3, 32, 32))
    model.to("meta")
    assert count_macs(model, (3, 224, 224))["total"] == macs
    assert count_params(model) == params
