"""Training recipe pieces (Bag of Tricks, He et al. 2019, and friends), each off by default.

Optimizers with or without weight decay on biases/BN, label smoothing, mixup and
cutmix with the loss on the mixed targets, knowledge distillation from a frozen
teacher, and a model EMA. The trainer composes them; each is tested on its own.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Invalid, opt
from .modes import freeze


@dataclass
class OptimizerConfig:
    name: Literal["sgd", "adamw"] = opt("sgd", "optimizer")
    momentum: float = opt(0.9, "SGD momentum", min=0, lt=1)
    nesterov: bool = opt(False, "SGD Nesterov momentum")
    weight_decay: float = opt(5e-4, "weight decay (L2 for SGD, decoupled for AdamW)", min=0)
    no_bias_decay: bool = opt(False, "no weight decay on biases and BN parameters (1-D tensors)")
    betas: list[float] = opt([0.9, 0.999], "AdamW betas", min=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon", gt=0)

    def validate(self) -> None:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise Invalid("nesterov", "needs momentum > 0")
        if len(self.betas) != 2:
            raise Invalid("betas", f"expected two values [beta1, beta2], got {self.betas}")


@dataclass
class DistillConfig:
    from_: str = opt(key="from", help="stage whose model is the teacher (kept frozen, eval mode)")
    temperature: float = opt(4.0, "softmax temperature T", gt=0)
    alpha: float = opt(0.5, "weight of the distillation term; 1 - alpha on the label loss",
                       min=0, max=1)


@dataclass
class SparsityConfig:
    l1_bn: float = opt(0.0, "network slimming (Liu et al. 2017): lambda of the L1 penalty on "
                       "every BatchNorm scale; its subgradient lambda * sign(gamma) is added "
                       "to the BN weight gradients after each backward (paper: 1e-4)", min=0)


def bn_scales(model: nn.Module) -> list[torch.Tensor]:
    """The scale (gamma) of every affine BatchNorm layer."""
    return [m.weight for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]


@torch.no_grad()
def add_l1_subgradient(scales: list[torch.Tensor], lam: float) -> None:
    """grad += lam * sign(gamma) on each scale: the subgradient of lam * sum |gamma|."""
    for w in scales:
        if w.grad is None:
            w.grad = lam * torch.sign(w)
        else:
            w.grad.add_(torch.sign(w), alpha=lam)


@torch.no_grad()
def mean_abs(scales: list[torch.Tensor]) -> float:
    """Mean |gamma| over every channel of the given scales (a host sync)."""
    total = sum(float(w.abs().sum()) for w in scales)
    return total / max(sum(w.numel() for w in scales), 1)


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool) -> list[dict]:
    """One group, or with `no_bias_decay` two: weights with decay, and every 1-D tensor
    (biases, BN/LayerNorm weights and biases) with weight decay 0 (Bag of Tricks sec. 3.1).
    Empty groups are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_bias_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, optionally Nesterov; L2 decay) or AdamW (decoupled decay)."""
    groups = param_groups(model, cfg.weight_decay, cfg.no_bias_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=fused or None)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                       smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy against hard labels (N,) or a soft target distribution (N, C)."""
    if target.ndim == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    if smoothing:
        target = target * (1 - smoothing) + smoothing / logits.shape[1]
    return torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without a host sync: CUDA copies go through pinned memory
    (asynchronous); a pageable copy would wait for the device."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup: float, cutmix: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), chosen with equal odds when
    both are on. Returns the mixed images and the mixed one-hot targets. A coefficient
    drawn from Beta(alpha, alpha); alpha 0 disables the method."""
    modes = [m for m, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0]
    onehot = F.one_hot(y, num_classes).to(torch.float32)
    if not modes:
        return x, onehot
    pick = int(torch.randint(len(modes), (1,), generator=generator))
    mode = modes[pick]
    alpha = mixup if mode == "mixup" else cutmix
    lam = _beta(alpha, generator)
    perm = to_device(torch.randperm(x.shape[0], generator=generator), x.device)
    if mode == "mixup":
        xm = lam * x + (1 - lam) * x[perm]
    else:
        h, w = x.shape[2], x.shape[3]
        cut = math.sqrt(1 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (1,), generator=generator))
        cx = int(torch.randint(w, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        xm = x.clone()
        xm[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return xm, lam * onehot + (1 - lam) * onehot[perm]


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) from two Gamma draws via a seeded generator (resume-exact)."""
    # torch's Gamma sampler has no generator argument; use numpy seeded from g
    import numpy as np

    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    rng = np.random.default_rng(seed)
    return float(rng.beta(alpha, alpha))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(softmax(teacher/T) || softmax(student/T)) * T^2.

    The T^2 keeps the soft term's gradient scale independent of T; the trainer mixes it
    as (1 - alpha) * label loss + alpha * this, so alpha 0 is plain training."""
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1),
                    reduction="batchmean") * T * T


class FrozenTeacher(nn.Module):
    """A distillation teacher pinned to eval mode (BN statistics and dropout frozen) whose
    forward never builds an autograd graph, whatever `.train()` calls reach it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = freeze(net)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x)


class ModelEMA:
    """Exponential moving average of the weights (evaluated and saved in place of the model).

    Parameters: ema = decay * ema + (1 - decay) * weights after every optimizer step.
    Buffers (BN running mean/var, counters, option-A channel maps) are copied, not averaged:
    the EMA weights are evaluated with the live model's statistics.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = freeze(copy.deepcopy(model))
        self._param_names = {k for k, _ in self.module.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        msd = model.state_dict()
        ema_p, src_p = [], []
        for k, v in self.module.state_dict().items():
            if k in self._param_names and v.is_floating_point():
                ema_p.append(v)
                src_p.append(msd[k].detach())
            else:
                v.copy_(msd[k])
        if ema_p:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd, strict=True)
