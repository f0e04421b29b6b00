"""The sensitivity stage: the sweep's files, the suggestion against hand-computed cases,
resume per group, and a prune stage reading `layer_ratios_from`."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
import yaml

from stages.sensitivity import FIELDS, allowed_ratio, suggest

pytestmark = pytest.mark.usefixtures("one_thread")

DENSE = 1000


def rows(table: dict[str, list[tuple[float, float, int]]]) -> list[dict]:
    """group -> [(ratio, top1, macs after)] as sweep rows."""
    return [{"group": g, "ratio": r, "top1": t, "macs": m} for g, c in table.items()
            for r, t, m in c]


# two groups; base top-1 90. a: cheap to prune, saves 100/200 MACs; b: sensitive, saves
# 50/100 MACs
TABLE = {"a": [(0.25, 89.5, 900), (0.5, 88.0, 800)],
         "b": [(0.25, 87.0, 950), (0.5, 80.0, 900)]}


def test_allowed_ratio_stops_at_the_first_ratio_over_the_tolerance():
    curve = [(0.1, 89.9), (0.2, 85.0), (0.3, 89.5)]  # a dip at 0.2 stops the climb
    assert allowed_ratio(curve, 90.0, 1.0) == 0.1
    assert allowed_ratio(curve, 90.0, 0.05) is None
    assert allowed_ratio(curve, 90.0, 5.0) == 0.3


def test_suggestion_by_tolerance():
    s = suggest(rows(TABLE), 90.0, DENSE, tolerance=1.0)
    assert s["layer_ratios"] == {"a": 0.25} and s["skip"] == ["b"]
    assert s["predicted_mac_reduction"] == pytest.approx(100 / DENSE)
    s = suggest(rows(TABLE), 90.0, DENSE, tolerance=3.0)
    assert s["layer_ratios"] == {"a": 0.5, "b": 0.25}
    assert s["predicted_mac_reduction"] == pytest.approx((200 + 50) / DENSE)


def test_suggestion_by_mac_target_is_the_least_sensitive_allocation():
    # 15%: a at 0.5 (drop 2) saves 200 >= 150; b untouched
    s = suggest(rows(TABLE), 90.0, DENSE, 1.0, target_macs_reduction=0.15)
    assert s["layer_ratios"] == {"a": 0.5} and s["skip"] == ["b"]
    assert (s["tolerance"], s["reached"]) == (2.0, True)
    # 25%: needs b at 0.25 too (drop 3): 200 + 50
    s = suggest(rows(TABLE), 90.0, DENSE, 1.0, target_macs_reduction=0.25)
    assert s["layer_ratios"] == {"a": 0.5, "b": 0.25} and s["tolerance"] == 3.0
    # 40%: out of reach (at most 300): everything at its largest ratio, not reached
    s = suggest(rows(TABLE), 90.0, DENSE, 1.0, target_macs_reduction=0.4)
    assert s["layer_ratios"] == {"a": 0.5, "b": 0.5} and s["reached"] is False


SWEEP = {"data": {"val_split": 32},
         "stages": {"sens": {"type": "sensitivity", "from": "pretrain", "ratios": [0.25, 0.5],
                             "tolerance": 100.0},
                    "pruned": {"type": "prune", "from": "pretrain",
                               "layer_ratios_from": "sens"}}}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_sweep_files_and_prune_from_the_suggestion(tmp_path, tiny_config, cli):
    cfg = tiny_config(SWEEP)
    code, out, err = cli("run", cfg, "--dry-run")
    assert code == 0, err
    assert "each group alone at ratios 0.25, 0.5" in out and "evaluated on val" in out
    for name in ("pretrain", "sens", "pruned"):
        code, _, err = cli("run", cfg, "--stage", name)
        assert code == 0, err
    d = tmp_path / "runs/tiny/sens"
    table = read_csv(d / "sensitivity.csv")
    assert list(table[0]) == FIELDS
    groups = sorted({r["group"] for r in table})
    # resnet8, block_internal: the three blocks' conv1, numbered 2, 4, 6
    assert groups == ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"]
    assert sorted({int(r["layer_number"]) for r in table}) == [2, 4, 6]
    assert len(table) == 3 * 2
    r = next(r for r in table if r["group"] == "layer2.0.conv1" and float(r["ratio"]) == 0.5)
    assert (int(r["width_before"]), int(r["width_after"])) == (32, 16)
    assert (d / "sensitivity.png").stat().st_size > 1000
    sug = yaml.safe_load((d / "suggested.yaml").read_text())
    assert sug["layer_ratios"] == {g: 0.5 for g in groups}  # tolerance 100: all at max
    summary = json.loads((d / "summary.json").read_text())
    assert summary["split"] == "val" and summary["split_images"] == 32
    layers = json.loads((tmp_path / "runs/tiny/pruned/layers.json").read_text())
    assert {x["name"]: x["after"] for x in layers} == {
        "layer1.0.conv1": 8, "layer2.0.conv1": 16, "layer3.0.conv1": 32}


def test_sweep_resumes_per_group(tmp_path, tiny_config, cli):
    cfg = tiny_config(SWEEP)
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    d = tmp_path / "runs/tiny/sens"
    d.mkdir(parents=True)
    # a group swept before an interruption, with marker values a re-run would not give
    done = [{"group": "layer1.0.conv1", "layer_number": 2, "convs": "layer1.0.conv1",
             "ratio": r, "width_before": 16, "width_after": 16 - int(16 * r), "macs": 1,
             "top1": 12.345, "top5": 50.0, "loss": 9.0} for r in (0.25, 0.5)]
    with open(d / "sensitivity.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(done + [{**done[0], "group": "layer2.0.conv1", "ratio": 0.25}])  # partial
    code, _, err = cli("run", cfg, "--stage", "sens")
    assert code == 0, err
    table = read_csv(d / "sensitivity.csv")
    kept = [r for r in table if r["group"] == "layer1.0.conv1"]
    assert [float(r["top1"]) for r in kept] == [12.345, 12.345]  # not re-evaluated
    redone = [r for r in table if r["group"] == "layer2.0.conv1"]
    assert len(redone) == 2 and all(float(r["top1"]) != 12.345 for r in redone)


def test_layer_ratios_from_must_name_a_sensitivity_stage(tiny_config, cli):
    bad = {"stages": {"prune": {"layer_ratios_from": "pretrain"}}}
    code, _, err = cli("run", tiny_config(bad), "--dry-run")
    assert code == 2 and "expected a sensitivity stage" in err
    code, _, err = cli("run", tiny_config(bad), "--dry-run")
    assert code == 2 and "expected a sensitivity stage" in err
    bad = {**SWEEP, "stages": {**SWEEP["stages"], "pruned": {
        **SWEEP["stages"]["pruned"], "policy": "all"}}}
    code, _, err = cli("run", tiny_config(bad), "--dry-run")
    assert code == 2 and "policy 'all' differs" in err


# --------------------------------------------------------------------------- replay


def batches(n: int = 3, size: int = 8, classes: int = 4, side: int = 16):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, side, side, generator=g),
             torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def test_replay_gives_the_plain_evaluation_for_every_block_internal_group():
    from pipeline.models import build_model
    from pipeline.pruning import PruneSpec, build_graph, candidate_groups, prune_model
    from pipeline.replay import PrefixReplay, changed_modules, enclosing
    from pipeline.trainer import evaluate

    dense = build_model({"name": "resnet8", "num_classes": 4, "shortcut": "A"}).eval()
    # BN statistics that are not the identity, so that a wrong replay shows
    for m in dense.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    data, example, cpu = batches(), torch.zeros(1, 3, 16, 16), torch.device("cpu")
    replay = PrefixReplay(dense, data, cpu, "fp32", 1e9)
    groups = candidate_groups(dense, build_graph(dense, example), PruneSpec(ratio=0.5))
    assert len(groups) == 3
    for g in groups:
        for ratio in (0.25, 0.75):
            pruned = copy.deepcopy(dense)
            prune_model(pruned, PruneSpec(ratio=ratio, include=[g.name]), example)
            block = g.name.rsplit(".", 1)[0]  # layer2.0.conv1 -> layer2.0
            assert enclosing(changed_modules(dense, pruned))[0] == block
            got = replay.evaluate(pruned)
            assert got is not None and replay.name == block
            plain = evaluate(pruned, data, cpu, "fp32")
            assert got["top1"] == plain["top1"] and got["images"] == plain["images"] == 24
            assert got["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
    assert replay.batches[0][0].shape[2:] == (1, 1)  # the layers before ran on 1x1 images


class SkipAround(torch.nn.Module):
    """A stem whose output also reaches the head around the block: no replay is valid."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1),
                                         torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1))
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        s = self.stem(x)
        return self.head((self.block(s) + s).mean((2, 3)))


def test_replay_refuses_a_block_bypassed_by_the_prefix_and_a_memory_budget():
    from pipeline.replay import PrefixReplay

    dense = SkipAround().eval()
    pruned = copy.deepcopy(dense)
    keep = torch.arange(4)
    pruned.block[0] = torch.nn.Conv2d(8, 4, 3, padding=1)
    pruned.block[0].weight.data = dense.block[0].weight.data[keep].clone()
    pruned.block[0].bias.data = dense.block[0].bias.data[keep].clone()
    pruned.block[2] = torch.nn.Conv2d(4, 8, 3, padding=1)
    pruned.block[2].weight.data = dense.block[2].weight.data[:, keep].clone()
    pruned.block[2].bias.data = dense.block[2].bias.data.clone()
    replay = PrefixReplay(dense, batches(), torch.device("cpu"), "fp32", 1e9)
    assert replay.evaluate(pruned) is None and "block" in replay.refused
    # a block whose inputs would exceed the budget is not recorded
    dense8 = SkipAround()
    small = PrefixReplay(dense8, batches(), torch.device("cpu"), "fp32", 100)
    assert small._record("block") is False and small.inputs == []


def test_sweep_with_and_without_replay_writes_the_same_table(tmp_path, tiny_config, cli):
    cfg = tiny_config(SWEEP)
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    assert cli("run", cfg, "--stage", "sens")[0] == 0
    d = tmp_path / "runs/tiny/sens"
    with_replay = read_csv(d / "sensitivity.csv")
    assert json.loads((d / "summary.json").read_text())["replayed"] == 6
    code, _, err = cli("run", cfg, "--stage", "sens", "--restart",
                       "--set", "stages.sens.replay_memory_gb=0")
    assert code == 0, err
    assert json.loads((d / "summary.json").read_text())["replayed"] == 0
    without = read_csv(d / "sensitivity.csv")
    assert [r["top1"] for r in without] == [r["top1"] for r in with_replay]
    assert [float(r["loss"]) for r in without] == pytest.approx(
        [float(r["loss"]) for r in with_replay], rel=1e-5)


def test_sensitivity_speed_benchmark_says_when_there_is_no_data(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sensitivity_speed.py"
    spec = importlib.util.spec_from_file_location("sensitivity_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--data", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "target sensitivity_resnet56_sweep: not measured (no data)"
    cfg = mod.config("D", 5000, mod.RATIOS, "auto", "w.pt", [])
    assert cfg["data"]["val_split"] == 5000 and cfg["model"]["arch"] == "resnet56"
    assert cfg["stages"]["sens"]["ratios"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
