"""The real CIFAR-10 through the published FPGM config, shrunk by --set overrides."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT


@pytest.mark.realdata
@pytest.mark.slow
def test_cifar10_fpgm_config_on_a_real_subset(cli, tmp_path, real_cifar10):
    overrides = [
        f"out_dir={tmp_path}", f"data.root={real_cifar10}", "data.download=false",
        "data.train_samples=3000", "data.test_samples=1000", "model.arch=resnet20",
        "stages.pretrain.epochs=1", "stages.pretrain.lr=0.05",
        "stages.finetune.epochs=1", "stages.finetune.lr=0.01",
    ]
    args = ["run", ROOT / "configs" / "cifar10_fpgm.yaml", "--progress", "off"]
    for o in overrides:
        args += ["--set", o]
    code, _, err = cli(*args)
    assert code == 0, err
    run_dir = tmp_path / "cifar10_fpgm"
    s = {n: json.loads((run_dir / n / "summary.json").read_text())
         for n in ("pretrain", "prune", "finetune")}
    assert s["prune"]["macs"] < s["pretrain"]["macs"]
    assert s["finetune"]["top1"] > 15.0, s["finetune"]  # chance is 10% on 10 classes
