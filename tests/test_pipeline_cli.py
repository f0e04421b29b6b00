"""The pipeline end to end through the CLI entry point: run, skip, resume, --stage, compare."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def summaries(run_dir):
    return {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("*/summary.json")}


def test_smoke_pipeline_runs_skips_and_compares(tiny_config, cli, tmp_path):
    cfg = tiny_config()
    code, out, err = cli("run", cfg)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny"
    s = summaries(run_dir)
    assert set(s) == {"pretrain", "prune", "finetune"}
    for name, summary in s.items():
        assert summary["status"] == "completed"
        for key in ("stage", "type", "status", "top1", "top5", "params", "macs", "epochs",
                    "wall_seconds"):
            assert key in summary, (name, key)
    assert s["prune"]["macs"] < s["pretrain"]["macs"]
    assert s["finetune"]["params"] == s["prune"]["params"]
    # the run directory holds the resolved config and per-stage artefacts
    assert (run_dir / "config.yaml").is_file()
    header = (run_dir / "pretrain" / "metrics.csv").read_text().splitlines()
    assert header[0] == "epoch,lr,train_loss,train_acc,test_loss,top1,top5,seconds"
    assert len(header) == 1 + 2  # two epochs, one row each
    for stage in ("pretrain", "prune", "finetune"):
        assert (run_dir / stage / "model.pt").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in run_dir.glob("*/model.pt")}

    # running again skips every completed stage and touches no checkpoint
    code, out, err = cli("run", cfg)
    assert code == 0
    assert err.count("already completed") == 3
    assert {p: p.stat().st_mtime_ns for p in run_dir.glob("*/model.pt")} == mtimes

    code, out, _ = cli("compare", run_dir)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 3
    code, out, _ = cli("compare", run_dir, "--format", "json")
    table = json.loads(out)
    prune_row = next(r for r in table if r["stage"] == "prune")
    assert prune_row["mac_reduction_pct"] > 0


def test_finetune_uses_lowest_upstream_lr(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 3, "lr": 0.2,
                                               "schedule": {"milestones": [1, 2]}}}})
    code, _, err = cli("run", cfg)
    assert code == 0, err
    ft = (tmp_path / "runs/tiny/finetune/metrics.csv").read_text().splitlines()[1]
    assert float(ft.split(",")[1]) == pytest.approx(0.002)


def test_stage_needs_its_input_first(tiny_config, cli):
    cfg = tiny_config()
    code, _, err = cli("run", cfg, "--stage", "finetune")
    assert code == 2
    (line,) = error_lines(err)
    assert "--stage prune" in line


def test_stage_and_restart(tiny_config, cli, tmp_path):
    cfg = tiny_config()
    run_dir = tmp_path / "runs" / "tiny"
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    assert not (run_dir / "prune").exists()
    assert cli("run", cfg, "--stage", "prune")[0] == 0
    assert (run_dir / "prune" / "summary.json").is_file()
    assert not (run_dir / "finetune").exists()
    before = json.loads((run_dir / "prune/summary.json").read_text())["finished"]
    code, _, err = cli("run", cfg, "--stage", "prune", "--restart",
                       "--set", "stages.prune.ratio=0.5")
    assert code == 0, err
    after = json.loads((run_dir / "prune/summary.json").read_text())
    assert after["ratio"] == 0.5 and after["status"] == "completed"
    assert not (run_dir / "prune.restart").exists()
    assert before  # the first run had completed too


def test_interrupted_stage_resumes_from_last_checkpoint(tiny_config, cli, tmp_path):
    """A stage whose summary is missing but whose last.pt holds epoch 1 trains only epoch 2."""
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1}}})
    run_dir = tmp_path / "runs" / "tiny"
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    (run_dir / "pretrain" / "summary.json").unlink()  # as if killed after the last epoch
    code, _, err = cli("run", cfg, "--stage", "pretrain", "--set", "stages.pretrain.epochs=2")
    assert code == 0, err
    assert "resumed from" in err
    rows = (run_dir / "pretrain" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]


def test_failed_stage_writes_failed_summary_and_exit_1(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1, "lr": 1.0e30,
                                               "log_interval": 1}}})
    code, _, err = cli("run", cfg)
    assert code == 1
    (line,) = error_lines(err)
    assert "non-finite loss at step" in line
    s = json.loads((tmp_path / "runs/tiny/pretrain/summary.json").read_text())
    assert s["status"] == "failed"


def test_pruned_checkpoint_reloads_in_fresh_process(tiny_config, cli, tmp_path):
    cfg = tiny_config()
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    assert cli("run", cfg, "--stage", "prune")[0] == 0
    path = tmp_path / "runs/tiny/prune/model.pt"
    import pipeline

    model = pipeline.load_model(path).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save(x, tmp_path / "x.pt")
    expected = model(x)
    script = (
        "import sys, torch, pipeline\n"
        "m = pipeline.load_model(sys.argv[1]).eval()\n"
        "x = torch.load(sys.argv[2], weights_only=True)\n"
        "torch.save(m(x).detach(), sys.argv[3])\n")
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, cwd=ROOT)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    assert torch.equal(got, expected.detach())
    # and it is genuinely smaller than the dense model
    dense = pipeline.load_model(tmp_path / "runs/tiny/pretrain/model.pt")
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


def test_module_entry_point_help():
    for args in (["--help"], ["run", "--help"], ["compare", "--help"]):
        out = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                             text=True, cwd=ROOT)
        assert out.returncode == 0
        assert "usage:" in out.stdout


def test_pretrained_weights_in_place_of_pretraining(tiny_config, cli, tmp_path):
    """pretrain with epochs 0 passes model.pretrained on; finetune then needs an explicit lr."""
    first = tiny_config({"name": "source", "stages": {"pretrain": {"epochs": 1}}}, "a.yaml")
    assert cli("run", first, "--stage", "pretrain")[0] == 0
    weights = tmp_path / "runs/source/pretrain/model.pt"
    over = {"model": {"pretrained": str(weights)},
            "stages": {"pretrain": {"epochs": 0}, "finetune": {"lr": 0.01}}}
    cfg = tiny_config(over, "b.yaml")
    code, _, err = cli("run", cfg)
    assert code == 0, err
    s = json.loads((tmp_path / "runs/tiny/pretrain/summary.json").read_text())
    src = json.loads((tmp_path / "runs/source/pretrain/summary.json").read_text())
    assert s["epochs"] == 0 and s["top1"] == pytest.approx(src["top1"])
    # without a finetune lr there is no schedule upstream to take the lowest lr from
    bad = tiny_config({**over, "stages": {"pretrain": {"epochs": 0}}}, "c.yaml")
    code, _, err = cli("run", bad, "--dry-run")
    assert code == 2 and "stages.finetune.lr" in err
    code, _, err = cli("run", tiny_config({"stages": {"pretrain": {"epochs": 0}}}, "d.yaml"))
    assert code == 2 and "model.pretrained" in err
