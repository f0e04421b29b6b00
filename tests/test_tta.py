"""Flip test-time augmentation: each image scored by the mean of its logits and its mirror
image's, reported as top1_tta/top5_tta beside the plain top-1 (never in place of it)."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import torch.nn as nn

from pipeline.trainer import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


class LeftRight(nn.Module):
    """Class 0 scores the left half of the image, class 1 the right half, class 2 a constant:
    a flip swaps the first two logits, so the flip-averaged logits differ from the plain ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        left, right = x[..., : w // 2].mean((1, 2, 3)), x[..., w // 2:].mean((1, 2, 3))
        return torch.stack([left, right, torch.full_like(left, 0.3)], dim=1)


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        x = torch.rand(16, 3, 8, 8, generator=g)
        y = torch.randint(3, (16,), generator=g)
        out.append((x, y))
    return out


def hand_top1(logits_fn, data) -> float:
    hits = n = 0
    for x, y in data:
        hits += int((logits_fn(x).argmax(1) == y).sum())
        n += y.numel()
    return 100 * hits / n


def test_flip_tta_is_the_mean_of_the_logits_of_image_and_mirror():
    model, data = LeftRight(), batches()
    plain = evaluate(model, data, torch.device("cpu"), "fp32")
    tta = evaluate(model, data, torch.device("cpu"), "fp32", tta="flip")
    assert "top1_tta" not in plain
    # the plain numbers do not change with TTA on
    assert {k: tta[k] for k in plain} == plain
    assert plain["top1"] == pytest.approx(hand_top1(model, data))
    expected = hand_top1(lambda x: 0.5 * (model(x) + model(x.flip(-1))), data)
    assert tta["top1_tta"] == pytest.approx(expected)
    assert tta["top1_tta"] != pytest.approx(tta["top1"])  # the flip changes the answer
    assert tta["top5_tta"] == pytest.approx(100.0)  # 3 classes: all in the top 5


def test_flip_tta_of_a_mirror_symmetric_model_equals_plain_top1():
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))
    out = evaluate(model, batches(), torch.device("cpu"), "fp32", tta="flip")
    assert out["top1_tta"] == pytest.approx(out["top1"])


def test_tta_flip_in_a_run_goes_to_summary_metrics_compare_and_eval(tiny_config, cli,
                                                                     tmp_path):
    path = tiny_config({"stages": {"pretrain": {"epochs": 1, "tta": "flip"}}})
    code, out, _ = cli("run", path, "--dry-run")
    assert code == 0 and "flip TTA at evaluation" in out
    code, _, err = cli("run", path, "--stage", "pretrain")
    assert code == 0, err
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    s = json.loads((stage / "summary.json").read_text())
    assert 0 <= s["top1_tta"] <= 100 and 0 <= s["top5_tta"] <= 100
    rows = list(csv.DictReader(io.StringIO((stage / "metrics.csv").read_text())))
    assert float(rows[-1]["top1_tta"]) == pytest.approx(s["top1_tta"], abs=1e-4)
    assert float(rows[-1]["top1"]) == pytest.approx(s["top1"], abs=1e-4)
    code, out, err = cli("compare", tmp_path / "runs" / "tiny", "--format", "json",
                         "--out", tmp_path / "rep")
    assert code == 0, err
    row = next(r for r in json.loads(out) if r["stage"] == "pretrain")
    assert row["top1_tta"] == s["top1_tta"] and row["top1"] == s["top1"]
    md = (tmp_path / "rep" / "compare.md").read_text()
    assert "top-1 flip TTA (%)" in md and "top-1 (%)" in md
    code, out, err = cli("eval", stage, "--tta", "flip", "--format", "json")
    assert code == 0, err
    ev = json.loads(out)
    assert ev["top1"] == pytest.approx(s["top1"]) and ev["top1_tta"] == pytest.approx(
        s["top1_tta"])
