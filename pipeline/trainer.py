"""The one trainer every training stage (pretrain, finetune, scratch) runs through.

Read top to bottom: `TrainConfig` (what a stage may set), then `Trainer.fit()`: set up
(model on device, DDP, optimizer, schedule), resume from `last.pt` if present, then the
epoch loop (train steps, evaluation, metrics row, checkpoints).

Invariants:
  * the lr is a pure function of the global step (`pipeline.schedules`);
  * no host sync per step: loss sums and correct counts accumulate on the device and
    are read once per log interval / epoch;
  * a checkpoint holds everything exact resume needs, the data position included;
    `last.pt` is replaced atomically, so a crash never leaves a half-written file;
  * only rank 0 writes files.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as D
from .config import opt
from .recipes import (DistillConfig, ModelEMA, OptimizerConfig, build_optimizer,
                      distillation_loss, mix_batch, soft_cross_entropy)
from .schedules import LinearScaling, Schedule, ScheduleConfig

log = logging.getLogger("pipeline")

Precision = Literal["fp32", "bf16", "fp16"]
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "top1", "top5", "seconds"]


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...): one line, the last good checkpoint kept."""


@dataclass
class TrainConfig:
    epochs: int = opt(1, "training epochs", min=1)
    batch_size: int = opt(128, "global batch size (split across DDP ranks)", min=1)
    eval_batch_size: int | None = opt(None, "evaluation batch (default: max(batch_size, 256))",
                                      min=1)
    lr: float | LinearScaling | None = opt(
        None, "peak lr, or {base, per_batch} for the linear scaling rule; "
        "pretrain/scratch default 0.1, finetune default the lowest lr upstream", min=0)
    optimizer: OptimizerConfig = opt(OptimizerConfig, "optimizer settings")
    schedule: ScheduleConfig = opt(ScheduleConfig, "lr schedule (pure function of the step)")
    precision: Precision | None = opt(None, "fp32 | bf16 | fp16 (default: the run's precision)")
    grad_clip: float | None = opt(None, "clip the gradient norm to this value", gt=0)
    label_smoothing: float = opt(0.0, "label smoothing epsilon", min=0, lt=1)
    mixup: float = opt(0.0, "mixup alpha (0 = off)", min=0)
    cutmix: float = opt(0.0, "cutmix alpha (0 = off)", min=0)
    ema_decay: float | None = opt(None, "keep an EMA of the weights with this decay; the EMA "
                                  "is evaluated and saved", gt=0, lt=1)
    distill: DistillConfig | None = opt(None, "knowledge distillation from an earlier stage")
    channels_last: bool = opt(False, "NHWC memory format")
    compile: bool = opt(False, "torch.compile the model (after pruning; uncompiled one saved)")
    sync_bn: bool = opt(False, "SyncBatchNorm under DDP")
    checkpoint_every_steps: int | None = opt(None, "also save last.pt every N steps", min=1)
    log_interval: int = opt(50, "steps between progress updates and non-finite checks", min=1)

    def resolved_lr(self, default: float) -> float:
        if self.lr is None:
            return default
        if isinstance(self.lr, LinearScaling):
            return self.lr.resolve(self.batch_size)
        return float(self.lr)


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_context(device: torch.device, precision: str):
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state() -> dict:
    state = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
             "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32),
                         state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str) -> dict:
    """Top-1/top-5/loss over the whole test set, summed across ranks without duplicates."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        with autocast_context(device, precision):
            logits = model(x)
        logits = logits.float()
        sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y.view(-1, 1))
        sums[1] += hit[:, :1].sum()
        sums[2] += hit.sum()
        sums[3] += y.numel()
    D.all_reduce_sum(sums)
    model.train(was_training)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1)
    return {"test_loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n}


class Trainer:
    """Trains `model` under `cfg`, writing checkpoints and metrics into `out_dir`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, data, out_dir: Path, *,
                 arch: dict, device: torch.device, dist: D.DistInfo, seed: int,
                 precision: str, base_lr: float, num_classes: int,
                 teacher: nn.Module | None = None, meta: dict | None = None,
                 show_progress: bool | None = None, tensorboard: bool = False,
                 epoch_end_hooks: list | None = None):
        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.arch, self.device, self.dist, self.seed = arch, device, dist, seed
        self.precision, self.base_lr, self.num_classes = precision, base_lr, num_classes
        self.meta = dict(meta or {})
        self.teacher = teacher
        self.show_progress = show_progress
        self.tensorboard = tensorboard and dist.is_main
        # callables hook(trainer) run after each epoch's training steps, before evaluation
        # and checkpointing (e.g. soft filter pruning); must be deterministic across ranks
        self.epoch_end_hooks = list(epoch_end_hooks or [])
        self.model = model.to(device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if dist.enabled and cfg.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.module = self.model  # the unwrapped module, what gets saved
        self.optimizer = build_optimizer(self.module, cfg.optimizer, base_lr)
        self.group_scale = [1.0 for _ in self.optimizer.param_groups]
        self.ema = ModelEMA(self.module, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if (
            precision == "fp16" and device.type == "cuda") else None
        self.steps_per_epoch = len(data.train)
        self.schedule = Schedule(cfg.schedule, base_lr, cfg.epochs, self.steps_per_epoch)
        self.net: nn.Module = self.module
        if dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        if teacher is not None:
            teacher.to(device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        # progress state (restored on resume)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch = -1.0, -1
        self.acc = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, n, -
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ checkpoints

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    def state(self) -> dict:
        payload = ckpt.model_payload(self.module, self.arch, self.meta)
        payload.update({
            "kind": "trainer", "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_top1": self.best_top1,
            "best_epoch": self.best_epoch, "epoch_acc": self.acc.cpu(), "rng": rng_state(),
            "steps_per_epoch": self.steps_per_epoch,
        })
        return payload

    def save(self, path: Path) -> None:
        if self.dist.is_main:
            ckpt.atomic_save(self.state(), path)
        D.barrier()

    def try_resume(self) -> bool:
        """Load last.pt (or the previous good one) if present. False: start afresh."""
        for path in (self.last_path, self.out_dir / "last.prev.pt"):
            if not path.exists():
                continue
            try:
                state = ckpt.load(path)
                self._restore(state)
            except (ckpt.CheckpointError, KeyError, RuntimeError, ValueError) as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                log.warning("%s: cannot resume from it (%s); trying an older checkpoint", path, msg)
                continue
            log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.global_step)
            return True
        return False

    def _restore(self, s: dict) -> None:
        if s.get("steps_per_epoch") != self.steps_per_epoch:
            raise ValueError(f"steps per epoch changed ({s.get('steps_per_epoch')} -> "
                             f"{self.steps_per_epoch}); the data or batch size differ")
        self.module.load_state_dict(s["state_dict"], strict=True)
        self.optimizer.load_state_dict(s["optimizer"])
        if self.scaler and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        if self.ema and s.get("ema"):
            self.ema.load_state_dict(s["ema"])
        self.epoch, self.step_in_epoch = s["epoch"], s["step_in_epoch"]
        self.global_step = s["global_step"]
        self.best_top1, self.best_epoch = s["best_top1"], s["best_epoch"]
        self.acc = s["epoch_acc"].to(self.device)
        set_rng_state(s["rng"])

    # ------------------------------------------------------------------ metrics file

    def _metrics_path(self) -> Path:
        return self.out_dir / "metrics.csv"

    def _trim_metrics(self) -> None:
        """Drop rows of epochs not yet covered by the checkpoint (no duplicates on resume)."""
        path = self._metrics_path()
        if not self.dist.is_main or not path.exists():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit()
                    and int(r["epoch"]) < self.epoch]
        self._write_rows(rows)

    def _write_rows(self, rows: list[dict]) -> None:
        tmp = self._metrics_path().with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self._metrics_path())

    def _append_row(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        path = self._metrics_path()
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row[k] for k in METRIC_FIELDS})

    # ------------------------------------------------------------------ training

    def _set_lr(self, step: int) -> float:
        lr = self.schedule.lr(step)
        for g, s in zip(self.optimizer.param_groups, self.group_scale):
            g["lr"] = lr * s
        return lr

    def _loss(self, x: torch.Tensor, y: torch.Tensor, step: int):
        cfg = self.cfg
        target: torch.Tensor = y
        if cfg.mixup > 0 or cfg.cutmix > 0:
            g = torch.Generator().manual_seed(self.seed * 7919 + step)
            x, target = mix_batch(x, y, self.num_classes, cfg.mixup, cfg.cutmix, g)
        with autocast_context(self.device, self.precision):
            logits = self.net(x)
            loss = soft_cross_entropy(logits.float(), target, cfg.label_smoothing)
            if self.teacher is not None and cfg.distill is not None and cfg.distill.alpha > 0:
                if self.teacher.training:  # the teacher never updates BN statistics
                    self.teacher.eval()
                with torch.no_grad():
                    t_logits = self.teacher(x)
                kd = distillation_loss(logits.float(), t_logits.float(), cfg.distill.temperature)
                loss = (1 - cfg.distill.alpha) * loss + cfg.distill.alpha * kd
        return logits, loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        step = self.global_step
        self._set_lr(step)
        logits, loss = self._loss(x, y, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.cfg.grad_clip:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        if self.ema:
            self.ema.update(self.module)
        with torch.no_grad():
            n = y.numel()
            finite = torch.isfinite(loss)
            self.bad_step = torch.where((self.bad_step < 0) & ~finite,
                                        torch.full_like(self.bad_step, step), self.bad_step)
            self.acc[0] += loss.detach().double() * n
            self.acc[1] += (logits.argmax(1) == y).sum()
            self.acc[2] += n
        self.global_step += 1
        self.step_in_epoch += 1

    def _check_finite(self) -> None:
        bad = int(self.bad_step)  # one host sync per log interval
        if bad >= 0:
            epoch, k = divmod(bad, self.steps_per_epoch)
            raise TrainingError(
                f"non-finite loss at step {bad} (epoch {epoch}, batch {k}); stopped, the last "
                f"good checkpoint is kept in {self.out_dir} (lower the lr or use grad_clip)")

    def fit(self) -> dict:
        """Run (or resume) the whole schedule; returns the final metrics."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.try_resume()
        if not resumed:
            seed_everything(self.seed)
        self._trim_metrics()
        cfg, last_metrics = self.cfg, {}
        progress = _Progress(self.dist.is_main and self._progress_enabled())
        while self.epoch < cfg.epochs:
            t0 = time.perf_counter()
            self.data.train.set_epoch(self.epoch)
            self.net.train()
            start = self.step_in_epoch
            if start == 0:
                self.acc.zero_()
            progress.start(self.epoch, cfg.epochs, self.steps_per_epoch, start)
            for i, (x, y) in enumerate(self.data.train.iterate(start), start=start):
                self.train_step(x, y)
                every = cfg.checkpoint_every_steps
                if (i + 1) % cfg.log_interval == 0:
                    self._check_finite()
                    progress.update(i + 1, self.acc, self.schedule.lr(self.global_step - 1))
                if every and self.global_step % every == 0 and i + 1 < self.steps_per_epoch:
                    self._check_finite()
                    self.save(self.last_path)
            self._check_finite()
            progress.close()
            for hook in self.epoch_end_hooks:
                hook(self)
            train_loss, correct, n = self.acc[:3].tolist()
            D.all_reduce_sum(t := torch.tensor([train_loss, correct, n], dtype=torch.float64))
            train_loss, correct, n = t.tolist()
            eval_model = self.ema.module if self.ema else self.module
            metrics = evaluate(eval_model, self.data.test, self.device, self.precision)
            row = {"epoch": self.epoch, "lr": self.schedule.lr(self.epoch * self.steps_per_epoch),
                   "train_loss": train_loss / max(n, 1), "train_acc": 100 * correct / max(n, 1),
                   **metrics, "seconds": time.perf_counter() - t0}
            row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            self._append_row(row)
            self._tb_write(row)
            if self.dist.is_main:
                log.info("epoch %d/%d  lr %.4g  loss %.4f  acc %.2f  test loss %.4f  top1 %.2f  "
                         "top5 %.2f  %.1fs", self.epoch + 1, cfg.epochs, row["lr"],
                         row["train_loss"], row["train_acc"], row["test_loss"], row["top1"],
                         row["top5"], row["seconds"])
            improved = metrics["top1"] > self.best_top1
            if improved:
                self.best_top1, self.best_epoch = metrics["top1"], self.epoch
            self.epoch += 1
            self.step_in_epoch = 0
            if improved:
                self.save(self.out_dir / "best.pt")
            self._rotate_last()
            self.save(self.last_path)
            last_metrics = row
        if not last_metrics:  # resumed after the final epoch: evaluate for the summary
            eval_model = self.ema.module if self.ema else self.module
            last_metrics = evaluate(eval_model, self.data.test, self.device, self.precision)
        return {"top1": last_metrics["top1"], "top5": last_metrics["top5"],
                "test_loss": last_metrics["test_loss"], "best_top1": self.best_top1,
                "best_epoch": self.best_epoch, "epochs": cfg.epochs,
                "global_steps": self.global_step}

    def _tb_write(self, row: dict) -> None:
        if not self.tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("logging.tensorboard: the tensorboard package is not installed "
                        "(pip install tensorboard); skipping TensorBoard scalars")
            self.tensorboard = False
            return
        with SummaryWriter(str(self.out_dir / "tb")) as w:
            for k in ("lr", "train_loss", "train_acc", "test_loss", "top1", "top5"):
                w.add_scalar(k, row[k], row["epoch"])

    def _rotate_last(self) -> None:
        """Keep the previous good `last` so a corrupt newest one can fall back to it."""
        if self.dist.is_main and self.last_path.exists():
            os.replace(self.last_path, self.out_dir / "last.prev.pt")

    def final_model(self) -> nn.Module:
        """The weights a stage hands downstream: the EMA when kept, else the model."""
        return self.ema.module if self.ema else self.module

    def _progress_enabled(self) -> bool:
        if self.show_progress is not None:
            return self.show_progress
        return sys.stderr.isatty() and not os.environ.get("CI")


class _Progress:
    """A tqdm bar per epoch (rank 0, terminals only) with loss, accuracy, lr and images/s."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def start(self, epoch: int, epochs: int, total: int, initial: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}",
                        leave=False, dynamic_ncols=True, unit="step")
        self.t0, self.s0 = time.perf_counter(), initial

    def update(self, done: int, acc: torch.Tensor, lr: float) -> None:
        if self.bar is None:
            return
        loss, correct, n = acc[:3].tolist()
        rate = (done - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        ips = rate * (n / max(done, 1))
        self.bar.set_postfix(loss=f"{loss / max(n, 1):.3f}", acc=f"{100 * correct / max(n, 1):.1f}",
                             lr=f"{lr:.3g}", img_s=f"{ips:.0f}")
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
