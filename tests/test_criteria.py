"""The taylor, bn_scale and group_l2 criteria against independent numpy computations of
their papers' formulas on fixed weights and gradients; the trainer's L1 sparsity penalty
on BN scales (network slimming) and its resume."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from test_trainer import make_trainer

from pipeline.config import ConfigError
from pipeline.models import build_model
from pipeline.pruning import PruneSpec, PruningError, candidate_groups, prune_model
from pipeline.pruning.criteria import CRITERIA
from pipeline.pruning.prune import gradient_refresher, select_filters
from pipeline.pruning.soft import SoftPruneSpec
from pipeline.pruning.spec import checked
from pipeline.pruning.surgery import build_graph, root_handler
from pipeline.recipes import OptimizerConfig, SparsityConfig
from pipeline.trainer import CallbackHook

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = torch.zeros(1, 3, 8, 8)


class Chain(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            for bn in (self.bn1, self.bn2):
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def batches(n: int = 3, size: int = 8, classes: int = 4, hw: int = 8):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(size, 3, hw, hw, generator=g),
             torch.randint(classes, (size,), generator=g)) for _ in range(n)]


def groups_of(model, spec):
    spec = checked(spec)
    return candidate_groups(model, build_graph(model, EXAMPLE), spec)


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def reference_grads(model: nn.Module, data) -> list[dict[str, np.ndarray]]:
    """Per batch: every parameter's gradient of the cross-entropy, eval mode."""
    out = []
    model.eval()
    for x, y in data:
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y),
                                    list(params.values()), allow_unused=True)
        out.append({k: (np.zeros(p.shape) if g is None else np_(g))
                    for (k, p), g in zip(params.items(), grads, strict=True)})
    model.train()
    return out


def taylor_reference(model, grads, conv: str, bn: str | None) -> np.ndarray:
    """Molchanov et al. 2019: mean over batches of (sum of g*w over the filter's
    parameters and its BN's gamma and beta)^2."""
    p = {k: np_(v) for k, v in model.named_parameters()}
    per_batch = []
    for g in grads:
        w = p[f"{conv}.weight"]
        s = (g[f"{conv}.weight"] * w).reshape(w.shape[0], -1).sum(1)
        if f"{conv}.bias" in p:
            s = s + g[f"{conv}.bias"] * p[f"{conv}.bias"]
        if bn is not None:
            s = s + g[f"{bn}.weight"] * p[f"{bn}.weight"] + g[f"{bn}.bias"] * p[f"{bn}.bias"]
        per_batch.append(s * s)
    return np.mean(per_batch, axis=0)


# --------------------------------------------------------------------------- taylor


def test_taylor_matches_the_papers_formula_and_applies_no_update():
    model, data = Chain(), batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = PruneSpec(method="taylor", ratio=0.4, batches=2, policy="all")
    groups = groups_of(model, spec)
    gradient_refresher(model, checked(spec), groups, lambda: iter(data))()
    # no update: weights and BN statistics unchanged, no gradients left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    grads = reference_grads(model, data[:2])  # spec.batches = 2 of the 3
    by_name = {g.name: g for g in groups}
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        want = taylor_reference(model, grads, conv, bn)
        np.testing.assert_allclose(CRITERIA["taylor"](by_name[conv]), want, rtol=1e-5,
                                   atol=1e-12)
    # and the pruning removes the lowest of them
    want = taylor_reference(model, grads, "conv1", "bn1")
    record = select_filters(model, PruneSpec(method="taylor", ratio=0.5, batches=2,
                                             include=["conv1"]), EXAMPLE,
                            batches=lambda: iter(data))
    assert record[0]["removed"] == sorted(np.argsort(want)[:3].tolist())


def test_taylor_sums_the_filters_of_a_coupled_group():
    """Residual-coupled convs: the group's importance is the sum of its filters'."""
    model = build_model({"name": "resnet8", "num_classes": 4, "shortcut": "B"})
    model.eval()
    with torch.no_grad():  # non-trivial BN parameters
        g = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    data = batches(2, hw=8)
    spec = PruneSpec(method="taylor", ratio=0.4, batches=2, policy="all")
    groups = groups_of(model, spec)
    gradient_refresher(model, checked(spec), groups, lambda: iter(data))()
    coupled = [g for g in groups if len(g.convs) > 1]
    assert coupled
    grads = reference_grads(model, data)
    names = {m: n for n, m in model.named_modules()}
    for grp in coupled:
        want = 0
        for conv in grp.convs:
            bn = names[grp.graph.module2node[dict(model.named_modules())[conv]].outputs[0].module]
            assert isinstance(dict(model.named_modules())[bn], nn.BatchNorm2d)
            want = want + taylor_reference(model, grads, conv, bn)
        np.testing.assert_allclose(CRITERIA["taylor"](grp), want, rtol=1e-5, atol=1e-14)


def test_taylor_needs_batches_and_is_refused_for_soft_pruning():
    with pytest.raises(PruningError, match="needs training batches"):
        prune_model(Chain(), PruneSpec(method="taylor", ratio=0.4), EXAMPLE)
    with pytest.raises(PruningError, match="prune stage"):
        checked(SoftPruneSpec(method="taylor", ratio=0.4))


def test_taylor_with_the_mac_target_search_rescores_every_step():
    model, data = build_model({"name": "resnet8", "num_classes": 4}), batches(2, hw=8)
    calls = []

    def source():
        calls.append(1)
        return iter(data)

    report = prune_model(model, PruneSpec(method="taylor", target_macs_reduction=0.2,
                                          target_step=0.1), EXAMPLE, batches=source)
    assert report.steps >= 2 and len(calls) == report.steps


# --------------------------------------------------------------------------- bn_scale


def vgg_with_gammas():
    model = build_model({"name": "vgg11", "num_classes": 4})
    g = torch.Generator().manual_seed(5)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for i, bn in enumerate(bns):  # layers on very different scales
            bn.weight.copy_((torch.rand(bn.num_features, generator=g) - 0.3) * (i + 1) / 4)
    return model, bns


def test_bn_scale_is_the_abs_gamma_and_global_ranking_is_one_threshold():
    model, bns = vgg_with_gammas()
    ex = torch.zeros(1, 3, 32, 32)
    spec = checked(PruneSpec(method="bn_scale", ratio=0.5))
    groups = candidate_groups(model, build_graph(model, ex), spec)
    for grp, bn in zip(groups, bns, strict=True):
        np.testing.assert_array_equal(CRITERIA["bn_scale"](grp), np.abs(np_(bn.weight)))
    # the paper's global threshold: the 30% lowest |gamma| of the whole net go
    gammas = np.concatenate([np.abs(np_(bn.weight)) for bn in bns])
    n = int(0.3 * gammas.size)
    threshold = np.sort(gammas)[n - 1]
    widths = [bn.num_features for bn in bns]
    expect = [int((np.abs(np_(bn.weight)) > threshold).sum()) for bn in bns]
    assert min(expect) >= 1 and sum(widths) - sum(expect) == n
    record = select_filters(model, PruneSpec(method="bn_scale", ratio=0.3,
                                             global_ranking=True), ex)
    removed = {e["name"]: e["removed"] for e in record}
    for name, bn in zip([g.name for g in groups], bns, strict=True):
        gone = np.flatnonzero(np.abs(np_(bn.weight)) <= threshold).tolist()
        assert removed.get(name, []) == gone, name
    # (with per-group mean normalization the layers' shares would differ)
    shares = {round(len(removed.get(g.name, [])) / w, 2)
              for g, w in zip(groups, widths, strict=True)}
    assert len(shares) > 2


def test_bn_scale_needs_a_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(),
                          nn.LazyLinear(4))
    model(EXAMPLE)
    with pytest.raises(PruningError, match="no BatchNorm"):
        prune_model(model, PruneSpec(method="bn_scale", ratio=0.4), EXAMPLE)


# --------------------------------------------------------------------------- group_l2


def test_group_l2_sums_every_coupled_slice():
    """DepGraph's group norm: producer rows, its BN's gamma, the consumer's input slice."""
    model = Chain()
    groups = {g.name: g for g in groups_of(model, PruneSpec(method="group_l2", policy="all"))}
    p = {k: np_(v) for k, v in model.named_parameters()}
    want1 = ((p["conv1.weight"] ** 2).sum((1, 2, 3)) + p["bn1.weight"] ** 2
             + (p["conv2.weight"] ** 2).sum((0, 2, 3)))
    want2 = ((p["conv2.weight"] ** 2).sum((1, 2, 3)) + p["bn2.weight"] ** 2
             + (p["fc.weight"] ** 2).sum(0))
    np.testing.assert_allclose(CRITERIA["group_l2"](groups["conv1"]), want1, rtol=1e-12)
    np.testing.assert_allclose(CRITERIA["group_l2"](groups["conv2"]), want2, rtol=1e-12)
    record = select_filters(model, PruneSpec(method="group_l2", ratio=0.5, policy="all"),
                            EXAMPLE)
    assert record[0]["removed"] == sorted(np.argsort(want1)[:3].tolist())
    assert record[1]["removed"] == sorted(np.argsort(want2)[:2].tolist())


def test_group_l2_on_a_residual_stream_counts_each_coupled_layer():
    """On a residual stream the group holds every producer, BN and consumer of the
    stream: its score is their squared-weight sums (checked by removing each channel
    and counting what vanished from the parameters)."""
    model = build_model({"name": "resnet8", "num_classes": 4, "shortcut": "B"})
    spec = PruneSpec(method="group_l2", policy="all")
    grp = next(g for g in groups_of(model, spec) if g.coupled)
    scores = CRITERIA["group_l2"](grp)
    total = sum(float((np_(p) ** 2).sum()) for n, p in model.named_parameters()
                if not n.endswith("bias"))
    for c in (0, 3):
        m = build_model({"name": "resnet8", "num_classes": 4, "shortcut": "B"})
        m.load_state_dict(model.state_dict())
        dg = build_graph(m, EXAMPLE)
        root = dict(m.named_modules())[grp.name]
        dg.get_pruning_group(root, root_handler(dg, root), [c]).prune()
        left = sum(float((np_(p) ** 2).sum()) for n, p in m.named_parameters()
                   if not n.endswith("bias"))
        assert scores[c] == pytest.approx(total - left, rel=1e-9)


# --------------------------------------------------------------------------- sparsity


def bn_gammas(model) -> torch.Tensor:
    return torch.cat([m.weight.detach().clone() for m in model.modules()
                      if isinstance(m, nn.BatchNorm2d)])


def test_l1_bn_adds_lambda_sign_gamma_to_the_bn_gradients(tmp_path):
    """Plain SGD, one step: the penalized run's gammas differ from the plain run's by
    exactly -lr * lambda * sign(gamma); the other parameters are the same."""
    sgd = {"momentum": 0.0, "weight_decay": 0.0}
    lam = 0.01
    runs = {}
    for name, sparsity in (("plain", None), ("sparse", SparsityConfig(l1_bn=lam))):
        tr = make_trainer(tmp_path / name, steps=1, optimizer=OptimizerConfig(**sgd),
                          sparsity=sparsity)
        g0 = bn_gammas(tr.module)
        tr.fit()
        runs[name] = (g0, tr.module, tr.schedule.lr(0))
    g0, plain, lr = runs["plain"]
    sparse = runs["sparse"][1]
    delta = bn_gammas(sparse) - bn_gammas(plain)
    torch.testing.assert_close(delta, -lr * lam * torch.sign(g0), atol=1e-7, rtol=0)
    for (k, a), b in zip(plain.named_parameters(), sparse.parameters(), strict=True):
        if a.dim() > 1:
            torch.testing.assert_close(a, b, msg=k)
    rows = list(csv.DictReader(open(tmp_path / "sparse" / "metrics.csv")))
    assert float(rows[-1]["bn_l1"]) == pytest.approx(
        float(bn_gammas(sparse).abs().mean()), rel=1e-5)
    assert "bn_l1" not in open(tmp_path / "plain" / "metrics.csv").readline()


class Stop(Exception):
    pass


def test_l1_bn_training_resumes_exactly(tmp_path):
    """Stopped after step 3 (checkpoint at step 2), resumed: the same weights as an
    uninterrupted run."""
    over = dict(steps=3, epochs=2, sparsity=SparsityConfig(l1_bn=1e-3),
                checkpoint_every_steps=2)
    whole = make_trainer(tmp_path / "whole", **over)
    whole.fit()

    def stop(tr):
        if tr.global_step == 3:
            raise Stop

    with pytest.raises(Stop):
        make_trainer(tmp_path / "cut", hooks=[CallbackHook(after_step=stop)], **over).fit()
    again = make_trainer(tmp_path / "cut", **over)
    again.fit()
    assert again.global_step == whole.global_step == 6
    for (k, a), b in zip(whole.module.state_dict().items(),
                         again.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    rows = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(r["bn_l1"] for r in rows)


def test_l1_bn_needs_a_batchnorm(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(4))
    model(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match="no BatchNorm"):
        make_trainer(tmp_path, model=model, sparsity=SparsityConfig(l1_bn=1e-4))


# --------------------------------------------------------------------------- from YAML


@pytest.fixture
def pipeline_logger():
    """Restore the "pipeline" logger after an in-process run configured it (later tests
    count its records)."""
    log = logging.getLogger("pipeline")
    saved = (log.level, list(log.handlers), log.propagate)
    levels = {n: logging.getLogger(n).level for n in ("pipeline.data", "pipeline.pruning")}
    yield
    for h in log.handlers:
        if h not in saved[1]:
            h.close()
    log.setLevel(saved[0])
    log.handlers[:] = saved[1]
    log.propagate = saved[2]
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.usefixtures("pipeline_logger")
def test_slimming_and_taylor_from_yaml(tiny_config, cli, tmp_path):
    """Sparsity training, then bn_scale with one global threshold and taylor on the
    run's training batches, each a prune stage of the same pretrained model."""
    cfg = tiny_config({"stages": {
        "pretrain": {"epochs": 1, "sparsity": {"l1_bn": 1e-4}},
        "prune": {"method": "bn_scale", "ratio": 0.5, "global_ranking": True,
                  "policy": "all"},
        "prune_taylor": {"type": "prune", "from": "pretrain", "method": "taylor",
                         "ratio": 0.4, "batches": 2, "batch_size": 16},
        "prune_group": {"type": "prune", "from": "pretrain", "method": "group_l2",
                        "ratio": 0.4, "policy": "all"},
        "finetune": {"from": "prune"}}})
    code, out, err = cli("run", cfg, "--dry-run")
    assert code == 0, err
    assert "L1 sparsity 0.0001 on BN scales" in out and "one global ranking" in out
    assert "gradients of 2 training batches of 16" in out
    code, _, err = cli("run", cfg)
    assert code == 0, err
    runs = tmp_path / "runs/tiny"
    rows = list(csv.DictReader(open(runs / "pretrain/metrics.csv")))
    assert float(rows[-1]["bn_l1"]) > 0
    for name, method in (("prune", "bn_scale"), ("prune_taylor", "taylor"),
                         ("prune_group", "group_l2")):
        s = json.loads((runs / name / "summary.json").read_text())
        assert s["method"] == method and s["mac_reduction"] > 0.1, name
    # the one global threshold: half of all candidate channels, by raw |gamma|
    layers = json.loads((runs / "prune/layers.json").read_text())
    dense = build_model({"name": "resnet8", "num_classes": 4, "shortcut": "A"})
    dense.load_state_dict(torch.load(runs / "pretrain/model.pt", weights_only=True)[
        "state_dict"])
    spec = checked(PruneSpec(method="bn_scale", ratio=0.5, policy="all"))
    groups = candidate_groups(dense, build_graph(dense, torch.zeros(1, 3, 16, 16)), spec)
    scores = np.concatenate([CRITERIA["bn_scale"](g) for g in groups])
    n = int(0.5 * scores.size)
    assert sum(e["before"] - e["after"] for e in layers) == n
    removed = np.concatenate([CRITERIA["bn_scale"](g)[
        next((e["removed"] for e in layers if e["name"] == g.name), [])] for g in groups])
    assert removed.max() <= np.sort(scores)[n - 1] + 1e-12


def test_the_criteria_an_error_message_offers_come_from_the_registry(monkeypatch):
    from pipeline.pruning.criteria import L1

    class Norm3(L1):
        name = "norm3"

    monkeypatch.setitem(CRITERIA, "norm3", Norm3())
    with pytest.raises(PruningError) as err:
        checked(PruneSpec(method="bn_scale", heads=0.5))
    offered = str(err.value).split("use ", 1)[1]
    assert "norm3" in offered and "bn_scale" not in offered
    assert all(n in offered for n, c in CRITERIA.items() if c.scores_heads)
