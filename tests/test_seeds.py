"""Seeds: one config runs its chain under several seeds into sibling run directories, and
`compare` aggregates runs that differ only in seed into mean ± std with n, marking the
differences beyond two standard errors."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import yaml

from pipeline import report
from pipeline.data import build_data
from pipeline.report.seeds import (
    exceeds_two_se,
    mean_exceeds_two_se,
    mean_std,
    paired_exceeds_two_se,
    significant_pairs,
)
from pipeline.runconfig import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_stage(tiny_config, over: dict, name: str = "config.yaml"):
    """The tiny config with its pretrain only (1 epoch): fast enough to run 3 seeds."""
    path = tiny_config(over, name=name)
    data = yaml.safe_load(path.read_text())
    data["stages"] = {"pretrain": {**data["stages"]["pretrain"], "epochs": 1}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("seeds,seed,expected", [
    (3, 0, [0, 1, 2]), (2, 5, [5, 6]), ([7, 0, 3], 0, [7, 0, 3]), (None, 4, [4])])
def test_seeds_expand_into_one_config_per_seed_and_run_dir(tiny_config, seeds, seed, expected):
    over = {"seed": seed, **({"seeds": seeds} if seeds is not None else {})}
    cfg, _ = load_config(tiny_config(over))
    assert cfg.seed_list() == expected
    members = cfg.seed_runs()
    assert [m.seed for m in members] == expected
    assert all(m.seeds is None for m in members)
    names = [m.name for m in members]
    assert names == ["tiny" if s == seed else f"tiny.seed{s}" for s in expected]
    assert len({m.run_dir for m in members}) == len(expected)
    assert all(m.run_dir.parent == cfg.run_dir.parent for m in members)


@pytest.mark.parametrize("seeds,msg", [
    (0, "expected a number of seeds >= 1"), ([], "at least one seed"),
    ([1, 2, 1], "seed(s) [1] given more than once"), ([-1], "expected an integer >= 0"),
    ("three", "expected")])
def test_bad_seeds_are_one_line_config_errors(tiny_config, cli, seeds, msg):
    code, _, err = cli("run", tiny_config({"seeds": seeds}), "--dry-run")
    assert code == 2
    assert "seeds" in err and msg in err and "Traceback" not in err


def test_dry_run_lists_the_seeds_and_their_run_dirs(tiny_config, cli, tmp_path):
    code, out, _ = cli("run", tiny_config({"seeds": 2}), "--dry-run", "--format", "json")
    assert code == 0
    plan = json.loads(out)
    runs = tmp_path / "runs"
    assert plan["seeds"] == [0, 1]
    assert plan["run_dirs"] == [str(runs / "tiny"), str(runs / "tiny.seed1")]
    code, out, _ = cli("run", tiny_config({}), "--dry-run", "--format", "json")
    assert "seeds" not in json.loads(out)  # a single-seed plan is as before


def test_data_order_differs_between_the_seeds(tiny_config):
    cfg, _ = load_config(tiny_config({"seeds": 2}))
    firsts = []
    for m in cfg.seed_runs():
        data = build_data(m.data, 32, 64, m.seed, torch.device("cpu"))
        data.train.set_epoch(0)
        x, y = next(iter(data.train.iterate(0)))
        firsts.append((x, y))
    (x0, y0), (x1, y1) = firsts
    assert not torch.equal(x0, x1) or not torch.equal(y0, y1)


def test_a_seeds_run_writes_one_run_dir_per_seed_and_compare_aggregates_them(
        tiny_config, cli, tmp_path):
    code, out, err = cli("run", _one_stage(tiny_config, {"seeds": [0, 1, 2]}),
                         "--format", "json")
    assert code == 0, err
    done = json.loads(out)
    assert [(s["run"], s["stage"]) for s in done] == [
        ("tiny", "pretrain"), ("tiny.seed1", "pretrain"), ("tiny.seed2", "pretrain")]
    runs = tmp_path / "runs"
    top1 = []
    for name, seed in (("tiny", 0), ("tiny.seed1", 1), ("tiny.seed2", 2)):
        written = yaml.safe_load((runs / name / "config.yaml").read_text())
        assert written["seed"] == seed and written["name"] == name and written["seeds"] is None
        prov = json.loads((runs / name / "provenance.json").read_text())
        assert prov["seed"] == seed
        top1.append(json.loads((runs / name / "pretrain" / "summary.json").read_text())["top1"])
    weights = [torch.load(runs / n / "pretrain" / "model.pt", weights_only=True)
               for n in ("tiny", "tiny.seed1")]
    first = next(k for k in weights[0]["state_dict"] if k.endswith("weight"))
    assert not torch.equal(weights[0]["state_dict"][first], weights[1]["state_dict"][first])

    code, out, err = cli("compare", str(runs / "tiny*"), "--format", "json", "--out",
                         tmp_path / "rep")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["run"] == "tiny" and row["stage"] == "pretrain" and row["n"] == 3
    assert row["seeds"] == "0,1,2"
    assert row["top1"] == pytest.approx(sum(top1) / 3)
    assert row["top1_std"] == pytest.approx(statistics.stdev(top1))
    md = (tmp_path / "rep" / "compare.md").read_text()
    assert f"{sum(top1) / 3:.2f} ± {statistics.stdev(top1):.2f}" in md
    assert "n (seeds)" in md

    code, out, _ = cli("compare", str(runs / "tiny*"), "--format", "json", "--each-seed",
                       "--out", tmp_path / "rep2")
    assert code == 0 and len(json.loads(out)) == 3


def test_runs_that_differ_in_more_than_seed_stay_apart(tiny_config, cli, tmp_path):
    for name, over in (("a", {}), ("b", {"seed": 1}),
                       ("c", {"seed": 1, "stages": {"pretrain": {"lr": 0.05}}})):
        code, _, err = cli("run", _one_stage(tiny_config, {"name": name, **over},
                                             name=f"{name}.yaml"))
        assert code == 0, err
    dirs = [tmp_path / "runs" / n for n in "abc"]
    assert [[d.name for d in g] for g in report.seed_groups(dirs)] == [["a", "b"], ["c"]]
    rows = report.aggregate([r for d in dirs for r in report.rows_for(d)], dirs)
    assert [(r["run"], r.get("n")) for r in rows] == [("a+b", 2), ("c", None)]


# ----------------------------------------------------------------------------- statistics


def test_mean_std_and_two_standard_errors_by_hand():
    mean, std, n = mean_std([1.0, 2.0, 4.0])
    assert (mean, n) == (7 / 3, 3)
    assert std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                           + (4 - 7 / 3) ** 2) / 2))
    assert mean_std([5.0]) == (5.0, 0.0, 1)
    # paired diffs 1.0, 1.2, 0.8: mean 1.0, s 0.2, SE 0.2/sqrt(3) = 0.115 -> beyond 2 SE
    assert mean_exceeds_two_se([1.0, 1.2, 0.8])
    # diffs 1, -1, 0.5: mean 0.167, s 1.04, SE 0.60 -> within
    assert not mean_exceeds_two_se([1.0, -1.0, 0.5])
    assert paired_exceeds_two_se([91.0, 90.2, 90.8], [90.0, 89.0, 90.0])
    # Welch: means 2 and 1, s 1 each, n 3: SE sqrt(2/3) = 0.816 -> 1 < 1.63
    assert not exceeds_two_se([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert exceeds_two_se([10.0, 10.1, 9.9], [9.0, 9.1, 8.9])
    assert not mean_exceeds_two_se([3.0])  # one seed: no standard error


def test_aggregated_rows_mark_deltas_and_pairs_beyond_two_standard_errors():
    def agg(stage, method, typ, top1, delta):
        return {"run": "g", "stage": stage, "type": typ, "method": method, "status": "completed",
                "n": 3, "top1": statistics.mean(top1), "top1_std": statistics.stdev(top1),
                "top1_by_seed": dict(zip("012", top1, strict=True)),
                "delta_top1": statistics.mean(delta), "delta_top1_std": statistics.stdev(delta),
                "delta_exceeds_2se": mean_exceeds_two_se(delta)}

    rows = [agg("pretrain", "-", "pretrain", [90.0, 90.4, 89.8], [0.0, 0.0, 0.0]),
            agg("ft_a", "fpgm", "finetune", [88.0, 88.5, 87.9], [-2.0, -1.9, -1.9]),
            agg("ft_b", "l1", "finetune", [87.0, 87.6, 86.8], [-3.0, -2.8, -3.0]),
            agg("ft_c", "l2", "finetune", [88.1, 88.2, 88.2], [-1.9, -2.2, -1.6])]
    pairs = significant_pairs(rows)
    assert [(p["a"], p["b"]) for p in pairs] == [("ft_a", "ft_b"), ("ft_b", "ft_c")]
    assert pairs[0]["diff"] == pytest.approx(1.0) and pairs[0]["n"] == 3
    md = report.to_markdown(rows, report.columns_for(rows))
    assert "| -1.93 ± 0.06 * |" in md  # mean and std of -2.0, -1.9, -1.9; beyond 2 SE
    assert "| -2.93 ± 0.12 * |" in md
    assert "| +0.00 ± 0.00 |" in md  # the baseline: no change, no mark
    assert "g: ft_a - ft_b = +1.00 (SE 0.06, n 3)" in md


def test_criteria_table_over_seeds_beats_random_only_beyond_two_standard_errors():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("criteria_bench",
                                                  ROOT / "benchmarks" / "criteria.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    finetuned = {"random": [85.0, 85.4, 85.2], "fpgm": [86.0, 86.3, 86.1],  # +0.93 ± 0.06
                 "l1": [85.9, 85.1, 85.4]}  # +0.27 ± 0.64: within two standard errors
    rows = [{"method": m, "seed": s, "top1_pruned": 50.0 + s, "top1_finetuned": v,
             "macs": 1, "params": 1} for m, vs in finetuned.items() for s, v in enumerate(vs)]
    out = {r["method"]: r for r in bench.summarize(rows, ["fpgm", "l1", "random"])}
    assert out["fpgm"]["beats_random"] is True and out["l1"]["beats_random"] is False
    assert out["random"]["beats_random"] is None
    assert out["fpgm"]["n"] == 3
    assert out["fpgm"]["finetuned_mean"] == pytest.approx(statistics.mean(finetuned["fpgm"]))
    assert out["l1"]["finetuned_std"] == pytest.approx(statistics.stdev(finetuned["l1"]))
    assert out["fpgm"]["pruned_std"] == pytest.approx(1.0)  # 50, 51, 52
    # pairs between criteria: fpgm over random and over l1 beyond two SEs, l1 - random not;
    # the better one is named first
    pairs = bench.significant_pairs(rows, ["random", "fpgm", "l1"])
    assert {(p["a"], p["b"]) for p in pairs} == {("fpgm", "random"), ("fpgm", "l1")}
    fr = next(p for p in pairs if p["b"] == "random")
    assert fr["diff"] == pytest.approx(statistics.mean([1.0, 0.9, 0.9]))
    assert fr["se"] == pytest.approx(statistics.stdev([1.0, 0.9, 0.9]) / 3 ** 0.5)
    assert fr["n"] == 3


def test_criteria_table_names_its_subsets_and_refuses_a_subset_below_one_per_class():
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("criteria_bench",
                                                  ROOT / "benchmarks" / "criteria.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--seeds", "3", "--train-samples", "8000", "--test-samples", "2000"])
    assert (args.train_samples, args.test_samples) == (8000, 2000)
    summary = [{"method": "fpgm", "n": 3, "pruned_mean": 30.0, "pruned_std": 1.0,
                "finetuned_mean": 60.0, "finetuned_std": 0.5, "macs": 2e7, "params": 1000,
                "beats_random": True}]
    dense = bench.build_model(bench.ARCH)
    text = bench.table(summary, args, 65.0, dense, 4e7, ["fp32"])
    assert "8,000 training images and 2,000 test images" in text
    assert "60.00 ± 0.50" in text
    full = bench.table(summary, bench.parse_args([]), 65.0, dense, 4e7, ["fp32"])
    assert "subsets" not in full
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-samples", "5"])
