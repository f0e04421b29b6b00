"""Fake quantization for quantization-aware training (QAT), in eager mode so that the shared
Trainer trains the network as any other (AMP, DDP, resume, schedules, distillation).

Every Conv2d and Linear computes with its input rounded to the uint8 grid of a per-tensor
range (an exponential moving average of the batches' min and max, started from the
calibration set) and its weight rounded to int8 per output channel (symmetric, max |w| /
127): the scheme the backends write. The rounding passes gradients straight through
(the straight-through estimator). BatchNorm is not folded while training, and needs not be
for the weights: folding multiplies each output channel by one number, which a per-channel
symmetric grid follows exactly, so the int8 weights of the folded convolution are those the
training saw. The observer state is a buffer of the model (`<layer>.act_fq.lo/hi/seen`), so
checkpoints carry it and a resumed stage continues bitwise; `remove_fake_quant` restores the
plain network, whose state dict is the input model's.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

QMIN, QMAX = 0, 255  # activations: uint8, asymmetric
WMAX = 127  # weights: int8 symmetric in [-127, 127] (64 with a reduced range: 7 bits)
EPS = 2.0 ** -12


def act_qparams(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of the uint8 grid spanning [lo, hi] widened to include 0."""
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / (QMAX - QMIN), min=EPS)
    zero = torch.clamp(torch.round(QMIN - lo / scale), QMIN, QMAX).to(torch.int32)
    return scale.reshape(1), zero.reshape(1)


def fake_quant_weight(w: torch.Tensor, wmax: int = WMAX) -> torch.Tensor:
    """`w` rounded to int8 per output channel (dim 0), symmetric: scale max|w_c| / wmax."""
    scale = (w.detach().abs().flatten(1).amax(1) / wmax).clamp(min=EPS).float()
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -wmax,
                                                  wmax).to(w.dtype)


class ActFakeQuant(nn.Module):
    """uint8 per-tensor fake quantization of an activation. Training updates the range as an
    EMA of the batch min/max (`momentum`); `calibrating` widens it to the running min/max."""

    def __init__(self, momentum: float = 0.01):
        super().__init__()
        self.momentum = momentum
        self.calibrating = False
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        first = self.seen == 0
        if self.calibrating:
            new_lo, new_hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        else:
            m = self.momentum
            new_lo, new_hi = self.lo + m * (lo - self.lo), self.hi + m * (hi - self.hi)
        self.lo.copy_(torch.where(first, lo, new_lo))
        self.hi.copy_(torch.where(first, hi, new_hi))
        self.seen += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.calibrating:
            self._observe(x)
        scale, zero = act_qparams(self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, QMIN,
                                                     QMAX).to(x.dtype)


class QATConv2d(nn.Conv2d):
    """A Conv2d computing on fake-quantized input and weight (its class while QAT runs)."""

    act_fq: ActFakeQuant
    wmax: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quant_weight(self.weight, self.wmax)
        return self._conv_forward(self.act_fq(x), w, self.bias)


class QATLinear(nn.Linear):
    """A Linear computing on fake-quantized input and weight (its class while QAT runs)."""

    act_fq: ActFakeQuant
    wmax: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_fq(x), fake_quant_weight(self.weight, self.wmax), self.bias)


SWAPS = {nn.Conv2d: QATConv2d, nn.Linear: QATLinear}
PLAIN = {v: k for k, v in SWAPS.items()}


def attach_fake_quant(model: nn.Module, momentum: float = 0.01, wmax: int = WMAX) -> list[str]:
    """Make every Conv2d and Linear of `model` fake-quantized, in place (the parameters stay
    the same objects; weights on the grid [-wmax, wmax]); returns their names."""
    names = []
    for name, m in model.named_modules():
        qat = SWAPS.get(type(m))
        if qat is not None:
            m.__class__ = qat
            m.act_fq = ActFakeQuant(momentum)
            m.wmax = wmax
            names.append(name)
    return names


@torch.no_grad()
def calibrate_fake_quant(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Set every activation range to the min/max over `batches` (model in eval mode)."""
    fqs = [m for m in model.modules() if isinstance(m, ActFakeQuant)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for fq in fqs:
        fq.calibrating = True
        fq.seen.zero_()
    try:
        for x in batches:
            model(x.to(device))
    finally:
        for fq in fqs:
            fq.calibrating = False
        model.train(was_training)


def learned_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The activation range each fake-quantized layer's input trained with, by module name
    ({} for a model without fake quantization): what the int8 model should use for those
    inputs instead of ranges calibrated again."""
    out = {}
    for name, m in model.named_modules():
        fq = getattr(m, "act_fq", None)
        if isinstance(fq, ActFakeQuant) and int(fq.seen) > 0:
            out[name] = (float(fq.lo), float(fq.hi))
    return out


def remove_fake_quant(model: nn.Module) -> nn.Module:
    """The plain network again, in place: the fake-quantized layers back to Conv2d/Linear
    and their observers dropped."""
    for m in model.modules():
        plain = PLAIN.get(type(m))
        if plain is not None:
            del m.act_fq
            del m.wmax
            m.__class__ = plain
    return model


__all__ = ["ActFakeQuant", "QATConv2d", "QATLinear", "act_qparams", "fake_quant_weight",
           "attach_fake_quant", "calibrate_fake_quant", "learned_ranges", "remove_fake_quant"]
