"""Attention-head pruning of ViT and Swin (`heads`): the head-prunable attention modules
compute exactly what torchvision's do; removing heads gives the output of the dense model
with those heads zeroed; num_heads, the bias table and the state dict follow; a pruned
model is rebuilt from its state dict; the full-size models are counted on the meta
device against torchvision's published figures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml
from torchvision.models import Swin_T_Weights, ViT_B_16_Weights
from torchvision.models.swin_transformer import ShiftedWindowAttention, SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from conftest import TINY, deep_update
from pipeline import checkpoint as ckpt
from pipeline.attention import SelfAttention, WindowAttention, attention_modules, convert
from pipeline.models import (
    build_model,
    count_macs,
    count_params,
    load_model,
    load_pretrained,
    shrink_to,
)
from pipeline.pruning import (
    CRITERIA,
    PruneSpec,
    PruningError,
    SoftPruneSpec,
    prune_model,
    select_heads,
)
from pipeline.pruning.heads import HeadSet
from pipeline.pruning.spec import checked

pytestmark = pytest.mark.usefixtures("one_thread")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([1, 3])


def randomized(m: nn.Module) -> nn.Module:
    """Non-trivial weights everywhere (torchvision zero-initializes the classifier)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


def small_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return randomized(VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                        hidden_dim=64, mlp_dim=128, num_classes=10))


def small_swin() -> SwinTransformer:
    """Windows of 4 on an 8x8 map (then 4x4): shifted windows, relative position bias."""
    torch.manual_seed(0)
    return randomized(SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                      num_heads=[2, 4], window_size=[4, 4], num_classes=10))


def converted(model: nn.Module) -> nn.Module:
    convert(model)
    return model


SMALL = {"vit": small_vit, "swin": small_swin}


def out_proj(m: nn.Module) -> nn.Linear:
    return m.out_proj if isinstance(m, SelfAttention) else m.proj


def zeroed_heads(model: nn.Module, record: list[dict], how: str) -> nn.Module:
    """The dense model with the recorded heads silenced: their out-projection columns, or
    their value rows (weights and biases) zeroed."""
    dense = copy.deepcopy(model)
    mods = dict(dense.named_modules())
    with torch.no_grad():
        for e in record:
            m = mods[e["name"]]
            d, inner = m.head_dim, m.num_heads * m.head_dim
            for h in e["removed"]:
                if how == "out_columns":
                    out_proj(m).weight[:, h * d:(h + 1) * d] = 0
                else:
                    w, b = (m.in_proj_weight, m.in_proj_bias) if isinstance(m, SelfAttention) \
                        else (m.qkv.weight, m.qkv.bias)
                    w[2 * inner + h * d:2 * inner + (h + 1) * d] = 0
                    b[2 * inner + h * d:2 * inner + (h + 1) * d] = 0
    return dense


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_converted_modules_compute_what_torchvision_computes(kind):
    tv = SMALL[kind]()
    ours = converted(copy.deepcopy(tv))
    want_type = SelfAttention if kind == "vit" else WindowAttention
    old_type = nn.MultiheadAttention if kind == "vit" else ShiftedWindowAttention
    assert len(attention_modules(ours)) == (2 if kind == "vit" else 4)
    assert all(isinstance(m, want_type) for _, m in attention_modules(ours))
    assert not any(isinstance(m, old_type) for m in ours.modules())
    # the same state-dict keys and shapes: torchvision's weights load unchanged
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in tv.state_dict().items()}
    # bitwise equal where torchvision takes its plain path (autograd on)
    assert torch.equal(ours(X), tv(X))
    with torch.no_grad():  # torchvision's MHA then takes a fused kernel: last-bit differences
        torch.testing.assert_close(ours(X), tv(X), atol=1e-6, rtol=1e-6)
    if kind == "swin":  # a map that is not a multiple of the window: padding + shift
        x = torch.randn(1, 3, 40, 40)
        assert torch.equal(ours(x), tv(x))


def test_build_model_converts_and_loads_torchvision_weights(tmp_path):
    """swin_t from its arch name has the head-prunable modules, and a torchvision state dict
    (a pretrained file) loads strictly and gives torchvision's output."""
    model = build_model({"name": "swin_t", "num_classes": 10}).eval()
    assert all(isinstance(m, WindowAttention) for _, m in attention_modules(model))
    assert [m.num_heads for _, m in attention_modules(model)] == [3] * 2 + [6] * 2 + [12] * 6 \
        + [24] * 2
    small = small_swin()
    path = tmp_path / "weights.pth"
    torch.save(small.state_dict(), path)
    ours = converted(SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                     num_heads=[2, 4], window_size=[4, 4], num_classes=10))
    load_pretrained(ours, path)
    assert torch.equal(ours.eval()(X), small(X))


# --------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("method", ["l1", "l2", "fpgm", "group_l2", "random", "taylor"])
@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_removing_heads_equals_zeroing_them(kind, method, tmp_path):
    model = converted(SMALL[kind]())
    spec = PruneSpec(method=method, heads=0.5)
    batches = (lambda: iter([(X, Y)])) if method == "taylor" else None
    record = select_heads(model, spec, batches=batches)
    before = {n: m.num_heads for n, m in attention_modules(model)}
    assert [e["name"] for e in record] == list(before)
    want = zeroed_heads(model, record, "out_columns")(X)
    torch.testing.assert_close(zeroed_heads(model, record, "value_rows")(X), want,
                               atol=1e-6, rtol=1e-6)
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, spec, X[:1], batches=batches)
    assert report.layers == [] and len(report.heads) == len(before)
    torch.testing.assert_close(pruned(X), want, atol=1e-5, rtol=1e-5)
    for e, (name, m) in zip(report.heads, attention_modules(pruned), strict=True):
        assert e["name"] == name and m.num_heads == before[name] // 2 == e["after"]
        assert len(e["removed"]) == before[name] - m.num_heads
        inner = m.num_heads * m.head_dim
        assert out_proj(m).in_features == inner
        if isinstance(m, WindowAttention):
            assert m.qkv.out_features == 3 * inner
            assert m.relative_position_bias_table.shape[1] == m.num_heads
        else:
            assert m.in_proj_weight.shape[0] == 3 * inner
    # rebuilt from the state dict: num_heads = q/k/v rows / head_dim
    path = tmp_path / "model.pt"
    ckpt.save_model(path, pruned, {"name": kind, "num_classes": 10}, {})
    sd = torch.load(path, weights_only=True)["state_dict"]
    rebuilt = converted(SMALL[kind]())
    shrink_to(rebuilt, sd)
    rebuilt.load_state_dict(sd, strict=True)
    assert [m.num_heads for _, m in attention_modules(rebuilt)] == \
        [m.num_heads for _, m in attention_modules(pruned)]
    torch.testing.assert_close(rebuilt.eval()(X), pruned(X))


def test_swin_bias_table_columns_follow_their_heads():
    """The kept heads keep their own relative-position-bias columns (Swin)."""
    model = converted(small_swin())
    record = select_heads(model, PruneSpec(method="l1", heads=0.5))
    dense = {n: m.relative_position_bias_table.detach().clone()
             for n, m in attention_modules(model)}
    prune_model(model, PruneSpec(method="l1", heads=0.5), X[:1])
    for e in record:
        kept = [h for h in range(e["before"]) if h not in e["removed"]]
        table = dict(attention_modules(model))[e["name"]].relative_position_bias_table
        assert torch.equal(table, dense[e["name"]][:, kept])


def test_l1_head_scores_match_numpy():
    """l1 per head, computed independently in numpy from the packed projection: the head's
    q, k, v rows and its out-projection columns."""
    model = converted(small_vit())
    name, m = attention_modules(model)[0]
    w_in = m.in_proj_weight.detach().double().numpy()
    w_out = m.out_proj.weight.detach().double().numpy()
    heads, d = 4, 16
    inner = heads * d
    want = np.array([np.abs(w_in[[k * inner + h * d + j for k in range(3) for j in range(d)]]
                            ).sum() + np.abs(w_out[:, h * d:(h + 1) * d]).sum()
                     for h in range(heads)])
    got = CRITERIA["l1"].score_heads(HeadSet(name, m))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # group_l2 adds the biases (and, for Swin, the bias-table column)
    b = m.in_proj_bias.detach().double().numpy()
    want_g = np.array([(w_in[[k * inner + h * d + j for k in range(3) for j in range(d)]] ** 2
                        ).sum() + (w_out[:, h * d:(h + 1) * d] ** 2).sum()
                       + (b[[k * inner + h * d + j for k in range(3) for j in range(d)]] ** 2).sum()
                       for h in range(heads)])
    np.testing.assert_allclose(CRITERIA["group_l2"].score_heads(HeadSet(name, m)), want_g,
                               rtol=1e-12)
    record = select_heads(model, PruneSpec(method="l1", heads=0.25))
    assert record[0]["removed"] == [int(np.argmin(want))]


def test_taylor_head_scores_match_autograd():
    """taylor per head: (sum over the head's parameters of gradient x weight)^2, from the
    gradients autograd gives on one batch."""
    model = converted(small_vit())
    name, m = attention_modules(model)[1]
    nn.functional.cross_entropy(model(X), Y).backward()
    d, inner = m.head_dim, m.num_heads * m.head_dim
    gw_in = (m.in_proj_weight.grad * m.in_proj_weight).detach().double()
    gw_b = (m.in_proj_bias.grad * m.in_proj_bias).detach().double()
    gw_out = (m.out_proj.weight.grad * m.out_proj.weight).detach().double()
    want = []
    for h in range(m.num_heads):
        rows = [k * inner + h * d + j for k in range(3) for j in range(d)]
        want.append(float(gw_in[rows].sum() + gw_b[rows].sum()
                          + gw_out[:, h * d:(h + 1) * d].sum()) ** 2)
    model.zero_grad()
    spec = PruneSpec(method="taylor", heads=0.25, batches=1)
    record = select_heads(model, spec, batches=lambda: iter([(X, Y)]))
    assert record[1]["removed"] == [int(np.argmin(want))]
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_heads_round_down_and_keep_one():
    model = converted(small_swin())  # 2, 2, 4, 4 heads
    assert [e["after"] for e in select_heads(model, PruneSpec(method="l1", heads=0.3))] == \
        [2, 2, 3, 3]  # floor(0.3 x 2) = 0, floor(0.3 x 4) = 1
    assert [e["after"] for e in select_heads(model, PruneSpec(method="l1", heads=0.9))] == \
        [1, 1, 1, 1]


def test_vit_embedding_width_under_policy_all_with_heads():
    """`all` prunes the residual stream (rooted at the patch conv) through the attention
    modules: their q/k/v input columns and out-projection rows; heads are removed first."""
    model = converted(small_vit())
    dense = {n: m.in_proj_weight.detach().clone() for n, m in attention_modules(model)}
    report = prune_model(model, PruneSpec(method="l1", ratio=0.25, heads=0.5, policy="all"),
                         X[:1])
    (stream,) = [e for e in report.layers if e["name"] == "conv_proj"]
    kept = [i for i in range(64) if i not in stream["removed"]]
    assert model.hidden_dim == 48 and len(kept) == 48
    for e, (name, m) in zip(report.heads, attention_modules(model), strict=True):
        assert m.num_heads == 2 and m.out_proj.out_features == 48
        rows = [k * 64 + h * 16 + j for k in range(3) for h in range(4)
                if h not in e["removed"] for j in range(16)]
        assert torch.equal(m.in_proj_weight, dense[name][rows][:, kept])
    assert model(X).shape == (2, 10)
    sd = model.state_dict()
    rebuilt = shrink_to(converted(small_vit()), sd)
    rebuilt.load_state_dict(sd, strict=True)
    torch.testing.assert_close(rebuilt.eval()(X), model(X))


# --------------------------------------------------------------------------- arch names


def test_swin_t_round_trip_through_load_model(tmp_path):
    model = build_model({"name": "swin_t", "num_classes": 10}).eval()
    before = count_macs(model, (3, 32, 32))
    prune_model(model, PruneSpec(method="l2", heads=0.5), X[:1])
    assert [m.num_heads for _, m in attention_modules(model)] == [2] * 2 + [3] * 2 + [6] * 6 \
        + [12] * 2
    after = count_macs(model, (3, 32, 32))
    assert after["attention"] < before["attention"] and after["linear"] < before["linear"]
    path = tmp_path / "model.pt"
    ckpt.save_model(path, model, {"name": "swin_t", "num_classes": 10}, {})
    rebuilt = load_model(path).eval()
    assert [m.num_heads for _, m in attention_modules(rebuilt)] == \
        [m.num_heads for _, m in attention_modules(model)]
    torch.testing.assert_close(rebuilt(X), model(X))


@pytest.mark.parametrize("name,weights", [("vit_b_16", ViT_B_16_Weights.IMAGENET1K_V1),
                                          ("swin_t", Swin_T_Weights.IMAGENET1K_V1)])
def test_full_size_counted_on_meta(name, weights):
    """The full-size models from their arch names, on the meta device: parameters and MACs
    (conv + linear + attention products) as torchvision publishes them; a quarter of the
    heads removed, rebuilt by shrink_to, counted again against a closed formula."""
    with torch.device("meta"):
        model = build_model({"name": name, "num_classes": 1000})
    assert count_params(model) == weights.meta["num_params"]  # 86,567,656 / 28,288,354
    size = (3, 224, 224)
    macs = count_macs(model, size)
    assert macs["total"] / 1e9 == pytest.approx(weights.meta["_ops"], abs=5e-4)
    mods = attention_modules(model)
    record = select_heads(model, PruneSpec(method="random", heads=0.25))
    from pipeline.pruning.heads import apply_heads
    apply_heads(model, record)
    with torch.device("meta"):
        rebuilt = build_model({"name": name, "num_classes": 1000})
    shrink_to(rebuilt, model.state_dict())
    assert [m.num_heads for _, m in attention_modules(rebuilt)] == \
        [m.num_heads for _, m in mods]
    gone_params = gone_macs = 0
    for (_, m), e in zip(mods, record, strict=True):
        n, d = len(e["removed"]), m.head_dim
        dim = out_proj(m).out_features
        # q, k, v rows (weights, biases), out-projection columns (+ Swin's bias columns)
        table = m.relative_position_bias_table.shape[0] if name == "swin_t" else 0
        gone_params += n * (3 * d * dim + 3 * d + d * dim + table)
        if name == "vit_b_16":
            tokens = 197
            gone_macs += n * (tokens * 4 * d * dim + 2 * tokens * tokens * d)
    assert count_params(rebuilt) == count_params(model) == \
        weights.meta["num_params"] - gone_params
    if name == "vit_b_16":  # 3 of 12 heads in each of 12 layers
        assert sum(len(e["removed"]) for e in record) == 36
        assert count_macs(rebuilt, size)["total"] == macs["total"] - gone_macs


# --------------------------------------------------------------------------- errors, plan


@pytest.mark.parametrize("value,needle", [(-0.1, "stages.prune.heads"),
                                          (1.0, "stages.prune.heads"),
                                          ("half", "stages.prune.heads")])
def test_bad_heads_values_are_one_line_errors(value, needle, tiny_config, cli):
    code, out, err = cli("run", tiny_config({"stages": {"prune": {"heads": value}}}),
                         "--dry-run")
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert needle in line


def test_heads_on_a_model_without_attention(tiny_config, cli):
    code, _, err = cli("run", tiny_config({"stages": {"prune": {"heads": 0.5}}}), "--dry-run")
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "stages.prune.heads" in line and "no attention heads" in line


@pytest.mark.parametrize("spec,key", [
    (PruneSpec(heads=1.5), "heads"), (PruneSpec(heads=0.0), "heads"),
    (PruneSpec(method="bn_scale", heads=0.5), "heads"),
    (PruneSpec(heads=0.5, ratio=None, target_macs_reduction=0.3), "heads"),
    (SoftPruneSpec(heads=0.5), "heads")])
def test_bad_head_specs_in_python(spec, key):
    with pytest.raises(PruningError, match=f"^{key}: "):
        checked(spec)


def test_heads_alone_prune_no_filters():
    spec = checked(PruneSpec(heads=0.5))
    assert spec.ratio is None  # no default filter ratio when heads are given
    model = converted(small_vit())
    widths = {n: p.shape for n, p in model.named_parameters() if "mlp" in n}
    prune_model(model, spec, X[:1])
    assert {n: p.shape for n, p in model.named_parameters() if "mlp" in n} == widths


def test_dry_run_plans_heads_with_predicted_macs(tmp_path, cli):
    cfg = deep_update(TINY, {"model": {"arch": "swin_t"}, "out_dir": str(tmp_path / "runs"),
                             "stages": {"prune": {"method": "l1", "heads": 0.5}}})
    del cfg["stages"]["prune"]["ratio"]
    path = tmp_path / "swin.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out, err = cli("run", path, "--dry-run")
    assert code == 0, err
    block = out.split("- prune [prune]")[1].split("\n- ")[0]
    assert "l1 heads 0.5 of every attention module, no filters" in block
    # Swin-T's 3/6/12/24 heads (2, 2, 6, 2 blocks) keep 2/3/6/12
    assert "70 of 138 attention heads kept" in block and "predicted: MACs" in block


# --------------------------------------------------------------------------- with filters


def mlp_fc1s(model: nn.Module) -> dict[str, nn.Linear]:
    """The first Linear of every transformer MLP (ViT `mlp.0`, Swin `mlp.0`)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.endswith("mlp.0")}


@pytest.mark.parametrize("method", ["l1", "fpgm", "group_l2"])
@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_heads_and_mlp_hidden_units_together_equal_zeroing(kind, method):
    """`heads` with `ratio` under block_internal: whole heads and the MLP hidden units
    (Linear-rooted groups) go; the pruned model computes what the dense model computes
    with those heads' out-projection columns and those units' fc1 rows and biases zeroed."""
    model = converted(SMALL[kind]())
    spec = PruneSpec(method=method, heads=0.5, ratio=0.5)
    fc1 = mlp_fc1s(model)
    hidden = {n: m.out_features for n, m in fc1.items()}
    pruned = copy.deepcopy(model)
    report = prune_model(pruned, spec, X[:1])
    # the filter groups are exactly the MLP hidden units, half of each removed
    assert sorted(e["name"] for e in report.layers) == sorted(fc1)
    assert all(e["after"] == e["before"] // 2 for e in report.layers)
    dense = zeroed_heads(model, report.heads, "out_columns")
    mods = dict(dense.named_modules())
    with torch.no_grad():
        for e in report.layers:
            mods[e["name"]].weight[e["removed"]] = 0
            mods[e["name"]].bias[e["removed"]] = 0
    torch.testing.assert_close(pruned(X), dense(X), atol=1e-5, rtol=1e-5)
    assert {n: m.out_features for n, m in mlp_fc1s(pruned).items()} == \
        {n: w // 2 for n, w in hidden.items()}
    sd = pruned.state_dict()
    rebuilt = shrink_to(converted(SMALL[kind]()), sd)
    rebuilt.load_state_dict(sd, strict=True)
    torch.testing.assert_close(rebuilt.eval()(X), pruned(X))


def test_swin_stage_widths_under_policy_all():
    """`all` on Swin prunes each stage's residual width through its patch merging: input
    channel i of a merge is removed from all four of its 2x2-neighbour copies (positions
    i + kC of the merge's LayerNorm and reduction columns)."""
    model = converted(small_swin())
    merge = model.features[2]
    norm_w = merge.norm.weight.detach().clone()
    red_w = merge.reduction.weight.detach().clone()
    report = prune_model(model, PruneSpec(method="l1", ratio=0.5, policy="all", heads=0.5),
                         X[:1])
    (stage1,) = [e for e in report.layers if e["name"] == "features.0.0"]
    c = stage1["before"]
    kept = [i for i in range(c) if i not in stage1["removed"]]
    assert len(kept) == c // 2 == merge.dim
    pos = [k * c + i for k in range(4) for i in kept]
    # stage 2's stream: produced by the merge's reduction and the blocks' fc2 (the group
    # is named by its first Linear root, the merge being one opaque layer to the graph)
    (stage2,) = [e for e in report.layers if e["name"] == "features.3.0.mlp.3"]
    assert stage2["coupled"] and stage2["convs"] == ["features.3.0.mlp.3", "features.3.1.mlp.3"]
    kept_out = [i for i in range(stage2["before"]) if i not in stage2["removed"]]
    assert torch.equal(merge.norm.weight, norm_w[pos])
    assert torch.equal(merge.reduction.weight, red_w[kept_out][:, pos])
    assert model.norm.normalized_shape == (len(kept_out),)
    assert model(X).shape == (2, 10)
    sd = model.state_dict()
    rebuilt = shrink_to(converted(small_swin()), sd)
    rebuilt.load_state_dict(sd, strict=True)
    assert rebuilt.features[2].dim == merge.dim
    torch.testing.assert_close(rebuilt.eval()(X), model(X))


def test_swin_t_stage_one_group_reaches_every_layer_whole():
    """swin_t at 32x32 (an 8x8 map in windows of 7: padded, then cropped): the stage-1
    stream's group passes the same channels to every attention module, norm, MLP and the
    patch merging (the layers are traced as one node each, so the inner crop is not read as
    a channel slice)."""
    from pipeline.pruning.surgery import build_graph, root_handler

    model = build_model({"name": "swin_t", "num_classes": 4}).eval()
    dg = build_graph(model, torch.zeros(1, 3, 32, 32))
    root = model.features[0][0]
    group = dg.get_pruning_group(root, root_handler(dg, root), list(range(24)))
    sizes = {(type(it.dep.target.module).__name__, len(it.idxs)) for it in group
             if not type(it.dep.target.module).__name__.startswith("_")}
    assert sizes == {("Conv2d", 24), ("LayerNorm", 24), ("WindowAttention", 24),
                     ("Linear", 24), ("PatchMerging", 24)}


def test_swin_t_heads_and_widths_through_the_cli(tiny_config, cli, tmp_path):
    """`model.arch: swin_t` from YAML: one pretrain epoch on synthetic 32x32 images, a prune
    stage removing half the heads and a quarter of every width under `all`, a 1-epoch
    finetune of the pruned model; the stages' model.pt files rebuild by load_model."""
    import json

    cfg = tiny_config({
        "data": {"synthetic": {"train_size": 16, "test_size": 8, "image_size": 32}},
        "model": {"arch": "swin_t"},
        "stages": {"pretrain": {"epochs": 1, "lr": 0.001, "schedule": {"type": "constant"}},
                   "prune": {"method": "l1", "heads": 0.5, "ratio": 0.25, "policy": "all"},
                   "finetune": {"epochs": 1, "lr": 0.001}}})
    for stage in ("pretrain", "prune", "finetune"):
        code, _, err = cli("run", cfg, "--stage", stage)
        assert code == 0, err
    s = json.loads((tmp_path / "runs/tiny/prune/summary.json").read_text())
    assert s["status"] == "completed" and (s["heads_before"], s["heads"]) == (138, 70)
    model = load_model(tmp_path / "runs/tiny/finetune/model.pt").eval()
    assert [m.num_heads for _, m in attention_modules(model)] == [2] * 2 + [3] * 2 + [6] * 6 \
        + [12] * 2
    assert model.features[0][0].out_channels == 72  # 96 -> 72
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_weight_rewinding_of_a_head_pruned_swin(tiny_config, cli, tmp_path):
    """rewind `mode: weights` on a transformer: the pretrain snapshot loses the same heads
    (its `heads` record) and the same filters, then trains; the result rebuilds."""
    cfg = tiny_config({
        "data": {"synthetic": {"train_size": 16, "test_size": 8, "image_size": 32}},
        "model": {"arch": "swin_t"},
        "stages": {"pretrain": {"epochs": 2, "lr": 0.001, "schedule": {"type": "constant"}},
                   "prune": {"method": "l1", "heads": 0.5, "ratio": 0.25},
                   "finetune": {"type": "rewind", "from": "prune", "mode": "weights",
                                "rewind_epoch": 1, "batch_size": 32}}})
    code, _, err = cli("run", cfg)
    assert code == 0, err
    model = load_model(tmp_path / "runs/tiny/finetune/model.pt").eval()
    assert [m.num_heads for _, m in attention_modules(model)] == [2] * 2 + [3] * 2 + [6] * 6 \
        + [12] * 2
    assert model.features[1][0].mlp[0].out_features == 288  # 384 -> 288
