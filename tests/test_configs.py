"""Every config in configs/ resolves, and matches the published setting it names.

Each runnable config is resolved through the CLI (`run CONFIG --dry-run --format json`) and
checked against its source: epochs, batch size, lr (and the lr at every epoch where it
changes), weight decay, warmup, recipe, pruning method and ratio. Base files (`*_base.yaml`)
are not runnable on their own and are skipped, after checking that they are refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline.models import build_model, count_macs, count_params
from pipeline.pruning import prune_model
from pipeline.runconfig import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
IMAGENET_TRAIN = 1281167


def runnable() -> list[str]:
    return sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("_base"))


def bases() -> list[str]:
    return sorted(p.name for p in CONFIGS.glob("*_base.yaml"))


def plan_of(cli, name: str, *overrides: str) -> dict:
    args = [a for o in overrides for a in ("--set", o)]
    code, out, err = cli("run", CONFIGS / name, "--dry-run", "--format", "json", *args)
    assert code == 0, err
    return json.loads(out)


def stage(plan: dict, name: str) -> dict:
    return next(s for s in plan["stages"] if s["name"] == name)


def lr_changes(s: dict) -> dict[int, float]:
    return {int(e): lr for e, lr in s["lr_by_epoch"].items()}


def expect_training(s: dict, *, epochs: int, batch: int, lr: float, wd: float,
                   momentum: float = 0.9, changes: dict[int, float] | None = None) -> None:
    assert (s["epochs"], s["batch_size"]) == (epochs, batch)
    assert s["lr"] == pytest.approx(lr)
    opt = s["optimizer"]
    assert opt["name"] == "sgd"
    assert opt["weight_decay"] == pytest.approx(wd)
    assert opt["momentum"] == pytest.approx(momentum)
    if changes is not None:
        got = lr_changes(s)
        assert got.keys() == changes.keys(), got
        for e, v in changes.items():
            assert got[e] == pytest.approx(v, rel=1e-6), (e, got[e], v)


def no_warmup(s: dict) -> None:
    assert s["schedule"]["warmup"]["type"] == "none"


def expect_prune(s: dict, method: str, ratio: float) -> None:
    assert (s["type"], s["method"]) == ("prune", method)
    assert s["ratio"] == pytest.approx(ratio)


# ---------------------------------------------------------------- one check per config


def check_smoke(cli) -> None:
    p = plan_of(cli, "smoke.yaml")
    assert p["data"]["dataset"] == "synthetic"
    assert [s["type"] for s in p["stages"]] == ["pretrain", "prune", "finetune"]
    assert sum(s.get("total_steps", 0) for s in p["stages"]) <= 40  # well under a minute


def check_quickstart(cli) -> None:
    p = plan_of(cli, "quickstart.yaml")
    assert p["data"]["dataset"] == "cifar10" and p["data"]["root"] == "data/cifar10"
    assert p["data"]["train_images"] == 45000  # most of the data, few epochs
    assert p["model"]["arch"] == "resnet20" and p["precision"] == "auto"
    cfg, _ = load_config(CONFIGS / "quickstart.yaml")
    assert cfg.data.download is True and cfg.data.test_samples == 2000
    pre, ft = stage(p, "pretrain"), stage(p, "finetune")
    # batch 128 at 0.3: twice the steps of batch 256 in the same 2 epochs (docs/results.md)
    expect_training(pre, epochs=2, batch=128, lr=0.3, wd=5e-4)
    assert pre["schedule"]["type"] == "cosine" and pre["decays_to_zero"]
    assert pre["recipe"]["label_smoothing"] == pytest.approx(0.1)
    expect_prune(stage(p, "prune"), "fpgm", 0.4)
    expect_training(ft, epochs=1, batch=256, lr=0.02, wd=5e-4)  # its own lr: pretrain ends at 0
    # under 5 minutes on 2 cores: ~580 img/s dense, ~720 pruned, ~40 s of decode, probes,
    # pruning and test passes
    seconds = pre["epochs"] * 45000 / 580 + ft["epochs"] * 45000 / 720 + 40
    assert seconds <= 300, "the quickstart must stay within 5 minutes on a 2-core CPU"


def check_cifar10_cpu_study(cli) -> None:
    p = plan_of(cli, "cifar10_cpu_study.yaml")
    assert p["data"]["dataset"] == "cifar10" and p["model"]["arch"] == "resnet20"
    # Scratch-B lives in cifar10_cpu_study_scratch.yaml (it alone costs 1.8x the pretrain)
    assert [s["type"] for s in p["stages"]] == ["pretrain", "prune", "finetune", "prune",
                                                "finetune"]
    assert p["precision"] == "auto"
    pre = stage(p, "pretrain")
    expect_training(pre, epochs=45, batch=256, lr=0.2, wd=5e-4)  # 0.1 per 128, scaled
    assert pre["precision"] == "auto" and pre["optimizer"]["nesterov"]
    w = pre["schedule"]["warmup"]
    assert pre["schedule"]["type"] == "cosine" and (w["type"], w["epochs"]) == ("gradual", 1)
    assert pre["recipe"]["label_smoothing"] == pytest.approx(0.1)
    assert pre["recipe"]["mixup"] == pre["recipe"]["cutmix"] == 0  # the paper's augmentation
    expect_prune(stage(p, "prune_fpgm"), "fpgm", 0.4)
    expect_prune(stage(p, "prune_l1"), "l1", 0.4)
    for name in ("prune_fpgm", "prune_l1"):  # widths 8/16/40: multiples of 8, MACs -45%
        assert (stage(p, name)["round_to"], stage(p, name)["round_mode"]) == (8, "nearest")
    for ft in ("finetune_fpgm", "finetune_l1"):
        expect_training(stage(p, ft), epochs=5, batch=256, lr=0.02, wd=5e-4)
    for s in (pre, stage(p, "finetune_fpgm"), stage(p, "finetune_l1")):
        assert s["optimizer"]["no_bias_decay"] and s["precision"] == "auto"
    assert pre["eval_every"] == 5
    cfg, _ = load_config(CONFIGS / "cifar10_cpu_study.yaml")
    assert all(cfg.stages[n].channels_last for n in ("pretrain", "finetune_fpgm", "finetune_l1"))
    # the 90-minute budget of the header: 92 s per dense epoch, 150 s per finetune epoch pair
    assert 92 * pre["epochs"] + 150 * 5 + 60 <= 90 * 60


def check_cifar10_cpu_study_scratch(cli) -> None:
    p = plan_of(cli, "cifar10_cpu_study_scratch.yaml")
    study = plan_of(cli, "cifar10_cpu_study.yaml")
    assert [s["name"] for s in p["stages"]] == ["pretrain", "prune_fpgm", "scratch_b"]
    # the study's pretrained model, passed on untrained, and the study's pruning
    assert p["model"]["pretrained"] == "checkpoints/cifar10_cpu_study/pretrain/model.pt"
    assert stage(p, "pretrain")["epochs"] == 0
    assert stage(p, "prune_fpgm") == stage(study, "prune_fpgm")
    sb, pre = stage(p, "scratch_b"), stage(study, "pretrain")
    assert sb["budget"] == "B" and sb["from"] == "prune_fpgm"
    # Scratch-B: the study's pretrain recipe and epochs (x the MACs ratio at run time)
    for key in ("epochs", "batch_size", "lr", "optimizer", "lr_by_epoch", "recipe",
                "eval_every", "precision"):
        assert sb[key] == pre[key], key
    assert sb["schedule"]["description"] == pre["schedule"]["description"]


def check_cifar10_recovery(cli) -> None:
    p = plan_of(cli, "cifar10_recovery.yaml")
    assert [s["name"] for s in p["stages"]] == ["pretrain", "prune", "finetune", "lr_rewind",
                                                "weight_rewind", "scratch_b", "iterative_agp"]
    ref = plan_of(cli, "cifar10_fpgm.yaml")
    # the dense model and pruning of cifar10_fpgm.yaml
    assert stage(p, "prune") == stage(ref, "prune")
    for key in ("epochs", "batch_size", "lr", "optimizer", "lr_by_epoch", "recipe"):
        assert stage(p, "pretrain")[key] == stage(ref, "pretrain")[key], key
    assert p["data"]["train_images"] == 45000  # 5,000 held out for validation
    expect_training(stage(p, "finetune"), epochs=40, batch=128, lr=0.001, wd=5e-4,
                   changes={0: 0.001})
    lr_rw, w_rw = stage(p, "lr_rewind"), stage(p, "weight_rewind")
    # the second half of 300 epochs, x0.1 at 150 and 225: 0.01 for 75 epochs, then 0.001
    for s in (lr_rw, w_rw):
        assert s["epochs"] == 150 and s["replay_start_epoch"] == 150
        assert s["replayed_lr"] == pytest.approx([0.01] * 75 + [0.001] * 75)
    assert (lr_rw["mode"], w_rw["mode"], w_rw["rewind_epoch"]) == ("lr", "weights", 150)
    sb = stage(p, "scratch_b")
    assert sb["budget"] == "B" and sb["epochs"] == 300
    it = stage(p, "iterative_agp")
    assert (it["pruning_schedule"], it["rounds"], it["finetune_epochs"]) == ("agp", 5, 8)
    assert it["ratio"] == pytest.approx(0.4) and it["lr"] == pytest.approx(0.001)
    assert it["amounts"] == pytest.approx([0.4 - 0.4 * (1 - t / 5) ** 3 for t in range(1, 6)])


def expect_cpu_study_recipe(pre: dict, study: dict, epochs: int) -> None:
    """The CPU study's pretrain recipe (lr, batch, optimizer, schedule and warmup kind) over
    `epochs` epochs: the configs sized for 2 hours keep the study's 19-epoch shape."""
    ref = stage(study, "pretrain")
    assert pre["epochs"] == epochs
    assert (pre["batch_size"], pre["lr"]) == (ref["batch_size"], ref["lr"])
    assert pre["optimizer"]["name"] == ref["optimizer"]["name"]
    assert pre["optimizer"]["nesterov"] == ref["optimizer"]["nesterov"]
    assert pre["schedule"]["type"] == ref["schedule"]["type"] == "cosine"
    assert pre["schedule"]["warmup"]["type"] == ref["schedule"]["warmup"]["type"]
    assert pre["recipe"]["label_smoothing"] == ref["recipe"]["label_smoothing"]


def check_cifar10_cpu_recovery(cli) -> None:
    p = plan_of(cli, "cifar10_cpu_recovery.yaml")
    assert p["model"]["arch"] == "resnet20" and p["data"]["train_images"] == 45000
    pre = stage(p, "pretrain")
    expect_cpu_study_recipe(pre, plan_of(cli, "cifar10_cpu_study.yaml"), epochs=19)
    assert (stage(p, "prune")["round_to"], stage(p, "prune")["round_mode"]) == (8, "nearest")
    expect_training(stage(p, "finetune"), epochs=10, batch=256, lr=0.02, wd=5e-4)
    sched = [pre["lr_by_epoch"].get(str(e)) for e in range(9, 19)]
    for name in ("lr_rewind", "weight_rewind"):
        s = stage(p, name)
        assert s["epochs"] == 10 and s["replayed_lr"] == pytest.approx(sched)
    it = stage(p, "iterative_agp")
    assert (it["rounds"], it["finetune_epochs"], it["lr"]) == (5, 2, 0.01)
    assert stage(p, "scratch_b")["budget"] == "B"


def check_cifar10_cpu_sensitivity(cli) -> None:
    p = plan_of(cli, "cifar10_cpu_sensitivity.yaml")
    assert [s["type"] for s in p["stages"]] == ["pretrain", "sensitivity", "sensitivity",
                                                "prune"]
    expect_cpu_study_recipe(stage(p, "pretrain"), plan_of(cli, "cifar10_cpu_study.yaml"),
                            epochs=19)
    assert p["data"]["train_images"] == 45000
    for name, method in (("sens_fpgm", "fpgm"), ("sens_l1", "l1")):
        s = stage(p, name)
        assert s["method"] == method and s["split"] == "val"
        assert s["ratios"] == pytest.approx([0.1 * k for k in range(1, 10)])
    assert stage(p, "prune_suggested")["layer_ratios_from"] == "sens_fpgm"


def check_cifar10_fpgm(cli) -> None:
    p = plan_of(cli, "cifar10_fpgm.yaml")
    assert (p["model"]["arch"], p["model"]["shortcut"]) == ("resnet56", "A")
    pre = stage(p, "pretrain")
    # FPGM code: 300 epochs, batch 128, lr 0.1, x0.1 at 150 and 225, wd 5e-4, momentum 0.9
    expect_training(pre, epochs=300, batch=128, lr=0.1, wd=5e-4,
                   changes={0: 0.1, 150: 0.01, 225: 0.001})
    no_warmup(pre)
    expect_prune(stage(p, "prune"), "fpgm", 0.4)
    assert stage(p, "prune")["policy"] == "block_internal"
    ft = stage(p, "finetune")
    expect_training(ft, epochs=40, batch=128, lr=0.001, wd=5e-4, changes={0: 0.001})
    assert ft["lr_source"] == "lowest lr of 'pretrain'"


def expect_quantize(p: dict, ptq: str, qat: str, source: str) -> None:
    """The int8 pair of a config: PTQ and QAT of `source` with onnxruntime, per-channel
    int8 from 16 x 32 training images, the issue's tolerances (1.0 and 0.5 points)."""
    for name, method, drop in ((ptq, "ptq", 1.0), (qat, "qat", 0.5)):
        s = stage(p, name)
        q = s["quantize"]
        assert (s["type"], s["from"], q["method"], q["backend"]) == (
            "quantize", source, method, "onnxruntime")
        assert q["calibration"] == {"split": "train", "batches": 16, "batch_size": 32,
                                    "images": 512}
        assert q["verify"]["max_top1_drop"] == pytest.approx(drop)
        assert q["verify"]["images"] == 1000 and q["artifact"] == "model.int8.onnx"


def check_cifar10_fpgm_int8(cli) -> None:
    p = plan_of(cli, "cifar10_fpgm_int8.yaml")
    ref = plan_of(cli, "cifar10_fpgm.yaml")
    assert [s["name"] for s in p["stages"]] == ["pretrain", "prune", "finetune", "quantize",
                                                "quantize_qat"]
    for name in ("pretrain", "prune", "finetune"):  # cifar10_fpgm.yaml's chain, unchanged
        assert stage(p, name) == stage(ref, name)
    expect_quantize(p, "quantize", "quantize_qat", "finetune")
    qat = stage(p, "quantize_qat")
    # QAT: 3 epochs at the finetune's lr (the lowest upstream, 0.001), cosine; KD from dense
    assert qat["epochs"] == 3 and qat["lr"] == pytest.approx(0.001)
    assert qat["lr_source"] == "lowest lr of 'finetune'" and qat["schedule"]["type"] == "cosine"
    assert qat["recipe"]["distill"]["from"] == "pretrain"


def check_cifar10_cpu_fpgm_int8(cli) -> None:
    p = plan_of(cli, "cifar10_cpu_fpgm_int8.yaml")
    study = plan_of(cli, "cifar10_cpu_study.yaml")
    assert [s["name"] for s in p["stages"]] == ["pretrain", "prune", "finetune", "quantize",
                                                "quantize_qat"]
    assert p["model"]["arch"] == "resnet20" and p["data"]["train_images"] == 45000  # val 5000
    pre = stage(p, "pretrain")
    expect_cpu_study_recipe(pre, study, epochs=30)
    for key in ("method", "ratio", "policy", "round_to", "round_mode"):
        assert stage(p, "prune")[key] == stage(study, "prune_fpgm")[key]
    expect_training(stage(p, "finetune"), epochs=5, batch=256, lr=0.02, wd=5e-4)
    expect_quantize(p, "quantize", "quantize_qat", "finetune")
    expect_training(stage(p, "quantize_qat"), epochs=2, batch=256, lr=0.002, wd=5e-4)


def check_cifar10_fpgm_scratch(cli) -> None:
    p = plan_of(cli, "cifar10_fpgm_scratch.yaml")
    assert [s["name"] for s in p["stages"]] == ["pretrain", "prune", "scratch"]
    ref = plan_of(cli, "cifar10_fpgm.yaml")
    # the same dense model and pruning as cifar10_fpgm.yaml: one setting in one place
    for name in ("pretrain", "prune"):
        assert stage(p, name) == stage(ref, name)
    sc = stage(p, "scratch")
    assert (sc["type"], sc["from"], sc["budget"]) == ("scratch", "prune", "B")
    expect_training(sc, epochs=300, batch=128, lr=0.1, wd=5e-4,
                   changes={0: 0.1, 150: 0.01, 225: 0.001})


def check_cifar10_l1(cli) -> None:
    p = plan_of(cli, "cifar10_l1.yaml")
    assert p["model"]["arch"] == "resnet56"
    # the dense training of the Rethinking code: batch 64, 160 epochs, x0.1 at 50% / 75%
    expect_training(stage(p, "pretrain"), epochs=160, batch=64, lr=0.1, wd=1e-4,
                   changes={0: 0.1, 80: 0.01, 120: 0.001})
    pr = stage(p, "prune")
    assert (pr["method"], pr["policy"]) == ("l1", "block_internal")
    # Li et al.: retrain 40 epochs at a constant 0.001
    expect_training(stage(p, "finetune"), epochs=40, batch=64, lr=0.001, wd=1e-4,
                   changes={0: 0.001})
    # ResNet-56-pruned-B: skip layers 16/18/20/34/38/54, 60/30/10% by stage -> the paper's
    # widths (6/22/57 filters kept), 9.09E7 FLOPs (27.6% fewer) and 7.3E5 parameters
    model, layers = pruned(CONFIGS / "cifar10_l1.yaml")
    widths = {n: (b, a) for n, b, a in layers}
    skipped = {"layer1.7.conv1", "layer1.8.conv1", "layer2.0.conv1", "layer2.7.conv1",
               "layer3.0.conv1", "layer3.8.conv1"}
    assert len(widths) == 27 - len(skipped) and not skipped & widths.keys()
    for name, (before, after) in widths.items():
        share = {16: 0.6, 32: 0.3, 64: 0.1}[before]
        assert after == int(before * (1 - share)), name  # the paper's count
    macs = count_macs(model, (3, 32, 32))["total"]
    assert macs == pytest.approx(9.09e7, rel=2e-3)
    assert f"{1 - macs / 125_485_696:.3f}" == "0.276"
    assert f"{count_params(model):.2E}" == "7.36E+05"  # the paper: 7.3E5, 13.7% fewer
    cfg, _ = load_config(CONFIGS / "cifar10_l1.yaml")
    assert cfg.stages["prune"].skip == [16, 18, 20, 34, 38, 54]  # the paper's layer numbers


def check_cifar10_vgg16_l1(cli) -> None:
    p = plan_of(cli, "cifar10_vgg16_l1.yaml")
    assert p["model"]["arch"] == "vgg16_l1"  # BN, two-layer classifier: the paper's VGG-16
    expect_training(stage(p, "pretrain"), epochs=160, batch=64, lr=0.1, wd=1e-4,
                   changes={0: 0.1, 80: 0.01, 120: 0.001})
    expect_prune(stage(p, "prune"), "l1", 0.5)
    expect_training(stage(p, "finetune"), epochs=40, batch=64, lr=0.001, wd=1e-4,
                   changes={0: 0.001})
    # VGG-16-pruned-A: 50% of conv_1 and conv_8..conv_13 -> 2.06E8 FLOPs (34.2% fewer)
    model, layers = pruned(CONFIGS / "cifar10_vgg16_l1.yaml")
    assert sorted(b for _, b, _ in layers) == [64] + [512] * 6
    assert all(a == b // 2 for _, b, a in layers)
    macs = count_macs(model, (3, 32, 32))["total"]
    assert f"{macs:.2E}" == "2.06E+08"
    assert f"{count_params(model):.1E}" == "5.4E+06"  # the paper: 5.4E6 (64.0% fewer)


def check_cifar10_slimming(cli) -> None:
    p = plan_of(cli, "cifar10_slimming.yaml")
    assert p["model"]["arch"] == "vgg19"  # the slimming code's CIFAR VGG-19, one classifier
    pre = stage(p, "pretrain")
    expect_training(pre, epochs=160, batch=64, lr=0.1, wd=1e-4,
                   changes={0: 0.1, 80: 0.01, 120: 0.001})
    assert pre["recipe"]["l1_bn"] == pytest.approx(1e-4)  # sparsity training, lambda 1e-4
    pr = stage(p, "prune")
    expect_prune(pr, "bn_scale", 0.7)
    assert pr["global_ranking"] is True  # one global threshold
    ft = stage(p, "finetune")
    expect_training(ft, epochs=160, batch=64, lr=0.1, wd=1e-4,
                   changes={0: 0.1, 80: 0.01, 120: 0.001})
    assert ft["recipe"]["l1_bn"] == 0.0
    # 70% of all channels by one |gamma| threshold: with the 0.5 init every gamma ties, so
    # the count is what is checked (5,504 channels, 3,852 removed, every layer keeps one)
    model, layers = pruned(CONFIGS / "cifar10_slimming.yaml")
    before = sum(b for _, b, _ in layers)
    assert sum(b - a for _, b, a in layers) == int(0.7 * 5504) and before <= 5504
    assert all(a >= 1 for _, _, a in layers)


def check_imagenet_resnet50_fpgm(cli) -> None:
    p = plan_of(cli, "imagenet_resnet50_fpgm.yaml")
    assert (p["data"]["dataset"], p["data"]["root"]) == ("imagefolder", "data/imagenet")
    assert p["model"]["arch"] == "resnet50"
    pre = stage(p, "pretrain")
    # FPGM ImageNet: 100 epochs, batch 256, lr 0.1 x0.1 every 30, wd 1e-4
    expect_training(pre, epochs=100, batch=256, lr=0.1, wd=1e-4,
                   changes={0: 0.1, 30: 0.01, 60: 0.001, 90: 1e-4})
    assert (pre["schedule"]["type"], pre["schedule"]["step_size"]) == ("step", 30)
    no_warmup(pre)
    expect_prune(stage(p, "prune"), "fpgm", 0.3)
    cfg, _ = load_config(CONFIGS / "imagenet_resnet50_fpgm.yaml")
    assert cfg.stages["prune"].skip_downsample is True
    assert cfg.model.pretrained is None  # optional local weights, documented in the file
    # finetune at the lowest lr of the original schedule, 20 epochs
    expect_training(stage(p, "finetune"), epochs=20, batch=256, lr=1e-4, wd=1e-4,
                   changes={0: 1e-4})
    # the documented way to start from local pretrained weights resolves
    q = plan_of(cli, "imagenet_resnet50_fpgm.yaml", "model.pretrained=weights/r50.pth",
                "stages.pretrain.epochs=1", "stages.pretrain.lr=0.001")
    assert q["model"]["pretrained"] == "weights/r50.pth"
    assert stage(q, "finetune")["lr"] == pytest.approx(0.001)


def check_imagenet_resnet18(cli) -> None:
    p = plan_of(cli, "imagenet_resnet18.yaml")
    assert (p["model"]["arch"], p["data"]["dataset"]) == ("resnet18", "imagefolder")
    # PyTorch example: 90 epochs, batch 256, lr 0.1, x0.1 at 30 and 60, wd 1e-4
    expect_training(stage(p, "pretrain"), epochs=90, batch=256, lr=0.1, wd=1e-4,
                   changes={0: 0.1, 30: 0.01, 60: 0.001})
    expect_prune(stage(p, "prune"), "fpgm", 0.3)
    expect_training(stage(p, "finetune"), epochs=20, batch=256, lr=0.001, wd=1e-4)


def check_imagenet_resnet50_goyal(cli) -> None:
    p = plan_of(cli, "imagenet_resnet50_goyal.yaml")
    cfg, _ = load_config(CONFIGS / "imagenet_resnet50_goyal.yaml")
    assert cfg.model.arch == "resnet50" and cfg.model.zero_init_residual is True
    base = stage(p, "pretrain")
    assert base["batch_size"] == 256 and base["lr"] == pytest.approx(0.1)  # the reference
    assert base["optimizer"]["no_bias_decay"] is True
    # the paper's headline: batch 8192 -> lr 0.1 x 8192 / 256 = 3.2 after a 5-epoch
    # gradual warmup from 0.1, per iteration; then x0.1 at 30, 60, 80 of 90 epochs
    big = stage(plan_of(cli, "imagenet_resnet50_goyal.yaml",
                        "stages.pretrain.batch_size=8192"), "pretrain")
    spe = math.ceil(IMAGENET_TRAIN / 8192)
    expect_training(big, epochs=90, batch=8192, lr=3.2, wd=1e-4)
    assert big["steps_per_epoch"] == spe
    warm = big["schedule"]["warmup"]
    assert (warm["type"], warm["epochs"], warm["steps"]) == ("gradual", 5, 5 * spe)
    assert warm["start_lr"] == pytest.approx(0.1) and warm["target_lr"] == pytest.approx(3.2)
    keys = {k["step"]: k["lr"] for k in big["lr_key_steps"]}
    w = 5 * spe
    assert keys[0] == pytest.approx(0.1)
    assert keys[w - 1] == pytest.approx(0.1 + 3.1 * (w - 1) / w)  # per iteration, not epoch
    assert keys[w] == pytest.approx(3.2)
    changes = lr_changes(big)
    for e in range(5):  # the ramp seen at epoch starts: linear in the iteration count
        assert changes[e] == pytest.approx(0.1 + 3.1 * e / 5, rel=1e-6)
    assert {e: changes[e] for e in (5, 30, 60, 80)} == pytest.approx(
        {5: 3.2, 30: 0.32, 60: 0.032, 80: 0.0032})
    assert max(changes) == 80


def check_imagenet_resnet50_tricks(cli) -> None:
    p = plan_of(cli, "imagenet_resnet50_tricks.yaml")
    cfg, _ = load_config(CONFIGS / "imagenet_resnet50_tricks.yaml")
    assert cfg.model.arch == "resnet50" and cfg.model.zero_init_residual is True
    s = stage(p, "pretrain")
    # batch 1024, lr 0.1 x 1024 / 256 = 0.4, 120 epochs, cosine, 5-epoch warmup from 0
    expect_training(s, epochs=120, batch=1024, lr=0.4, wd=1e-4)
    assert s["lr_source"].startswith("linear scaling")
    assert s["schedule"]["type"] == "cosine"
    warm = s["schedule"]["warmup"]
    assert (warm["type"], warm["epochs"], warm["start_lr"]) == ("gradual", 5, 0.0)
    assert lr_changes(s)[5] == pytest.approx(0.4)
    assert s["optimizer"]["no_bias_decay"] is True
    assert s["recipe"]["label_smoothing"] == pytest.approx(0.1)
    assert s["recipe"]["mixup"] == pytest.approx(0.2)
    assert s["precision"] == "fp16"


CHECKS = {f"{name[len('check_'):]}.yaml": fn for name, fn in globals().items()
          if name.startswith("check_") and callable(fn)}


def pruned(path: Path) -> tuple[torch.nn.Module, list[tuple[str, int, int]]]:
    """The dense network of a config pruned by its prune stage: (model, [(layer, before,
    after)])."""
    cfg, _ = load_config(path)
    model = build_model({"name": cfg.model.arch, "num_classes": 10,
                         "shortcut": cfg.model.shortcut})
    report = prune_model(model, cfg.stages["prune"], torch.zeros(1, 3, 32, 32))
    return model, [(r["name"], r["before"], r["after"]) for r in report.layers]


# ---------------------------------------------------------------- tests


def test_every_runnable_config_has_a_source_check():
    assert set(runnable()) == set(CHECKS), "add a check_<config> for every config"


@pytest.mark.parametrize("name", runnable())
def test_config_matches_its_source(name, cli):
    CHECKS[name](cli)


@pytest.mark.parametrize("name", [n for n in runnable() if n not in ("smoke.yaml",)])
def test_config_opens_with_its_source(name):
    head = (CONFIGS / name).read_text().split("\n\n")[0]
    assert head.startswith("# ")
    if name != "quickstart.yaml":
        assert "# Source:" in (CONFIGS / name).read_text()
        assert "# Aims at:" in (CONFIGS / name).read_text()


@pytest.mark.parametrize("name", bases())
def test_base_files_are_not_runnable_alone(name, cli):
    code, _, err = cli("run", CONFIGS / name, "--dry-run")
    assert code == 2 and ("name" in err or "stages" in err)
    used = [p for p in CONFIGS.glob("*.yaml") if f"base: {name}" in p.read_text()]
    assert used, f"{name} is extended by no config"
