"""data.val_split: a fixed, seeded, class-balanced hold-out of the training set, the same on
every run seed and loader path, disjoint from training; best epoch is chosen on it."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from pipeline.config import ConfigError, Loader
from pipeline.data import DataConfig, build_data
from pipeline.data.images import split_off
from pipeline.data.sizes import train_size

CPU = torch.device("cpu")


def cfg(**kw) -> DataConfig:
    return Loader("test.yaml").load(DataConfig, {**TINY["data"], **kw}, "data")


def image_rows(loader) -> set[bytes]:
    return {x[i].numpy().tobytes() for x, _ in loader for i in range(len(x))}


def test_split_off_is_class_balanced_disjoint_and_seeded():
    labels = torch.tensor([0, 1, 2] * 10)
    kept, held = split_off(labels, 6, seed=3)
    assert len(held) == 6 and len(kept) == 24
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(labels[held].tolist()) == [0, 0, 1, 1, 2, 2]
    assert torch.equal(split_off(labels, 6, seed=3)[1], held)
    assert not torch.equal(split_off(labels, 6, seed=4)[1], held)


def write_tree(root, per_class: int = 8) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 2)):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(count):
                arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / f"c{c}" / f"{i}.png")


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_val_split_is_held_out_and_the_same_for_every_run_seed(tmp_path, loader):
    write_tree(tmp_path)
    c = cfg(dataset="imagefolder", root=str(tmp_path), image_size=8, val_split=8,
            train_samples=20, loader=loader, num_workers=0, cache=False)
    a = build_data(c, 4, 64, seed=0, device=CPU)
    b = build_data(c, 4, 64, seed=5, device=CPU)
    assert (a.val.n, a.train.n, a.select_split) == (8, 20, "val")
    assert image_rows(a.train) != image_rows(b.train)  # train_samples follows the run seed
    va = image_rows(a.val)
    assert va == image_rows(b.val)  # the run seed does not move the split
    assert va.isdisjoint(image_rows(a.train))
    labels = torch.cat([y for _, y in a.val])
    assert torch.bincount(labels, minlength=4).tolist() == [2, 2, 2, 2]


def test_fraction_and_sizes_and_errors():
    assert build_data(cfg(val_split=0.25), 32, 64, 0, CPU).val.n == 24
    assert train_size(cfg(val_split=0.25))[0] == 72
    assert build_data(cfg(), 32, 64, 0, CPU).val is None
    with pytest.raises(ConfigError, match="val_split"):
        cfg(val_split=1.5)
    with pytest.raises(Exception, match="val_split: 96 holds out 96"):
        build_data(cfg(val_split=96), 32, 64, 0, CPU)


def test_best_epoch_is_chosen_on_the_validation_split(tmp_path, tiny_config, cli):
    path = tiny_config({"data": {"val_split": 16}, "stages": {"finetune": {"epochs": 2}}})
    code, _, err = cli("run", path)
    assert code == 0, err
    run = tmp_path / "runs/tiny"
    rows = list(csv.DictReader(open(run / "finetune/metrics.csv")))
    assert {"val_top1", "val_loss", "top1"} <= rows[0].keys()
    s = json.loads((run / "finetune/summary.json").read_text())
    best = max(range(len(rows)), key=lambda i: (float(rows[i]["val_top1"]), -i))
    assert s["best_split"] == "val" and s["best_epoch"] == best
    assert s["best_top1"] == pytest.approx(float(rows[best]["val_top1"]), abs=1e-4)
    prune = json.loads((run / "prune/summary.json").read_text())
    assert "val_top1" in prune and "top1" in prune
