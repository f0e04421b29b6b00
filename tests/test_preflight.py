"""Preflight: the checks run before any work, and the plan's predicted pruned sizes."""

from __future__ import annotations

import json
import os

import pytest


def test_dry_run_predicts_the_pruned_macs_and_params_exactly(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"prune": {"layer_ratios": {"layer2.*": 0.5}}}})
    code, out, err = cli("run", cfg, "--dry-run", "--format", "json")
    assert code == 0, err
    plan = json.loads(out)
    predicted = next(s for s in plan["stages"] if s["name"] == "prune")["predicted"]
    assert predicted["exact"] and predicted["macs"] < predicted["macs_before"]
    code, _, err = cli("run", cfg, "--dry-run")
    assert "predicted: MACs" in _ and "preflight: passed" in _
    code, _, err = cli("run", cfg)
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "tiny" / "prune" / "summary.json").read_text())
    assert (predicted["macs_before"], predicted["macs"]) == (summary["macs_before"],
                                                               summary["macs"])
    assert (predicted["params_before"], predicted["params"]) == (summary["params_before"],
                                                                   summary["params"])
    layers = json.loads((tmp_path / "runs" / "tiny" / "prune" / "layers.json").read_text())
    assert predicted["widths"] == {e["name"]: e["after"] for e in layers}


def test_target_search_prediction_matches_the_run(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"prune": {"ratio": None, "target_macs_reduction": 0.3},
                                  "finetune": {"epochs": 1}}})
    code, out, err = cli("run", cfg, "--dry-run", "--format", "json")
    assert code == 0, err
    predicted = next(s for s in json.loads(out)["stages"] if s["name"] == "prune")["predicted"]
    code, _, err = cli("run", cfg, "--stage", "pretrain")
    code, _, err = cli("run", cfg, "--stage", "prune")
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "tiny" / "prune" / "summary.json").read_text())
    assert predicted["macs"] == summary["macs"] and predicted["mac_reduction"] >= 0.3


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_dir_not_writable(tiny_config, cli, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = cli("run", tiny_config({"out_dir": str(locked / "runs")}), "--dry-run")
    finally:
        locked.chmod(0o700)
    assert code == 2 and "out_dir" in err and "not writable" in err


def test_out_dir_is_a_file(tiny_config, cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = cli("run", tiny_config({"out_dir": str(tmp_path / "afile")}))
    assert code == 2 and "out_dir" in err and "not a folder" in err
    assert len(err.strip().splitlines()) == 1


def test_preflight_fails_before_any_epoch(tiny_config, cli, tmp_path):
    """A prune mistake is found before the pretrain stage trains (today's hours)."""
    cfg = tiny_config({"stages": {"prune": {"skip": [99]}}})
    code, _, err = cli("run", cfg)
    assert code == 2 and "stages.prune.skip[0]" in err
    assert not (tmp_path / "runs" / "tiny" / "pretrain").exists()


def test_dry_run_without_the_data_set_assumes_the_class_count(tiny_config, cli, tmp_path):
    cfg = tiny_config({"data": {"dataset": "imagefolder", "root": str(tmp_path / "none"),
                                "image_size": 32}})
    code, out, err = cli("run", cfg, "--dry-run", "--format", "json")
    assert code == 0, err
    data = json.loads(out)["data"]
    assert data["num_classes"] == 1000 and data["num_classes_source"] == "assumed"


def test_small_trace_gives_the_real_size_widths():
    """The preflight traces on 32x32 images: the same widths as at the real size, for a
    fixed ratio and for a MAC target measured at the real size."""
    import copy

    import torch

    from pipeline.models import build_model, count_macs
    from pipeline.pruning import PruneSpec, prune_model

    torch.manual_seed(0)
    dense = build_model({"name": "resnet18", "num_classes": 10})
    for spec in (PruneSpec(ratio=0.3, skip_downsample=True),
                 PruneSpec(target_macs_reduction=0.35, method="l1", target_step=0.05)):
        big, small = copy.deepcopy(dense), copy.deepcopy(dense)
        a = prune_model(big, spec, torch.zeros(1, 3, 96, 96))
        b = prune_model(small, spec, torch.zeros(1, 3, 32, 32), mac_size=(3, 96, 96))
        assert [e["after"] for e in a.layers] == [e["after"] for e in b.layers]
        assert count_macs(big, (3, 96, 96)) == count_macs(small, (3, 96, 96))
