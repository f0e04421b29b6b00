"""Pruning as the papers' code does it: selection, counts, policies, MACs, the model as data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, Loader
from pipeline.models import PadShortcut, build_model, count_macs, load_model
from pipeline.pruning import (
    FPGMConfig,
    PruneSpec,
    PruningError,
    fpgm_scores,
    layer_numbers,
    prune_count,
    prune_model,
    remove_filters,
    select_filters,
)

X32 = torch.zeros(1, 3, 32, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def resnet(depth: int = 20, shortcut: str = "A", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model({"name": f"resnet{depth}", "num_classes": 10, "shortcut": shortcut})


def weights_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: m.weight.detach().double().numpy() for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


# --------------------------------------------------------------------------- references


def official_fpgm(weight: np.ndarray, rate_norm: float, rate_dist: float) -> list[int]:
    """he-y/filter-pruning-geometric-median, Mask.get_filter_codebook + get_filter_similar,
    written independently: pairwise distances by broadcasting, summed over axis 0."""
    n = weight.shape[0]
    w = weight.reshape(n, -1)
    filter_pruned_num = int(n * (1 - rate_norm))
    similar_pruned_num = int(n * rate_dist)
    norm = np.linalg.norm(w, ord=2, axis=1)
    large = norm.argsort()[filter_pruned_num:]
    small = norm.argsort()[:filter_pruned_num]
    sub = w[large]
    dist = np.sqrt(((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1))
    similar_sum = np.sum(np.abs(dist), axis=0)
    similar_small = similar_sum.argsort()[:similar_pruned_num]
    return sorted(set(small.tolist()) | {int(large[i]) for i in similar_small})


def rethinking_l1(weight: np.ndarray, prune_prob: float) -> list[int]:
    """Eric-mingjie/rethinking-network-pruning cifar/l1-norm-pruning/res56prune.py: keep the
    int(n * (1 - p)) filters of largest L1 norm; returns the removed ones."""
    n = weight.shape[0]
    l1 = np.sum(np.abs(weight), axis=(1, 2, 3))
    num_keep = int(n * (1 - prune_prob))
    keep = set(np.argsort(l1)[::-1][:num_keep].tolist())
    return [i for i in range(n) if i not in keep]


def by_name(record: list[dict]) -> dict[str, list[int]]:
    return {e["name"]: e["removed"] for e in record}


# --------------------------------------------------------------------------- criteria


def test_counts_floor_as_official_code_and_torch_pruning_rounding():
    assert [prune_count(c, 0.4) for c in (16, 32, 64)] == [6, 12, 25]
    assert [prune_count(c, 0.4, round_to=1) for c in (16, 32, 64)] == [7, 13, 26]
    assert prune_count(16, 0.4, round_to=8) == 8  # keep int(9.6)=9 -> 8
    assert prune_count(64, 0.4, round_to=8) == 32  # keep 38 -> 32
    assert prune_count(100, 0.29) == 29  # floor with a tolerance for float products
    assert prune_count(4, 0.99) == 3  # at least one filter stays
    # per-layer widths of ResNet-56 at FPGM 40% (floor): 10/20/39 of 16/32/64
    model = resnet(56)
    report = prune_model(model, PruneSpec(method="fpgm", ratio=0.4), X32)
    widths = {e["name"].split(".")[0]: e["after"] for e in report.layers}
    assert widths == {"layer1": 10, "layer2": 20, "layer3": 39}
    assert all(len(e["removed"]) == e["before"] - e["after"] for e in report.layers)


def test_fpgm_selection_equals_official_algorithm():
    model = resnet(20, seed=3)
    w = weights_of(model)
    record = select_filters(model, PruneSpec(method="fpgm", ratio=0.4), X32)
    assert len(record) == 9  # every block's conv1
    differs_from_norm = 0
    for name, removed in by_name(record).items():
        assert removed == official_fpgm(w[name], rate_norm=1.0, rate_dist=0.4), name
        differs_from_norm += removed != official_fpgm(w[name], rate_norm=0.6, rate_dist=0.0)
    assert differs_from_norm > 0  # distances, not norms, decided


@pytest.mark.parametrize("rate_norm,rate_dist", [(0.7, 0.1), (0.9, 0.3)])
def test_fpgm_mix_equals_official_algorithm(rate_norm, rate_dist):
    model = resnet(20, seed=4)
    w = weights_of(model)
    spec = PruneSpec(method="fpgm", fpgm=FPGMConfig(norm_ratio=1 - rate_norm,
                                                    distance_ratio=rate_dist))
    record = select_filters(model, spec, X32)
    assert abs(spec.ratio - (1 - rate_norm + rate_dist)) < 1e-9
    for name, removed in by_name(record).items():
        assert removed == official_fpgm(w[name], rate_norm, rate_dist), name
    # distance share left to default (ratio - norm_ratio) gives the same counts
    spec2 = PruneSpec(method="fpgm", ratio=1 - rate_norm + rate_dist,
                      fpgm=FPGMConfig(norm_ratio=1 - rate_norm))
    assert by_name(select_filters(model, spec2, X32)) == by_name(record)


def test_l1_selection_equals_official_code():
    model = resnet(56, seed=5)
    w = weights_of(model)
    # the L1 code's rounding (keep int(n * (1 - p))) is round_to: 1
    record = select_filters(model, PruneSpec(method="l1", ratio=0.3, round_to=1), X32)
    for name, removed in by_name(record).items():
        assert removed == rethinking_l1(w[name], 0.3), name
    # the FPGM code's rounding (floor of the removed count), same ranking
    record = select_filters(model, PruneSpec(method="l1", ratio=0.3), X32)
    for name, removed in by_name(record).items():
        l1 = np.abs(w[name]).sum(axis=(1, 2, 3))
        assert removed == sorted(np.argsort(l1)[: int(l1.size * 0.3)].tolist())


def test_residual_coupled_group_scoring_rule():
    """Documented rule: each conv's scores divided by their mean, summed over the convs
    producing the group's channels; so a layer's weight scale does not decide."""
    model = resnet(8, shortcut="A", seed=6)
    spec = PruneSpec(method="fpgm", ratio=0.4, policy="all", include=["conv1"])
    (entry,) = select_filters(model, spec, X32)
    assert entry["coupled"] and entry["convs"] == ["conv1", "layer1.0.conv2"]
    w = weights_of(model)
    total = np.zeros(16)
    for name in entry["convs"]:
        rows = w[name].reshape(16, -1)
        d = np.sqrt(((rows[:, None] - rows[None]) ** 2).sum(-1)).sum(0)
        total += d / d.mean()
    assert entry["removed"] == sorted(np.argsort(total)[:6].tolist())
    with torch.no_grad():
        model.conv1.weight.mul_(1000.0)
    (scaled,) = select_filters(model, spec, X32)
    assert scaled["removed"] == entry["removed"]
    # l1 follows the same rule
    (l1,) = select_filters(model, PruneSpec(method="l1", ratio=0.4, policy="all",
                                            include=["conv1"]), X32)
    w = weights_of(model)
    s = sum(np.abs(w[n]).reshape(16, -1).sum(1) / np.abs(w[n]).reshape(16, -1).sum(1).mean()
            for n in l1["convs"])
    assert l1["removed"] == sorted(np.argsort(s)[:6].tolist())


# --------------------------------------------------------------------------- policies


def bn_of(conv: str) -> str:
    head, _, last = conv.rpartition(".")
    if last.startswith("conv"):
        return f"{head}.bn{last[4:]}".lstrip(".")
    return f"{head}.1"  # shortcut.0 / downsample.0 -> .1


@pytest.mark.parametrize("arch,shortcut,size", [("resnet20", "A", 32), ("resnet20", "B", 32),
                                                 ("resnet18", None, 32)])
def test_policy_all_removes_exactly_the_zeroed_channels(arch, shortcut, size):
    """Channels whose conv filters and BN are zero carry nothing: removing them must leave
    the output unchanged. Checks the option-A shortcut pruner's channel maps and the
    coupled groups of option B and torchvision ResNets."""
    torch.manual_seed(0)
    model = build_model({"name": arch, "num_classes": 10, "shortcut": shortcut or "A"}).eval()
    x = torch.randn(2, 3, size, size)
    example = torch.zeros(1, 3, size, size)
    record = select_filters(model, PruneSpec(method="fpgm", ratio=0.4, policy="all"), example)
    assert any(e["coupled"] for e in record) and any(not e["coupled"] for e in record)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for m in model.modules():  # non-trivial statistics, so BN is no identity
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
        for e in record:
            for conv in e["convs"]:
                bn = mods[bn_of(conv)]
                for t in (mods[conv].weight, bn.weight, bn.bias, bn.running_mean):
                    t[e["removed"]] = 0
        # an option-A shortcut carries the previous stage's channels into its stage's stream;
        # removing a stream channel removes that too: zero it at the shortcut's output
        hooks = []
        for name, m in mods.items():
            if isinstance(m, PadShortcut):
                block = name.rsplit(".", 1)[0]
                (e,) = [e for e in record if f"{block}.conv2" in e["convs"]]
                idx = torch.tensor(e["removed"])
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, idx=idx: out.index_fill(1, idx, 0.0)))
        dense_out = model(x)
        for h in hooks:
            h.remove()
    report = remove_filters(model, record, example)
    assert len(report.layers) == len(record)
    with torch.no_grad():
        pruned_out = model.eval()(x)
    assert pruned_out.shape == dense_out.shape
    assert torch.allclose(pruned_out, dense_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("policy", ["block_internal", "all"])
def test_policies_keep_output_shape_and_reload(shortcut, policy, tmp_path):
    model = resnet(20, shortcut)
    spec = PruneSpec(method="fpgm", ratio=0.4, policy=policy)
    report = prune_model(model, spec, X32)
    coupled = [e for e in report.layers if e["coupled"]]
    assert bool(coupled) == (policy == "all")
    assert len(report.layers) == 9 + (3 if policy == "all" else 0)
    x = torch.randn(2, 3, 32, 32)
    out = model.eval()(x)
    assert out.shape == (2, 10)
    path = tmp_path / "model.pt"
    ckpt.save_model(path, model, {"name": "resnet20", "num_classes": 10, "shortcut": shortcut})
    again = load_model(path).eval()
    assert torch.equal(again(x), out)


def test_torchvision_resnet_policy_all_keeps_shape():
    torch.manual_seed(0)
    model = build_model({"name": "resnet18", "num_classes": 7})
    report = prune_model(model, PruneSpec(ratio=0.5, policy="all"), X32)
    assert any(any("downsample" in c for c in e["convs"]) for e in report.layers)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model.fc.in_features == 256  # the last residual stream, 512 -> 256


def test_layer_numbers_follow_the_l1_code():
    for shortcut in "AB":  # projections are not numbered: same numbers on both options
        numbers = layer_numbers(resnet(56, shortcut))
        assert len(numbers) == 55 and numbers["conv1"] == 1
        names = {v: k for k, v in numbers.items()}
        assert [names[i] for i in (16, 18, 20, 34, 38, 54)] == [
            "layer1.7.conv1", "layer1.8.conv1", "layer2.0.conv1", "layer2.7.conv1",
            "layer3.0.conv1", "layer3.8.conv1"]


@pytest.mark.parametrize("variant,skip,ratios,conv_macs,reduction,params,widths", [
    ("B", [16, 18, 20, 34, 38, 54], (0.6, 0.3, 0.1), 90_906_624, 0.276, 735_712, (6, 22, 57)),
    ("A", [16, 20, 38, 54], (0.1, 0.1, 0.1), 112_435_200, 0.104, 773_336, (14, 28, 57)),
])
def test_l1_paper_resnet56_recipes_macs(variant, skip, ratios, conv_macs, reduction, params,
                                        widths):
    """Li et al. 2017 ResNet-56-A/B (Rethinking's res56prune.py skip lists and per-stage
    ratios, its rounding = round_to: 1): B has 9.09E7 conv MACs (27.6% fewer, 0.73M
    params), A 1.12E8 (10.4% fewer, 0.77M), as the paper's table."""
    model = resnet(56, "A")
    dense = count_macs(model, (3, 32, 32))["conv"]
    spec = PruneSpec(method="l1", skip=skip, round_to=1, layer_ratios={
        f"layer{i + 1}.*": r for i, r in enumerate(ratios)})
    report = prune_model(model, spec, X32)
    conv = count_macs(model, (3, 32, 32))["conv"]
    assert dense == 125_485_056
    assert conv == conv_macs
    assert f"{conv:.2E}" == {"B": "9.09E+07", "A": "1.12E+08"}[variant]
    assert round(1 - conv / dense, 3) == reduction
    assert sum(p.numel() for p in model.parameters()) == params
    after = {(e["name"].split(".")[0], e["after"]) for e in report.layers}
    assert after == {(f"layer{i + 1}", w) for i, w in enumerate(widths)}
    assert len(report.layers) == 27 - len(skip)


@pytest.mark.parametrize("policy,conv_macs,reduction", [
    ("block_internal", 77_948_928, 0.379), ("all", 48_336_192, 0.615)])
def test_fpgm40_resnet56_mac_reductions_as_documented(policy, conv_macs, reduction):
    model = resnet(56, "A")
    prune_model(model, PruneSpec(method="fpgm", ratio=0.4, policy=policy), X32)
    conv = count_macs(model, (3, 32, 32))["conv"]
    assert conv == conv_macs
    assert round(1 - conv / 125_485_056, 3) == reduction
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_include_skip_names_globs_numbers_and_errors():
    report = prune_model(resnet(20), PruneSpec(include=["layer2.*"]), X32)
    assert {e["name"] for e in report.layers} == {f"layer2.{i}.conv1" for i in range(3)}
    report = prune_model(resnet(20), PruneSpec(skip=["layer1.*", 16]), X32)
    names = {e["name"] for e in report.layers}
    assert "layer3.1.conv1" not in names  # number 16 (stem 1, layer1 2-7, layer2 8-13, ...)
    assert not any(n.startswith("layer1") for n in names) and len(names) == 5
    with pytest.raises(PruningError,
                       match=r"skip\[0\]: no conv numbered 99 \(the model has 1-19\)"):
        prune_model(resnet(20), PruneSpec(skip=[99]), X32)
    with pytest.raises(PruningError, match=r"include\[0\]: 'layer9.\*' matches no convolution"):
        prune_model(resnet(20), PruneSpec(include=["layer9.*"]), X32)
    with pytest.raises(PruningError, match="nothing to prune"):
        prune_model(resnet(20), PruneSpec(include=["conv1"]), X32)  # coupled: block_internal


def test_per_stage_ratios_and_skip_downsample():
    report = prune_model(resnet(20), PruneSpec(layer_ratios={"layer1.*": 0.5, "layer3.*": 0.25}),
                         X32)
    after = {e["name"].split(".")[0]: e["after"] for e in report.layers}
    assert after == {"layer1": 8, "layer2": 20, "layer3": 48}  # layer2: the default 0.4
    model = resnet(20, "B")
    report = prune_model(model, PruneSpec(policy="all", skip_downsample=True), X32)
    convs = [c for e in report.layers for c in e["convs"]]
    assert not any("shortcut" in c for c in convs)
    assert "conv1" in convs  # the first stage's residual stream has no projection
    assert model.layer3[0].shortcut[0].out_channels == 64


def test_target_macs_reduction_reached_in_small_steps():
    model = resnet(20, "A")
    dense = count_macs(model, (3, 32, 32))["total"]
    report = prune_model(model, PruneSpec(target_macs_reduction=0.5, policy="all"), X32)
    reduction = 1 - count_macs(model, (3, 32, 32))["total"] / dense
    assert 0.5 <= reduction < 0.52
    assert report.steps > 5  # 2% of every group's width per step
    with pytest.raises(PruningError, match="out of reach"):
        prune_model(resnet(20), PruneSpec(target_macs_reduction=0.5,
                                          include=["layer1.0.conv1"]), X32)


def test_round_mode_nearest_keeps_the_nearest_multiple():
    assert [prune_count(c, 0.4, 8, "nearest") for c in (16, 32, 64)] == [8, 16, 24]  # keep 8/16/40
    assert [prune_count(c, 0.4, 8, "down") for c in (16, 32, 64)] == [8, 16, 32]
    assert prune_count(12, 0.5, 8, "nearest") == 4  # keep 6 -> 8 (halves up)
    assert prune_count(64, 0.05, 8, "nearest") == 0  # keep 60.8 -> 64: nothing removed
    assert prune_count(16, 0.9, 8, "nearest") == 8  # at least round_to kept
    # one-shot: ResNet-20 at FPGM 40% -> widths 8/16/40, the criterion's lowest filters
    model = resnet(20, seed=3)
    w = weights_of(model)
    spec = PruneSpec(method="fpgm", ratio=0.4, round_to=8, round_mode="nearest")
    record = select_filters(model, spec, X32)
    assert {e["name"].split(".")[0]: e["after"] for e in record} == {
        "layer1": 8, "layer2": 16, "layer3": 40}
    name = "layer3.1.conv1"
    assert by_name(record)[name] == sorted(np.argsort(fpgm_scores(w[name].reshape(64, -1)),
                                                       kind="stable")[:24].tolist())
    # global ranking: every group's kept width is a multiple of 8 and the total is closer to
    # the 40% target than rounding down
    glob = {}
    for mode in ("down", "nearest"):
        rec = select_filters(resnet(20, seed=3), PruneSpec(method="l1", ratio=0.4, round_to=8,
                                                           round_mode=mode,
                                                           global_ranking=True), X32)
        assert all(e["after"] % 8 == 0 for e in rec)
        glob[mode] = sum(e["before"] - e["after"] for e in rec)
    assert glob["nearest"] < glob["down"]


def test_global_ranking_takes_the_lowest_normalized_scores_across_groups():
    model = resnet(20, seed=7)
    w = weights_of(model)
    spec = PruneSpec(method="l1", ratio=0.4, global_ranking=True)
    record = select_filters(model, spec, X32)
    pool = []
    for name in (n for n in w if n.endswith("conv1") and n != "conv1"):
        s = np.abs(w[name]).reshape(w[name].shape[0], -1).sum(1)
        pool += [(v, name, i) for i, v in enumerate(s / s.mean())]
    n_total = int(0.4 * sum(w[n].shape[0] for n in w if n.endswith("conv1") and n != "conv1"))
    expected: dict[str, list[int]] = {}
    for _, name, i in sorted(pool)[:n_total]:
        expected.setdefault(name, []).append(i)
    assert by_name(record) == {k: sorted(v) for k, v in expected.items()}
    counts = {e["after"] / e["before"] for e in record}
    assert len(counts) > 1  # not the same share everywhere


def test_spec_errors_name_the_key():
    def load(data: dict):
        return Loader("cfg.yaml").load(PruneSpec, data, "stages.prune")

    assert load({}).ratio == 0.4
    assert load({"target_macs_reduction": 0.5}).ratio is None
    cases = [
        ({"ratio": 0.4, "target_macs_reduction": 0.5}, "stages.prune.target_macs_reduction"),
        ({"method": "l1", "fpgm": {"norm_ratio": 0.1}}, "stages.prune.fpgm"),
        ({"ratio": 0.5, "fpgm": {"norm_ratio": 0.3, "distance_ratio": 0.1}},
         "stages.prune.fpgm.distance_ratio"),
        ({"layer_ratios": {"layer1.*": 1.5}}, "stages.prune.layer_ratios.layer1.*"),
        ({"target_macs_reduction": 0.5, "layer_ratios": {"x": 0.1}}, "stages.prune.layer_ratios"),
        ({"skip": [0]}, "stages.prune.skip"),
        ({"round_mode": "nearest"}, "stages.prune.round_mode"),
        ({"round_to": 8, "round_mode": "up"}, "stages.prune.round_mode"),
    ]
    for data, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("*", r"\*")):
            load(data)
    assert load({"skip": [16, "layer3.*"]}).skip == [16, "layer3.*"]


# --------------------------------------------------------------------------- the stage


def test_prune_stage_policy_all_option_a_summary_and_fresh_process(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1},
                                  "prune": {"policy": "all", "ratio": 0.5}}})
    code, _, err = cli("run", cfg, "--stage", "pretrain")
    assert code == 0, err
    code, _, err = cli("run", cfg, "--stage", "prune")
    assert code == 0, err
    stage = tmp_path / "runs/tiny/prune"
    s = json.loads((stage / "summary.json").read_text())
    assert s["policy"] == "all" and s["mac_reduction"] > 0.6 and s["mac_ratio"] > 2.5
    for key in ("top1", "top5", "test_loss", "macs_before", "conv_macs", "params_before"):
        assert s[key] is not None, key
    layers = json.loads((stage / "layers.json").read_text())
    assert any(e["coupled"] for e in layers)
    assert all(len(e["removed"]) == e["before"] - e["after"] for e in layers)
    import pipeline

    model = pipeline.load_model(stage / "model.pt").eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, pipeline\n"
              "m = pipeline.load_model(sys.argv[1]).eval()\n"
              "x = torch.load(sys.argv[2], weights_only=True)\n"
              "torch.save(m(x).detach(), sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(stage / "model.pt"), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=ROOT,
                   env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert torch.equal(torch.load(tmp_path / "y.pt", weights_only=True), model(x).detach())
    # a pruning that cannot be done is found by the preflight: one line, exit code 2, and
    # the completed stage untouched
    before = (stage / "model.pt").read_bytes()
    code, _, err = cli("run", cfg, "--stage", "prune", "--restart", "--set",
                       "stages.prune.skip=[99]")
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "stages.prune.skip[0]: no conv numbered 99" in line
    assert (stage / "model.pt").read_bytes() == before


def test_depthwise_se_and_grouped_convolutions():
    """Depthwise convs follow their input's group and an SE gate couples no residual stream
    (both block-internal); groups meeting grouped convs (ResNeXt) lose as many channels from
    every convolution group (tests/test_architectures.py checks the outputs)."""
    torch.manual_seed(0)
    model = build_model({"name": "mobilenet_v2", "num_classes": 10})
    report = prune_model(model, PruneSpec(method="l1", ratio=0.4), X32)
    assert len(report.layers) == 20 and not any(e["coupled"] for e in report.layers)
    assert any(len(e["convs"]) == 2 for e in report.layers)  # expansion + its depthwise conv
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    model = build_model({"name": "efficientnet_b0", "num_classes": 10})
    report = prune_model(model, PruneSpec(method="l1", ratio=0.4), X32)
    assert len(report.layers) == 35  # SE-gated expansions included
    model = build_model({"name": "resnext50_32x4d", "num_classes": 10})
    report = prune_model(model, PruneSpec(method="l1", ratio=0.4, policy="all"), X32)
    conv2 = model.layer1[0].conv2  # 40% of 128 = 51 -> 32: one channel of each of 32 groups
    assert (conv2.groups, conv2.in_channels, conv2.out_channels) == (32, 96, 96)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
