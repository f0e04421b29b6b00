"""The iterative stage: AGP and linear amounts against their formulas, the per-round widths
against hand-computed counts, stop_below, the MAC target, and exact resume."""

from __future__ import annotations

import csv
import json

import pytest
from test_resume import assert_bitwise_equal, run_cli

from pipeline import checkpoint as ckpt
from pipeline.report.plots import plot_pareto
from pipeline.report.rows import rows_for
from stages.iterative import amounts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_agp_amounts_follow_the_cubic_formula():
    n, s_f, s_i = 4, 0.6, 0.1
    got = amounts("agp", n, s_f, s_i)
    assert got == pytest.approx([s_f + (s_i - s_f) * (1 - t / n) ** 3 for t in range(1, 5)])
    assert got[-1] == pytest.approx(s_f)
    # AGP prunes most early: each round adds less than the one before
    steps = [b - a for a, b in zip([s_i, *got], got, strict=False)]
    assert steps == sorted(steps, reverse=True)
    assert amounts("linear", 4, 0.6) == pytest.approx([0.15, 0.3, 0.45, 0.6])


# 3 AGP rounds to 0.5: 0.351852, 0.481481, 0.5 of the dense widths 16/32/64 (block-internal
# conv1 of resnet8's three blocks), floor(ratio x width) removed each time
WIDTHS = [{"layer1.0.conv1": 11, "layer2.0.conv1": 21, "layer3.0.conv1": 42},
          {"layer1.0.conv1": 9, "layer2.0.conv1": 17, "layer3.0.conv1": 34},
          {"layer1.0.conv1": 8, "layer2.0.conv1": 16, "layer3.0.conv1": 32}]
ITER = {"data": {"val_split": 16},
        "stages": {"it": {"type": "iterative", "from": "pretrain", "rounds": 3, "ratio": 0.5,
                          "schedule": "agp", "finetune_epochs": 1, "batch_size": 32,
                          "checkpoint_every_steps": 1}}}


def rounds(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_rounds_widths_files_and_plan(tmp_path, tiny_config, cli):
    cfg = tiny_config(ITER)
    code, out, err = cli("run", cfg, "--dry-run")
    assert code == 0, err
    assert "3 rounds of fpgm toward ratio 0.5 (agp)" in out
    assert "ratio after each round: 0.3519, 0.4815, 0.5" in out
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    code, _, err = cli("run", cfg, "--stage", "it")
    assert code == 0, err
    d = tmp_path / "runs/tiny/it"
    rows = rounds(d / "rounds.csv")
    assert [json.loads(r["widths"]) for r in rows] == WIDTHS
    assert [float(r["ratio"]) for r in rows] == pytest.approx(amounts("agp", 3, 0.5), abs=1e-6)
    assert all(r["val_top1"] and r["top1"] for r in rows)
    macs = [int(r["macs"]) for r in rows]
    assert macs == sorted(macs, reverse=True)
    final = ckpt.load(d / "model.pt")["state_dict"]
    assert final["layer3.0.conv1.weight"].shape[0] == 32
    s = json.loads((d / "summary.json").read_text())
    assert s["rounds_done"] == 3 and s["split"] == "val" and s["macs"] == macs[-1]
    assert len(s["rounds"]) == 3 and s["epochs"] == 3
    # compare: the rounds as rows before the stage's own, the plot joins them into a path
    table = rows_for(tmp_path / "runs/tiny")
    names = [r["stage"] for r in table]
    i = names.index("it")
    assert names[i - 3:i] == ["it/round_1", "it/round_2", "it/round_3"]
    assert [r["macs"] for r in table[i - 3:i]] == macs
    assert [r["top1"] for r in table[i - 3:i]] == pytest.approx([float(r["top1"]) for r in rows])
    plot = plot_pareto(table, tmp_path / "p.png")
    assert "tiny/it path" in plot.series and len(plot.series["tiny/it path"]) == 5


def test_stop_below_and_mac_target(tmp_path, tiny_config, cli):
    over = {"stages": {"it": {**ITER["stages"]["it"], "ratio": None, "rounds": 2,
                              "target_macs_reduction": 0.3, "stop_below": 0.0,
                              "finetune_epochs": 0}}}
    cfg = tiny_config({**ITER, **over})
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    code, _, err = cli("run", cfg, "--stage", "it")
    assert code == 0, err
    s = json.loads((tmp_path / "runs/tiny/it/summary.json").read_text())
    first = s["rounds"][0]
    # agp to 0.3 in 2 rounds: 0.2625 after round 1, reached (or passed by one group's step)
    assert first["mac_reduction"] >= 0.2625 and first["target_macs_reduction"] == 0.2625
    if first["val_top1"] < s["input_val_top1"]:  # pruning without finetuning costs accuracy
        assert s["stopped_after"] == 1 and s["rounds_done"] == 1


@pytest.mark.slow
def test_killed_iterative_run_resumes_exactly(tmp_path, tiny_config):
    ref_cfg = tiny_config(ITER, name="ref.yaml")
    assert run_cli(ref_cfg, fault="none:step:0").returncode == 0
    ref = tmp_path / "runs/tiny"
    cut = tiny_config({**ITER, "out_dir": str(tmp_path / "cut")}, name="cut.yaml")
    killed = run_cli(cut, fault="it/round_2:step:2")
    assert killed.returncode != 0
    assert (tmp_path / "cut/tiny/it/round_1/round.json").is_file()
    assert not (tmp_path / "cut/tiny/it/round_2/round.json").exists()
    done = run_cli(cut, fault="none:step:0")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "cut/tiny"
    assert_bitwise_equal(ckpt.load(out / "it/model.pt")["state_dict"],
                         ckpt.load(ref / "it/model.pt")["state_dict"])
    strip = [{k: v for k, v in r.items()} for r in rounds(ref / "it/rounds.csv")]
    assert rounds(out / "it/rounds.csv") == strip


def test_a_finetune_after_an_iterative_stage_takes_its_lr(tiny_config, cli):
    """The iterative stage's `schedule` key names its pruning schedule; a finetune after it
    defaults its lr from the stage's own (constant) lr schedule."""
    stages = {**ITER["stages"],
              "ft_it": {"type": "finetune", "from": "it", "epochs": 1, "batch_size": 32}}
    code, out, err = cli("run", tiny_config({**ITER, "stages": stages}), "--dry-run",
                         "--format", "json")
    assert code == 0, err
    plan = json.loads(out)
    fine = next(s for s in plan["stages"] if s["name"] == "ft_it")
    assert "lowest lr of 'it'" in json.dumps(fine)
