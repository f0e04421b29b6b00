"""Broken configs: each is exit code 2 and one error line naming the file and the key."""

from __future__ import annotations

import pytest

from conftest import TINY, deep_update

CASES = [
    # (description, update to the tiny config, text the error must contain)
    ("unknown top-level key", {"sed": 1}, ["sed", "did you mean 'seed'"]),
    ("unknown stage key", {"stages": {"pretrain": {"epochz": 3}}},
     ["stages.pretrain.epochz", "did you mean 'epochs'"]),
    ("wrong type", {"stages": {"pretrain": {"epochs": "ten"}}},
     ["stages.pretrain.epochs", "expected an integer"]),
    ("ratio out of range", {"stages": {"prune": {"ratio": 1.5}}}, ["stages.prune.ratio", "1.5"]),
    ("from names no stage", {"stages": {"finetune": {"from": "prun"}}},
     ["stages.finetune.from", "did you mean 'prune'"]),
    ("unknown stage type", {"stages": {"prune": {"type": "prunee"}}},
     ["stages.prune.type", "did you mean 'prune'"]),
    ("unknown architecture", {"model": {"arch": "resnet57"}}, ["model.arch", "resnet56"]),
    ("bad choice", {"data": {"dataset": "cifar11"}}, ["data.dataset", "cifar10"]),
    ("negative lr", {"stages": {"pretrain": {"lr": -0.1}}}, ["stages.pretrain.lr"]),
    ("zero batch", {"stages": {"pretrain": {"batch_size": 0}}},
     ["stages.pretrain.batch_size", ">= 1"]),
    ("unknown method", {"stages": {"prune": {"method": "fpgn"}}},
     ["stages.prune.method", "did you mean 'fpgm'"]),
    ("not a bool", {"data": {"download": "maybe"}}, ["data.download", "true/false"]),
    ("milestones decreasing", {"stages": {"pretrain": {"schedule": {"milestones": [2, 1]}}}},
     ["stages.pretrain.schedule.milestones", "increasing"]),
    ("unknown optimizer key", {"stages": {"pretrain": {"optimizer": {"momentun": 0.9}}}},
     ["stages.pretrain.optimizer.momentun", "did you mean 'momentum'"]),
    ("fp16 on the CPU", {"device": "cpu", "precision": "fp16"}, ["precision", "fp16"]),
    ("finetune without input", {"stages": {"finetune": {"from": None}}},
     ["stages.finetune.from", "needs an input"]),
    # found by the preflight, against the model the prune stage will get (resnet8: convs 1-7)
    ("skip numbers no conv", {"stages": {"prune": {"skip": [2, 99]}}},
     ["stages.prune.skip[1]: no conv numbered 99 (ResNet-8 has 1-7; see --dry-run)"]),
    ("include glob matches nothing", {"stages": {"prune": {"include": ["layer9.*"]}}},
     ["stages.prune.include[0]: 'layer9.*' matches no convolution", "layer1.0.conv1"]),
    ("layer_ratios key matches nothing", {"stages": {"prune": {"layer_ratios": {"lyer1.*": 0.5}}}},
     ["stages.prune.layer_ratios.lyer1.*", "matches no convolution"]),
    ("nothing left to prune", {"stages": {"prune": {"include": [1]}}},
     ["stages.prune.include: nothing to prune", "policy 'block_internal'"]),
    ("MAC target out of reach",
     {"stages": {"prune": {"ratio": None, "target_macs_reduction": 0.97}}},
     ["stages.prune.target_macs_reduction: 0.97 is out of reach", "ResNet-8"]),
    ("soft pruning skip numbers no conv",
     {"stages": {"pretrain": {"prune_during_training": {"ratio": 0.3, "skip": [8]}}}},
     ["stages.pretrain.prune_during_training.skip[0]: no conv numbered 8"]),
]


@pytest.mark.parametrize("desc,update,needles", CASES, ids=[c[0] for c in CASES])
def test_broken_config(desc, update, needles, tmp_path, cli):
    import yaml

    cfg = deep_update(TINY, update)
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, out, err = cli("run", path)
    assert code == 2, (desc, err)
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines()]
    assert len(lines) == 1, err
    assert str(path) in lines[0]
    for needle in needles:
        assert needle in lines[0], (desc, lines[0])
    assert not (tmp_path / "runs").exists(), "no work may start before validation"


def test_stage_referencing_a_later_stage(tmp_path, cli):
    import yaml

    cfg = deep_update(TINY, {"out_dir": str(tmp_path / "runs")})
    stages = cfg["stages"]
    cfg["stages"] = {"finetune": stages["finetune"], "pretrain": stages["pretrain"],
                     "prune": stages["prune"]}
    path = tmp_path / "order.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    code, _, err = cli("run", path)
    assert code == 2
    assert "stages.finetune.from" in err and "later stage" in err


@pytest.mark.parametrize("args,needle", [
    (["--set", "stages.pretrain.epochs"], "KEY=VALUE"),
    (["--set", "stages.pretrain.epoch=3"], "did you mean 'epochs'"),
    (["--set", "seed=[1"], "not valid YAML"),
    (["--stage", "finetun"], "did you mean 'finetune'"),
])
def test_bad_command_line(args, needle, tiny_config, cli):
    code, _, err = cli("run", tiny_config(), *args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_invalid_yaml_and_missing_file(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [unclosed\n")
    code, _, err = cli("run", bad)
    assert code == 2 and "invalid YAML" in err and "line" in err
    code, _, err = cli("run", tmp_path / "nope.yaml")
    assert code == 2 and "not found" in err


def test_missing_data_folder(tiny_config, cli, tmp_path):
    cfg = tiny_config({"data": {"dataset": "imagefolder", "root": str(tmp_path / "nodata")}})
    code, _, err = cli("run", cfg)
    assert code == 2
    assert str(tmp_path / "nodata") in err and len(err.strip().splitlines()) == 1


def test_dry_run_resolves_without_running(tiny_config, cli, tmp_path):
    import json

    code, out, err = cli("run", tiny_config(), "--dry-run", "--format", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert [s["name"] for s in plan["stages"]] == ["pretrain", "prune", "finetune"]
    assert not (tmp_path / "runs").exists()


def test_base_file_and_override(tmp_path, cli):
    import json

    import yaml

    base = deep_update(TINY, {"out_dir": str(tmp_path / "runs")})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    (tmp_path / "child.yaml").write_text(
        "base: base.yaml\nname: child\nstages:\n  pretrain:\n    epochs: 5\n")
    code, out, err = cli("run", tmp_path / "child.yaml", "--dry-run", "--format", "json",
                         "--set", "stages.finetune.epochs=3")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["name"] == "child"
    epochs = {s["name"]: s.get("epochs") for s in plan["stages"]}
    assert epochs["pretrain"] == 5 and epochs["finetune"] == 3


# --------------------------------------------------------------------------- bad inputs


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    return line


def _image_tree(root, classes=("ant", "bee"), per_class=4):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def _folder_config(tiny_config, root, **data):
    return tiny_config({"data": {"dataset": "imagefolder", "root": str(root), "synthetic": None,
                                 "image_size": 8, **data},
                        "stages": {"pretrain": {"epochs": 1, "batch_size": 4},
                                   "finetune": {"epochs": 1, "batch_size": 4}}})


def test_truncated_and_non_image_files(tiny_config, cli, tmp_path):
    root = _image_tree(tmp_path / "tree")
    good = (root / "train" / "ant" / "0.png").read_bytes()
    (root / "train" / "ant" / "0.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "train" / "bee" / "notes.jpg").write_text("not an image")
    code, _, err = cli("run", _folder_config(tiny_config, root, max_unreadable=0.0),
                       "--stage", "pretrain")
    assert code == 2
    line = _one_error_line(err)
    assert str(root / "train") in line and "unreadable image" in line
    assert not (tmp_path / "runs" / "tiny" / "pretrain" / "model.pt").exists()


def test_empty_class_folder(tiny_config, cli, tmp_path):
    root = _image_tree(tmp_path / "tree")
    (root / "train" / "cat").mkdir()
    code, _, err = cli("run", _folder_config(tiny_config, root))
    assert code == 2
    line = _one_error_line(err)
    assert str(root / "train" / "cat") in line and "no images" in line
    assert not (tmp_path / "runs").exists()  # found before any work


def test_pretrained_of_another_architecture(tiny_config, cli, tmp_path):
    import torch

    from pipeline import checkpoint as ckpt
    from pipeline.models import build_model

    other = build_model({"name": "resnet20", "num_classes": 4})
    ckpt.save_model(tmp_path / "r20.pt", other, {"name": "resnet20", "num_classes": 4})
    for args in ([], ["--dry-run"]):
        code, _, err = cli("run", tiny_config({"model": {"pretrained": str(tmp_path / "r20.pt")}}),
                           *args)
        assert code == 2, err
        line = _one_error_line(err)
        assert "model.pretrained" in line and str(tmp_path / "r20.pt") in line
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "junk.pth")
    code, _, err = cli("run", tiny_config({"model": {"pretrained": str(tmp_path / "junk.pth")}}))
    assert code == 2 and "model.pretrained" in _one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_model_pt_edited_by_hand(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1}}})
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    assert cli("run", cfg, "--stage", "prune")[0] == 0
    prune = tmp_path / "runs" / "tiny" / "prune"
    data = bytearray((prune / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte changed inside a tensor
    (prune / "model.pt").write_bytes(bytes(data))
    kept = {p: p.read_bytes() for d in ("pretrain", "prune")
            for p in (tmp_path / "runs" / "tiny" / d).iterdir() if p.is_file()}
    code, _, err = cli("run", cfg)
    assert code == 1
    line = _one_error_line(err)
    assert str(prune / "model.pt") in line and ("corrupt" in line or "unreadable" in line)
    assert {p: p.read_bytes() for p in kept} == kept  # completed stages untouched


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_config_whose_yaml_is_not_a_mapping(tmp_path, cli, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    code, _, err = cli("run", path)
    assert code == 2
    line = _one_error_line(err)
    assert str(path) in line and "expected a mapping" in line


def test_set_with_a_yaml_syntax_error(tiny_config, cli, tmp_path):
    code, _, err = cli("run", tiny_config(), "--set", "stages.prune.skip=[1, 2")
    assert code == 2
    line = _one_error_line(err)
    assert "--set stages.prune.skip" in line and "not valid YAML" in line
    assert not (tmp_path / "runs").exists()
