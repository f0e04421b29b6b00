"""`compare`: tables equal to the runs' summaries, plots that are images, honest gaps."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from pipeline import report
from pipeline.checkpoint import save_model
from pipeline.models import build_model, count_macs
from pipeline.report import latency, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def summary(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


def check_png(path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300
    assert img.std() > 0.01  # something is drawn


def test_compare_plot_on_two_smoke_runs(tiny_config, cli, tmp_path):
    # b: two pretrain epochs, only the last one evaluated (the curves skip the gap)
    for name, prune, pre in (("a", {}, {"epochs": 1}),
                             ("b", {"method": "l1", "ratio": 0.5}, {"epochs": 2, "eval_every": 2})):
        over = {"name": name, "stages": {"pretrain": {**pre, "schedule": {"milestones": []}},
                                         "prune": prune}}
        code, _, err = cli("run", tiny_config(over, name=f"{name}.yaml"))
        assert code == 0, err
    runs = tmp_path / "runs"
    out_dir = tmp_path / "report"
    code, out, err = cli("compare", str(runs / "*"), "--plot", "--out", out_dir,
                         "--format", "json", "--latency", "--latency-batch", "4")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["run"], r["stage"]) for r in rows] == [
        (run, stage) for run in "ab" for stage in ("pretrain", "prune", "finetune")]

    # the files: tables and PNGs (valid images)
    for name in ("compare.md", "compare.csv", "compare.json", "accuracy_vs_macs.png",
                 "curves_a.png", "curves_b.png"):
        assert (out_dir / name).is_file(), name
    for name in ("accuracy_vs_macs.png", "curves_a.png", "curves_b.png"):
        check_png(out_dir / name)
    md = (out_dir / "compare.md").read_text()
    assert "![accuracy_vs_macs](accuracy_vs_macs.png)" in md
    assert "latency (ms, cpu, batch 4)" in md
    assert "in channels_last memory format" in md  # the default: NHWC, the fast conv path

    # the numbers are the summaries' (JSON, CSV and markdown)
    table = list(csv.DictReader(io.StringIO((out_dir / "compare.csv").read_text())))
    for r, c in zip(rows, table, strict=True):
        run_dir = runs / r["run"]
        s, base = summary(run_dir, r["stage"]), summary(run_dir, "pretrain")
        assert r["status"] == c["status"] == "completed"
        assert r["model"] == "resnet8"
        for key in ("top1", "top5"):
            assert r[key] == s[key] and float(c[key]) == s[key]
        assert r["params_m"] == pytest.approx(s["params"] / 1e6)
        assert float(c["macs_m"]) == pytest.approx(s["macs"] / 1e6)
        assert r["delta_top1"] == pytest.approx(s["top1"] - base["top1"])
        assert float(c["mac_reduction_pct"]) == pytest.approx(100 * (1 - s["macs"] / base["macs"]))
        assert r["size_mb"] == pytest.approx((run_dir / r["stage"] / "model.pt").stat().st_size
                                             / 1e6)
        assert r["latency_ms"] > 0 and r["latency_batch"] == 4 and r["latency_device"] == "cpu"
        assert r["latency_memory_format"] == "channels_last"
        line = next(x for x in md.splitlines() if x.startswith(f"| {r['run']} | {r['stage']} |"))
        assert f"| {s['top1']:.2f} |" in line and f"| {s['top5']:.2f} |" in line
    by = {(r["run"], r["stage"]): r for r in rows}
    assert by["a", "pretrain"]["speedup"] == pytest.approx(1.0)
    assert by["a", "pretrain"]["method"] == "-"
    assert (by["a", "finetune"]["method"], by["a", "finetune"]["ratio"]) == ("fpgm", 0.4)
    assert (by["b", "prune"]["method"], by["b", "prune"]["ratio"]) == ("l1", 0.5)
    assert by["b", "prune"]["mac_reduction_pct"] > by["a", "prune"]["mac_reduction_pct"] > 0

    # one run: the report goes to <run dir>/report by default
    code, out, _ = cli("compare", runs / "a", "--format", "csv")
    assert code == 0 and out.startswith("run,stage,type,status,model,method,ratio,top1")
    assert (runs / "a" / "report" / "compare.csv").read_text() == out


def fake_run(root, name, stages: dict, summaries: dict, provenance: dict | None = None):
    """A run directory written by hand: config.yaml and the given summaries."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    cfg = {"name": name, "model": {"arch": "resnet20"},
           "data": {"dataset": "synthetic", "synthetic": {"image_size": 16}}, "stages": stages}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for stage, s in summaries.items():
        (run_dir / stage).mkdir()
        (run_dir / stage / "summary.json").write_text(json.dumps(s))
    if provenance is not None:
        (run_dir / "provenance.json").write_text(json.dumps(provenance))
    return run_dir


STAGES = {"pretrain": {"type": "pretrain", "from": None, "epochs": 10},
          "prune": {"type": "prune", "from": "pretrain", "method": "fpgm", "ratio": 0.4},
          "finetune": {"type": "finetune", "from": "prune", "epochs": 4},
          "scratch": {"type": "scratch", "from": "prune", "epochs": 10}}
PRETRAIN = {"stage": "pretrain", "type": "pretrain", "status": "completed", "top1": 91.25,
            "top5": 99.5, "params": 270000, "macs": 41000000, "epochs": 10}


def test_incomplete_stages_show_their_state_not_zeros(tmp_path, cli):
    run_dir = fake_run(tmp_path, "r", STAGES, {
        "pretrain": PRETRAIN,
        "prune": {"stage": "prune", "type": "prune", "status": "failed",
                  "error": "PruningError: nothing to prune"}})
    (run_dir / "finetune").mkdir()
    (run_dir / "finetune" / "metrics.csv").write_text(
        "epoch,lr,train_loss,train_acc,test_loss,top1,top5,seconds\n0,0.01,1,50,1,50,90,3\n")
    code, out, _ = cli("compare", run_dir, "--format", "json", "--out", tmp_path / "rep")
    assert code == 0
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["pretrain"]["status"] == "completed"
    assert rows["prune"]["status"] == "failed"
    assert rows["prune"]["note"] == "PruningError: nothing to prune"
    assert rows["finetune"]["status"] == "running"
    assert rows["finetune"]["note"] == "1 of 4 epochs done"
    assert rows["scratch"]["status"] == "not run"
    for stage in ("prune", "finetune", "scratch"):
        for key in ("top1", "top5", "params_m", "macs_m", "delta_top1", "mac_reduction_pct"):
            assert rows[stage].get(key) is None, (stage, key)
    code, out, _ = cli("compare", run_dir, "--out", tmp_path / "rep")
    lines = {line.split(" | ")[1]: line for line in out.splitlines() if line.startswith("| r |")}
    for stage in ("prune", "finetune", "scratch"):
        cells = lines[stage].split(" | ")
        top1 = cells[7]  # run, stage, type, status, model, method, ratio, top-1
        assert top1 == "-" and "0.00" not in lines[stage]
    assert "| 91.25 |" in lines["pretrain"]
    table = list(csv.DictReader(io.StringIO((tmp_path / "rep" / "compare.csv").read_text())))
    assert [r["top1"] for r in table] == ["91.25", "", "", ""]


def test_baseline_given_another_way(tmp_path, cli):
    dense = fake_run(tmp_path, "dense", {"pretrain": STAGES["pretrain"]},
                     {"pretrain": PRETRAIN})
    # a run whose pruning starts from a dense model trained elsewhere: no pretrain stage
    pruned = fake_run(tmp_path, "pruned",
                      {"prune": {"type": "prune", "method": "l1", "ratio": 0.5},
                       "finetune": {"type": "finetune", "from": "prune"}},
                      {"prune": {"stage": "prune", "type": "prune", "status": "completed",
                                 "top1": 40.0, "macs": 20500000, "macs_before": 41000000,
                                 "method": "l1", "ratio": 0.5},
                       "finetune": {"stage": "finetune", "type": "finetune",
                                    "status": "completed", "top1": 90.0, "macs": 20500000}})
    code, out, _ = cli("compare", pruned, "--format", "json", "--out", tmp_path / "o")
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["finetune"]["delta_top1"] is None  # no dense stage: no accuracy change...
    assert rows["finetune"]["mac_reduction_pct"] == pytest.approx(50.0)  # ...but MACs known
    code, out, err = cli("compare", pruned, "--baseline", dense / "pretrain", "--format",
                         "json", "--out", tmp_path / "o")
    assert code == 0, err
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["finetune"]["delta_top1"] == pytest.approx(90.0 - 91.25)
    assert rows["finetune"]["baseline"] == "dense/pretrain"
    code, _, err = cli("compare", pruned, "--baseline", tmp_path / "nowhere")
    assert code == 2 and err.startswith("error: --baseline")


def test_provenance_table(tmp_path, cli):
    prov = {"git_commit": "0123456789abcdef" * 2 + "01234567", "git_dirty": False,
            "python": "3.11.7", "torch": "2.4.0", "torchvision": "0.19.0",
            "torch_pruning": "1.5.1", "device": "cuda:0", "world_size": 8, "seed": 3,
            "config_hash": "aaaabbbbccccdddd", "command": "python -m pipeline run c.yaml"}
    run_dir = fake_run(tmp_path, "p", {"pretrain": STAGES["pretrain"]}, {"pretrain": PRETRAIN},
                       prov)
    code, out, _ = cli("compare", run_dir, "--provenance", "--out", tmp_path / "o")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("| p | 0123456789 |"))
    for text in ("| no |", "| 2.4.0 |", "| 1.5.1 |", "| cuda:0 |", "| 8 |", "| 3 |",
                 "| aaaabbbbccccdddd |", "`python -m pipeline run c.yaml`"):
        assert text in line
    assert "## Provenance" in (tmp_path / "o" / "compare.md").read_text()
    code, out, _ = cli("compare", run_dir, "--provenance", "--format", "csv",
                       "--out", tmp_path / "o")
    (row,) = csv.DictReader(io.StringIO(out))
    assert (row["torch"], row["seed"], row["git_commit"]) == ("2.4.0", "3", "0123456789")


OLD_HEADER = ("| run | stage | type | status | model | method | ratio | top-1 (%) | top-5 (%) | "
              "Δ top-1 | params (M) | MACs (M) | MACs -% | model.pt (MB) | epochs | wall (s) |")
OLD_CSV_HEADER = ("run,stage,type,status,model,method,ratio,top1,top5,delta_top1,params_m,"
                  "macs_m,mac_reduction_pct,size_mb,epochs,wall_seconds")


def test_compare_names_the_split_of_each_number(tiny_config, cli, tmp_path):
    for name, data in (("held", {"val_split": 16}), ("plain", {})):
        over = {"name": name, "data": data,
                "stages": {"pretrain": {"epochs": 1, "schedule": {"milestones": []}}}}
        code, _, err = cli("run", tiny_config(over, name=f"{name}.yaml"))
        assert code == 0, err
    runs = tmp_path / "runs"

    # with data.val_split: a val column beside the test one, and the split that chose best.pt
    code, out, err = cli("compare", runs / "held", "--format", "csv", "--out", tmp_path / "h")
    assert code == 0, err
    header = out.splitlines()[0]
    assert header.startswith("run,stage,type,status,model,method,ratio,top1,val_top1,top5,")
    assert ",epochs,best_split," in header
    table = {r["stage"]: r for r in csv.DictReader(io.StringIO(out))}
    for stage in ("pretrain", "prune", "finetune"):
        s = summary(runs / "held", stage)
        assert s["val_top1"] is not None
        assert float(table[stage]["val_top1"]) == s["val_top1"]
        assert float(table[stage]["top1"]) == s["top1"]
    assert [table[s]["best_split"] for s in ("pretrain", "prune", "finetune")] == \
        ["val", "", "val"]
    rows = {r["stage"]: r for r in json.loads((tmp_path / "h" / "compare.json").read_text())}
    assert rows["finetune"]["best_split"] == "val"
    assert rows["finetune"]["val_top1"] == summary(runs / "held", "finetune")["val_top1"]
    md = (tmp_path / "h" / "compare.md").read_text()
    assert "| top-1 (%, test) | val top-1 (%) | top-5 (%, test) |" in md
    assert "best_split" not in md and "| top-1 (%) |" not in md
    assert "\nbest epoch chosen on: val\n" in md
    s = summary(runs / "held", "finetune")
    line = next(x for x in md.splitlines() if x.startswith("| held | finetune |"))
    assert f"| {s['top1']:.2f} | {s['val_top1']:.2f} | {s['top5']:.2f} |" in line

    # without it: the columns and headers of before, no note
    code, out, _ = cli("compare", runs / "plain", "--format", "csv", "--out", tmp_path / "p")
    assert code == 0 and out.splitlines()[0] == OLD_CSV_HEADER
    md = (tmp_path / "p" / "compare.md").read_text()
    assert OLD_HEADER in md.splitlines()
    assert "val top-1" not in md and ", test)" not in md and "chosen on" not in md

    # both: the val column appears, and the note says which run chose on which split
    code, out, _ = cli("compare", runs / "held", runs / "plain", "--out", tmp_path / "b")
    assert code == 0
    assert "best epoch chosen on: test (plain); val (held)" in out.splitlines()
    plain = next(x for x in out.splitlines() if x.startswith("| plain | pretrain |"))
    assert plain.split(" | ")[8] == "-"  # run, stage, type, status, model, method, ratio, top1


def test_iterative_rounds_carry_their_validation_top1(tmp_path, cli):
    rounds = [{"round": t, "ratio": r, "target_macs_reduction": None, "macs": m,
               "params": 200000, "val_top1": v, "top1": v + 1, "top5": 99.0, "epochs": 1}
              for t, r, m, v in ((1, 0.2, 30000000, 88.5), (2, 0.4, 20000000, 85.25))]
    pre = {**PRETRAIN, "val_top1": 90.5, "best_split": "val"}
    it = {"stage": "it", "type": "iterative", "status": "completed", "top1": 86.25,
          "top5": 99.0, "val_top1": 85.25, "macs": 20000000, "params": 200000,
          "rounds": rounds, "split": "val", "method": "l1", "ratio": 0.4}
    run_dir = fake_run(tmp_path, "r", {"pretrain": STAGES["pretrain"],
                                       "it": {"type": "iterative", "from": "pretrain"}},
                       {"pretrain": pre, "it": it})
    code, out, err = cli("compare", run_dir, "--format", "json", "--out", tmp_path / "o")
    assert code == 0, err
    rows = {r["stage"]: r for r in json.loads(out)}
    assert [rows[f"it/round_{t}"]["val_top1"] for t in (1, 2)] == [88.5, 85.25]
    assert rows["it/round_1"]["top1"] == 89.5 and rows["it/round_1"]["best_split"] is None
    assert (rows["pretrain"]["best_split"], rows["it"]["best_split"]) == ("val", None)
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "| 91.25 | 90.50 | 99.50 |" in md  # test top-1, val top-1, test top-5
    assert "| 89.50 | 88.50 |" in md and "\nbest epoch chosen on: val\n" in md


def test_compare_usage_errors(tmp_path, cli):
    code, _, err = cli("compare", tmp_path / "missing")
    assert code == 2 and err.strip() == f"error: no such run directory: {tmp_path / 'missing'}"
    code, _, err = cli("compare", str(tmp_path / "none*"))
    assert code == 2 and err.startswith("error: no such run directory")
    (tmp_path / "stage").mkdir()
    code, _, err = cli("compare", tmp_path / "stage")
    assert code == 2 and err.startswith("error: not a run directory")


def test_pareto_front():
    pts = [(1.0, 50.0), (2.0, 40.0), (3.0, 60.0), (0.5, 30.0), (3.0, 55.0)]
    assert report.pareto_front(pts) == [(0.5, 30.0), (1.0, 50.0), (3.0, 60.0)]


def test_latency_memory_format_reaches_the_model(tiny_config, cli, tmp_path, monkeypatch):
    code, _, err = cli("run", tiny_config({"stages": {"pretrain": {"epochs": 1}}}))
    assert code == 0, err
    seen = []
    real_forward = torch.nn.Conv2d.forward

    def forward(self, x):
        seen.append((x.is_contiguous(memory_format=torch.channels_last),
                     self.weight.is_contiguous(memory_format=torch.channels_last)))
        return real_forward(self, x)

    monkeypatch.setattr(torch.nn.Conv2d, "forward", forward)
    run_dir = next((tmp_path / "runs").iterdir())
    for fmt, nhwc in (("contiguous", False), ("channels_last", True)):
        seen.clear()
        code, out, err = cli("compare", str(run_dir), "--latency", "--latency-batch", "2",
                             "--latency-memory-format", fmt, "--format", "json",
                             "--out", tmp_path / fmt)
        assert code == 0, err
        assert {r["latency_memory_format"] for r in json.loads(out)} == {fmt}
        assert seen and set(seen) == {(nhwc, nhwc)}
        assert f"in {fmt} memory format" in (tmp_path / fmt / "compare.md").read_text()
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
        cli("compare", str(run_dir), "--latency", "--latency-memory-format", "nhwc")
    assert exc.value.code == 2


def test_labels_of_coinciding_points_are_stacked():
    rows = [{"stage": "pretrain", "macs_m": 40.0, "top1": 85.7},
            {"stage": "finetune_fpgm", "macs_m": 22.0, "top1": 84.5},
            {"stage": "finetune_l1", "macs_m": 22.0, "top1": 84.4},
            {"stage": "scratch_b", "macs_m": 22.0, "top1": 85.6},
            {"stage": "prune_fpgm", "macs_m": 22.0, "top1": 12.8}]
    off = plots._label_offsets(rows)
    by = {r["stage"]: off[id(r)] for r in rows}
    assert by["pretrain"] == by["prune_fpgm"] == by["scratch_b"] == 4.0  # nothing close by
    assert len({by["scratch_b"], by["finetune_fpgm"], by["finetune_l1"]}) == 3  # stacked
    assert by["finetune_l1"] < by["finetune_fpgm"] < by["scratch_b"]


def conv_net(width: int, depth: int) -> nn.Module:
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def test_latency_follows_the_macs(one_thread):
    small, large = conv_net(8, 1), conv_net(64, 4)
    macs = {name: count_macs(m, (3, 32, 32))["total"] for name, m in (("small", small),
                                                                       ("large", large))}
    assert macs["large"] > 150 * macs["small"]
    ms = {name: latency.model_latency_ms(m, (3, 32, 32), 4, "cpu", min_seconds=0.2)
          for name, m in (("small", small), ("large", large))}
    assert ms["large"] > 3 * ms["small"], ms
    assert small.training and large.training  # the mode the models had is restored
    assert large[0].weight.is_contiguous(memory_format=torch.channels_last)

    # the benchmark's measurement: interleaved rounds, one forward per model per round
    calls = {"small": 0, "large": 0}
    for name, m in (("small", small), ("large", large)):
        m.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    x = latency.in_memory_format(torch.randn(4, 3, 32, 32), "contiguous")
    nets = {name: latency.in_memory_format(m.eval(), "contiguous")
            for name, m in (("small", small), ("large", large))}
    s = latency.interleaved_median_seconds(nets, x, rounds=7, warmup=2)
    assert calls == {"small": 9, "large": 9}
    assert s["large"] > 3 * s["small"], s


def test_latency_of_model_files(tmp_path, one_thread):
    ms = {}
    for name in ("resnet8", "resnet56"):
        arch = {"name": name, "num_classes": 10, "shortcut": "A"}
        save_model(tmp_path / f"{name}.pt", build_model(arch), arch)
        ms[name] = latency.file_latency_ms(tmp_path / f"{name}.pt", (3, 32, 32), 2, "cpu",
                                           "channels_last")
    macs = {n: count_macs(build_model({"name": n, "num_classes": 10}), (3, 32, 32))["total"]
            for n in ms}
    assert macs["resnet56"] > 9 * macs["resnet8"]
    assert ms["resnet56"] > 2 * ms["resnet8"], ms
    assert latency.file_latency_ms(tmp_path / "none.pt", (3, 32, 32), 2, "cpu",
                                   "channels_last") is None
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert latency.file_latency_ms(tmp_path / "bad.pt", (3, 32, 32), 2, "cpu",
                                   "channels_last") is None


def test_pareto_plot_draws_the_rows(tmp_path):
    def row(run, stage, macs_m, top1, status="completed", base="pretrain"):
        return {"run": run, "stage": stage, "status": status, "macs_m": macs_m, "top1": top1,
                "baseline": f"{run}/{base}" if base else None}

    rows = [row("a", "pretrain", 40.0, 91.0), row("a", "prune", 24.0, 30.0),
            row("a", "finetune", 24.0, 90.0), row("a", "scratch", None, None, "running"),
            row("b", "prune", 10.0, 20.0, base=None), row("b", "finetune", 10.0, 88.0, base=None),
            row("b", "scratch", 10.0, 70.0, "failed", base=None)]
    drawn = report.plot_pareto(rows, tmp_path / "p.png")
    check_png(drawn.path)
    done = [r for r in rows if r["status"] == "completed"]
    points = {k: v for k, v in drawn.series.items() if "/" in k and not k.endswith(" link")}
    assert points == {f"{r['run']}/{r['stage']}": [(r["macs_m"], r["top1"])] for r in done}
    links = {k: v for k, v in drawn.series.items() if k.endswith(" link")}
    assert links == {f"a/{s} link": [(40.0, 91.0), (24.0, t)]
                     for s, t in (("prune", 30.0), ("finetune", 90.0))}  # b has no baseline
    assert drawn.series["pareto front"] == [(10.0, 88.0), (24.0, 90.0), (40.0, 91.0)]
    assert report.plot_pareto([], tmp_path / "e.png").series == {}


def test_curves_plot_draws_the_metrics(tmp_path):
    run_dir = fake_run(tmp_path, "r", STAGES, {
        "pretrain": PRETRAIN,
        "prune": {"stage": "prune", "type": "prune", "status": "completed", "top1": 12.5}})
    header = "epoch,lr,train_loss,train_acc,test_loss,top1,top5,seconds\n"
    (run_dir / "pretrain" / "metrics.csv").write_text(
        header + "0,0.1,2.0,30,,,,1\n1,0.1,1.5,50,1.4,60,90,1\n2,0.1,1.0,70,1.1,80,95,1\n")
    (run_dir / "finetune").mkdir()
    (run_dir / "finetune" / "metrics.csv").write_text(
        header + "0,0.01,0.9,75,1.0,85,97,1\n1,0.01,0.8,80,0.9,87,98,1\n")
    drawn = report.plot_curves(run_dir, tmp_path / "c.png")
    check_png(drawn.path)
    assert drawn.series == {
        "top1/pretrain": [(2.0, 60.0), (3.0, 80.0)],  # epoch 1 had no test pass
        "train_loss/pretrain": [(1.0, 2.0), (2.0, 1.5), (3.0, 1.0)],
        "test_loss/pretrain": [(2.0, 1.4), (3.0, 1.1)],
        "top1/prune": [(3.0, 12.5)],  # where its input ends, before recovery
        "top1/finetune": [(4.0, 85.0), (5.0, 87.0)],
        "train_loss/finetune": [(4.0, 0.9), (5.0, 0.8)],
        "test_loss/finetune": [(4.0, 1.0), (5.0, 0.9)]}


def exported_stage(root, name: str, size: int = 16):
    """A run directory with one completed pretrain stage of CIFAR network `name` (what
    `compare` and `export` read: config.yaml, model.pt, summary.json)."""
    arch = {"name": name, "num_classes": 10, "shortcut": "A"}
    run_dir = root / name
    (run_dir / "pretrain").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "seed": 0, "model": {"arch": name, "shortcut": "A"},
        "data": {"dataset": "synthetic", "synthetic": {"num_classes": 10, "image_size": size}},
        "stages": {"pretrain": {"type": "pretrain"}}}, sort_keys=False))
    torch.manual_seed(0)
    model = build_model(arch)
    x = torch.randn(8, 3, size, size)
    with torch.no_grad():  # BN statistics of data and logits of a trained net's scale
        model.train()(x)
        model.fc.weight.mul_(10 / model.eval()(x).abs().max())
    save_model(run_dir / "pretrain" / "model.pt", model.eval(), arch)
    (run_dir / "pretrain" / "summary.json").write_text(json.dumps(
        {"stage": "pretrain", "type": "pretrain", "status": "completed"}))
    return run_dir / "pretrain"


def test_latency_backends_end_to_end(tiny_config, cli, tmp_path, monkeypatch):
    code, _, err = cli("run", tiny_config({"stages": {"pretrain": {"epochs": 1}}}))
    assert code == 0, err
    run_dir = next((tmp_path / "runs").iterdir())
    exported = []
    real_export = latency.export_stage

    def spy(stage_dir, options):
        result = real_export(stage_dir, options)
        exported.append((Path(stage_dir).name, options.format, options.batch,
                         options.channels_last, result.path, all(c.passed
                                                                 for c in result.checks)))
        return result

    monkeypatch.setattr(latency, "export_stage", spy)
    for backend, fmt in (("onnxruntime", "onnx"), ("torchscript", "torchscript")):
        exported.clear()
        out_dir = tmp_path / backend
        code, out, err = cli("compare", str(run_dir), "--latency", "--latency-batch", "2",
                             "--latency-backend", backend, "--format", "json",
                             "--out", out_dir)
        assert code == 0, err
        rows = json.loads(out)
        assert [r["stage"] for r in rows] == ["pretrain", "prune", "finetune"]
        for r in rows:
            assert r["latency_ms"] > 0 and r["latency_backend"] == backend
            assert r["latency_device"] == "cpu" and r["latency_batch"] == 2
            assert r["speedup"] > 0
        by = {r["stage"]: r for r in rows}
        assert by["pretrain"]["speedup"] == pytest.approx(1.0)
        # each stage's model exported once (the baseline's result reused), verified, in
        # the batch and layout asked for, and the temporary file removed
        assert sorted(e[0] for e in exported) == ["finetune", "pretrain", "prune"]
        nhwc = backend == "torchscript"  # an ONNX graph has no memory format
        assert {e[1:4] for e in exported} == {(fmt, 2, nhwc)}
        assert all(e[5] for e in exported) and not any(e[4].exists() for e in exported)
        md = (out_dir / "compare.md").read_text()
        assert f"{backend} latency (ms, cpu, batch 2)" in md
        assert f"Latency ({backend})" in md
    # the default stays the PyTorch model
    exported.clear()
    code, out, err = cli("compare", str(run_dir), "--latency", "--latency-batch", "2",
                         "--format", "json", "--out", tmp_path / "torch")
    assert code == 0, err and not exported
    assert {r["latency_backend"] for r in json.loads(out)} == {"torch"}
    assert "torch latency (ms, " in (tmp_path / "torch" / "compare.md").read_text()


def test_more_macs_measure_slower_in_every_backend(tmp_path, one_thread):
    small, large = (exported_stage(tmp_path, n) for n in ("resnet14", "resnet44"))
    macs = {p.parent.name: count_macs(latency.load_model(p / "model.pt"), (3, 16, 16))["total"]
            for p in (small, large)}
    assert 3.5 < macs["resnet44"] / macs["resnet14"] < 4.5
    for backend in latency.LATENCY_BACKENDS:
        ms = {p.parent.name: latency.file_latency_ms(p / "model.pt", (3, 16, 16), 8, "cpu",
                                                     "channels_last", backend)
              for p in (small, large)}
        assert ms["resnet44"] > 1.5 * ms["resnet14"] > 0, (backend, ms)


def test_latency_backend_errors_are_one_line(tmp_path, cli, monkeypatch):
    stage = exported_stage(tmp_path, "resnet8")
    code, _, err = cli("compare", str(stage.parent), "--latency", "--latency-backend",
                       "torchscript", "--latency-device", "cuda")
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "--latency-backend torchscript runs on the CPU" in lines[0]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if absent
    code, out, err = cli("compare", str(stage.parent), "--latency", "--latency-backend",
                         "onnxruntime")
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and not out
    assert "onnxruntime is not installed" in lines[0]
    assert lines[0].endswith("pip install 'prune-pipeline[export]'")
    assert not (stage.parent / "report").exists()  # failed before anything was written
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
        cli("compare", str(stage.parent), "--latency", "--latency-backend", "tensorrt")
    assert exc.value.code == 2
