"""benchmarks/vs_torch_pruning.py: the torchvision-format copy it writes for Torch-Pruning's
script holds exactly the ImageFolder tree's images and labels, and a missing checkout skips."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import torchvision.datasets.cifar
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]


def load_script():
    spec = importlib.util.spec_from_file_location(
        "vs_torch_pruning", ROOT / "benchmarks" / "vs_torch_pruning.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pickles_hold_the_folder_images_in_torchvision_layout(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    pixels = {}
    for split, n in (("train", 3), ("test", 1)):
        for c in CLASSES:
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / "tree" / split / c / f"{i}.png")
                pixels[(split, c, i)] = img
    mod = load_script()
    mod.write_torchvision_pickles(tmp_path / "tree", tmp_path / "torchdata", quick=False)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda path, md5=None: Path(path).is_file())  # as the wrapper does
    train = torchvision.datasets.CIFAR10(str(tmp_path / "torchdata"), train=True)
    test = torchvision.datasets.CIFAR10(str(tmp_path / "torchdata"), train=False)
    assert (len(train), len(test)) == (30, 10) and train.classes == CLASSES
    # HWC uint8 as torchvision hands them out, equal to the PNGs (lossless), labels in order
    got = {(CLASSES[t], bytes(x)) for x, t in zip(train.data, train.targets, strict=True)}
    want = {(c, bytes(pixels[("train", c, i)])) for c in CLASSES for i in range(3)}
    assert got == want
    assert sorted(test.targets) == list(range(10))


def test_missing_checkout_skips_with_a_message(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_torch_pruning.py"),
                          str(tmp_path / "nothing")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("skipped: ")
    assert "reproduce/main.py" in out.stdout
