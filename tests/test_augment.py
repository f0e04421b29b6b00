"""ImageNet crop geometry of the DataLoader path, against hand-computed boxes: the eval view
(shorter side resized, aspect kept, centred crop) and the training RandomResizedCrop
(area and aspect bounds, the fallback for extreme shapes, the output cut from the box)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from pipeline.data.augment import Views, apply_views, resized_crop_box


def gradient(width: int, height: int) -> Image.Image:
    """Red = x, green = y, each 0-255 over the image: a resize keeps a linear ramp linear,
    so an output pixel's colour says where in the source image it was taken from."""
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.round(np.arange(width) * 255 / (width - 1))[None, :]
    a[..., 1] = np.round(np.arange(height) * 255 / (height - 1))[:, None]
    return Image.fromarray(a)


def expected_ramp(start: float, step: float, n: int, extent: int) -> np.ndarray:
    """The ramp value at the centres of n output pixels that cover the source from `start`
    in steps of `step` source pixels (source length `extent`)."""
    centres = start + (np.arange(n) + 0.5) * step - 0.5
    return centres * 255 / (extent - 1)


def views(train: bool, size: int = 32, resize: int = 40, scale_min: float = 0.08) -> Views:
    return Views(train, size, "resized", pad=0, flip=False, resize=resize, scale_min=scale_min)


# --------------------------------------------------------------------------- eval view


@pytest.mark.parametrize("width, height, resized, offset", [
    # landscape 150x120, shorter side 120 -> 40: 50x40 (aspect kept); 32 px crop at
    # left (50-32)/2 = 9, top (40-32)/2 = 4
    (150, 120, (50, 40), (9, 4)),
    # portrait 120x180 -> 40x60; crop at left 4, top (60-32)/2 = 14
    (120, 180, (40, 60), (4, 14)),
])
def test_eval_view_resizes_the_shorter_side_and_takes_the_centred_crop(
        width, height, resized, offset):
    out = apply_views(gradient(width, height), views(train=False), None)
    assert out.shape == (3, 32, 32)
    (rw, rh), (left, top) = resized, offset
    red = expected_ramp(left * width / rw, width / rw, 32, width)
    green = expected_ramp(top * height / rh, height / rh, 32, height)
    # one resized pixel off centre would be 5 levels off (3 source pixels of the ramp)
    assert np.abs(out[0].float().numpy() - red[None, :]).max() < 1.0
    assert np.abs(out[1].float().numpy() - green[:, None]).max() < 1.0


# --------------------------------------------------------------------------- training crop


def test_random_resized_crop_boxes_respect_the_area_and_aspect_bounds():
    width, height = 400, 300
    rng = random.Random(0)
    boxes = [resized_crop_box(rng, width, height, (0.08, 1.0)) for _ in range(2000)]
    areas, ratios = [], []
    for top, left, h, w in boxes:
        assert 0 <= top <= height - h and 0 <= left <= width - w  # inside the image
        areas.append(h * w / (width * height))
        ratios.append(w / h)
    # w and h are rounded to whole pixels: at the smallest box (about 98 px a side) that
    # moves the area by about 1% and the aspect by about 0.01
    assert 0.08 * 0.98 <= min(areas) and max(areas) <= 1.0
    assert 3 / 4 - 0.01 <= min(ratios) and max(ratios) <= 4 / 3 + 0.01
    # the draws cover the ranges, not one fixed box
    assert min(areas) < 0.1 and max(areas) > 0.9
    assert min(ratios) < 0.8 and max(ratios) > 1.25
    assert len(set(boxes)) > 1900


def test_random_resized_crop_falls_back_to_a_centred_box_of_allowed_aspect():
    # 1000x4: no box of 8% of the area (320 px) fits 4 rows at aspect <= 4/3, so the
    # fallback: the full height 4, width round(4 * 4/3) = 5, left (1000 - 5) // 2 = 497
    assert resized_crop_box(random.Random(0), 1000, 4, (0.08, 1.0)) == (0, 497, 4, 5)
    assert resized_crop_box(random.Random(0), 4, 1000, (0.08, 1.0)) == (497, 0, 5, 4)


@pytest.mark.parametrize("seed", range(8))
def test_training_view_is_the_drawn_box_resized_to_the_output_size(seed):
    width, height = 150, 120
    out = apply_views(gradient(width, height), views(train=True), random.Random(seed))
    assert out.shape == (3, 32, 32)
    top, left, h, w = resized_crop_box(random.Random(seed), width, height, (0.08, 1.0))
    red = expected_ramp(left, w / 32, 32, width)
    green = expected_ramp(top, h / 32, 32, height)
    # the outermost pixels see the box's edge (the filter is cut there): left out
    assert np.abs(out[0].float().numpy() - red[None, :])[:, 1:-1].max() < 1.5
    assert np.abs(out[1].float().numpy() - green[:, None])[1:-1, :].max() < 1.5
