"""The one trainer every training stage (pretrain, finetune, scratch) runs through.

Read top to bottom: `TrainConfig` (what a stage may set), then `Trainer.fit()`: set up
(model on device, SyncBatchNorm, optimizer, schedule, DDP, torch.compile), resume from
`last.pt` if present, then the epoch loop (train steps, evaluation, metrics row,
checkpoints).

Invariants:
  * the lr is a pure function of the global step (`pipeline.schedules`);
  * no host sync per step: loss sums and correct counts accumulate on the device and
    are read once per log interval (`log_interval`) and at the end of the epoch;
  * a checkpoint holds everything exact resume needs, the data position included, and
    the plain module (unwrapped from DDP and torch.compile); the files and their
    rotation are `pipeline.checkpoint_saver`'s;
  * only rank 0 writes files, and the other ranks wait for it at a barrier;
  * metrics are sums over ranks of what each rank saw (each sample counted once).

Files in the stage folder: last.pt, last.prev.pt, best.pt (by validation top-1 with
`data.val_split`, else by test top-1), metrics.csv (one row per epoch; val_* columns with a
validation split), train_log.csv (one row per log interval, rank 0, from sums over all
ranks: step, lr, mean loss and accuracy over the interval, images, images/s) and, with
`logging.tensorboard`, tb/.

Extension point: hooks (`HookBase`, after detectron2's), passed to the trainer that runs
them: before/after the whole training, before/after each optimizer step, after each epoch's
training steps (before its evaluation; e.g. soft filter pruning) and after each checkpoint
written. Code that does not build the trainer itself (a fault injector, a profiler, a
benchmark) passes them down from the runner (`pipeline.runner.run(..., hooks=...)`), which
hands them to every training stage.

The loader interface the trainer expects is `TrainLoader`: `len()`, `set_epoch(epoch)`,
`iterate(start)` (the epoch's batches from batch `start` on) and `memory_format` (the
trainer sets it to the model's).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn

from . import checkpoint as ckpt
from . import distributed as D
from . import preemption
from .checkpoint_saver import CheckpointSaver
from .config import MAX_BATCH, MAX_EPOCHS, ConfigError, opt
from .csvlog import CsvLog
from .errors import PipelineError
from .modes import eval_mode, freeze
from .precision import AUTO, Decision, decide
from .recipes import (
    DistillConfig,
    ModelEMA,
    OptimizerConfig,
    SparsityConfig,
    add_l1_subgradient,
    bn_scales,
    build_optimizer,
    distillation_loss,
    mean_abs,
    mix_batch,
    soft_cross_entropy,
)
from .rng import rng_state, seed_everything, set_rng_state
from .safefs import ensure_dir
from .schedules import LinearScaling, Schedule, ScheduleConfig

log = logging.getLogger("pipeline")

Precision = Literal["fp32", "bf16", "fp16", "auto"]
METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "top1", "top5", "seconds"]
VAL_FIELDS = ["val_loss", "val_top1", "val_top5"]  # with data.val_split
TTA_FIELDS = ["top1_tta", "top5_tta"]  # with tta: flip
TRAIN_LOG_FIELDS = ["step", "epoch", "lr", "loss", "acc", "images", "images_per_s"]
BN_MIN_BATCH = 32  # fewer images per process without sync_bn: a warning
DECISION_KEY = "precision_decision"  # what `precision: auto` chose, kept across a resume
TRAINER_KEYS = ("optimizer", "epoch", "step_in_epoch", "global_step", "best_top1", "best_epoch",
                "epoch_acc", "rng", "steps_per_epoch")



@runtime_checkable
class TrainLoader(Protocol):
    """The training loader the trainer drives (`pipeline.data`'s loaders are ones): a
    fixed number of batches per epoch, an epoch-dependent order, and a restart inside an
    epoch at batch `start` (what exact resume needs)."""

    memory_format: torch.memory_format  # batch layout; the trainer sets the model's

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def iterate(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class HookBase:
    """A callback of one Trainer (detectron2's `HookBase`): override what you need. Every
    method runs on every rank, so none may diverge between them; `trainer.global_step`
    counts the steps done, `trainer.saved_step` is the step of the newest checkpoint."""

    def before_train(self, trainer: Trainer) -> None:
        """Once, after a resume (if any) and before the first step."""

    def before_step(self, trainer: Trainer) -> None:
        """Before every optimizer step (`trainer.global_step` is the step about to run)."""

    def after_step(self, trainer: Trainer) -> None:
        """After every optimizer step, before any checkpoint of it."""

    def after_epoch(self, trainer: Trainer) -> None:
        """After an epoch's training steps, before its evaluation and checkpoint (changes
        to the weights here are evaluated and saved; they must be deterministic)."""

    def after_checkpoint(self, trainer: Trainer) -> None:
        """After every checkpoint written (`trainer.saved_step` is the step it holds)."""

    def after_train(self, trainer: Trainer) -> None:
        """Once, after the last epoch (not when training stops on an error or a signal)."""


class CallbackHook(HookBase):
    """A hook from plain functions `fn(trainer)`, one per event (unset: nothing)."""

    def __init__(self, *, before_train: Callable[[Trainer], None] | None = None,
                 before_step: Callable[[Trainer], None] | None = None,
                 after_step: Callable[[Trainer], None] | None = None,
                 after_epoch: Callable[[Trainer], None] | None = None,
                 after_checkpoint: Callable[[Trainer], None] | None = None,
                 after_train: Callable[[Trainer], None] | None = None):
        self._fns = {"before_train": before_train, "before_step": before_step,
                     "after_step": after_step,
                     "after_epoch": after_epoch, "after_checkpoint": after_checkpoint,
                     "after_train": after_train}

    def _call(self, event: str, trainer: Trainer) -> None:
        fn = self._fns[event]
        if fn is not None:
            fn(trainer)

    def before_train(self, trainer: Trainer) -> None:
        self._call("before_train", trainer)

    def before_step(self, trainer: Trainer) -> None:
        self._call("before_step", trainer)

    def after_step(self, trainer: Trainer) -> None:
        self._call("after_step", trainer)

    def after_epoch(self, trainer: Trainer) -> None:
        self._call("after_epoch", trainer)

    def after_checkpoint(self, trainer: Trainer) -> None:
        self._call("after_checkpoint", trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._call("after_train", trainer)


class TrainingError(PipelineError):
    """Training cannot go on (non-finite loss, ...): one line, the last good checkpoint kept."""


@dataclass
class TrainConfig:
    epochs: int = opt(1, "training epochs (pretrain: 0 passes model.pretrained weights on "
                      "after an evaluation)", min=0, limit=MAX_EPOCHS)
    batch_size: int = opt(128, "global batch size (split across DDP ranks)", min=1,
                         limit=MAX_BATCH)
    eval_batch_size: int | None = opt(None, "evaluation batch (default: max(batch_size, 256))",
                                      min=1, limit=MAX_BATCH)
    eval_every: int = opt(1, "evaluate on the test set every N epochs and after the last one "
                          "(the other epochs' metrics.csv rows leave the test columns empty; "
                          "best.pt is chosen among the evaluated epochs)", min=1)
    lr: float | LinearScaling | None = opt(
        None, "peak lr, or {base, per_batch} for the linear scaling rule; "
        "pretrain/scratch default 0.1, finetune default the lowest lr upstream", min=0)
    optimizer: OptimizerConfig = opt(OptimizerConfig, "optimizer settings")
    schedule: ScheduleConfig = opt(ScheduleConfig, "lr schedule (pure function of the step)")
    precision: Precision | None = opt(
        None, "fp32 | bf16 | fp16 | auto (default: the run's precision); auto: bf16 on a GPU "
        "that supports it, else fp16; on the CPU a probe at the stage start times fp32 and "
        "bf16, NCHW and channels_last, on the stage's model and batch and takes the fastest "
        "(it then decides channels_last too); a resumed stage keeps its first choice")
    grad_clip: float | None = opt(None, "clip the gradient norm to this value", gt=0)
    label_smoothing: float = opt(0.0, "label smoothing epsilon", min=0, lt=1)
    mixup: float = opt(0.0, "mixup alpha (0 = off)", min=0)
    cutmix: float = opt(0.0, "cutmix alpha (0 = off)", min=0)
    ema_decay: float | None = opt(None, "keep an EMA of the weights with this decay; the EMA "
                                  "is evaluated and saved", gt=0, lt=1)
    tta: Literal["none", "flip"] = opt(
        "none", "test-time augmentation: flip also scores each test image as the mean of its "
        "logits and its mirror image's, reported as top1_tta/top5_tta beside the plain top-1 "
        "(which best.pt and the report's deltas keep using)")
    distill: DistillConfig | None = opt(None, "knowledge distillation from an earlier stage")
    sparsity: SparsityConfig | None = opt(
        None, "sparsity training: {l1_bn: lambda} adds the L1 penalty on BN scales (network "
        "slimming); metrics.csv gets a bn_l1 column (mean |gamma| after the epoch)")
    channels_last: bool = opt(False, "NHWC memory format")
    compile: bool = opt(False, "torch.compile the model (after pruning; uncompiled one saved)")
    sync_bn: bool = opt(False, "SyncBatchNorm under DDP (CUDA only; ignored with a warning "
                        "on the CPU)")
    checkpoint_every_steps: int | None = opt(None, "also save last.pt every N steps", min=1)
    log_interval: int = opt(50, "steps between progress updates, train_log.csv rows, "
                            "non-finite checks and, under torchrun, the check for a stop "
                            "signal (the only host syncs inside an epoch)", min=1)
    on_nonfinite: Literal["stop", "skip_step"] = opt(
        "stop", "a non-finite loss: stop (at the next log interval, naming the last good "
        "checkpoint) or skip_step (drop that step's update and count it; for fp16 runs where "
        "a rare overflow is expected; checks every step, one host sync per step)")
    max_skipped_steps: int = opt(10, "with on_nonfinite: skip_step, stop after this many "
                                 "non-finite steps in a row", min=1)

    def resolved_lr(self, default: float) -> float:
        if self.lr is None:
            return default
        if isinstance(self.lr, LinearScaling):
            return self.lr.resolve(self.batch_size)
        return float(self.lr)


@dataclass(frozen=True)
class RunSettings:
    """What every training stage of a run shares: where it trains and how it reports."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dist: D.DistInfo = field(default_factory=D.DistInfo)
    seed: int = 0
    precision: str = "fp32"  # the run's; a stage's own `precision` wins
    show_progress: bool | None = None  # None: a progress bar on terminals, not under CI
    tensorboard: bool = False


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 (forward and loss; evaluation too); nothing for fp32."""
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def first_batch(loader) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first training batch of epoch 0 (what the precision probe times)."""
    loader.set_epoch(0)
    it = loader.iterate(0)
    try:
        return next(it)
    except StopIteration:
        return None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


TTA = ("none", "flip")  # test-time augmentation of the evaluation (TrainConfig.tta)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, precision: str,
             tta: str = "none", reduce: bool = True) -> dict:
    """Top-1/top-5/loss over the whole test set, summed across ranks (each sample once:
    the loaders split every batch without padding); `reduce=False`: over what this
    process's `loader` yields alone (no collective). With `tta="flip"` also top1_tta and
    top5_tta: each image scored by the mean of its logits and its left-right mirror's
    (the plain numbers are unchanged)."""
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, top1, top5, n, tta 1/5
    with eval_mode(model):
        for x, y in loader:
            with autocast_context(device, precision):
                logits = model(x)
                flipped = model(x.flip(-1)) if tta == "flip" else None
            logits = logits.float()
            sums[0] += nn.functional.cross_entropy(logits, y, reduction="sum")
            sums[1:3] += _hits(logits, y)
            sums[3] += y.numel()
            if flipped is not None:
                sums[4:6] += _hits(0.5 * (logits + flipped.float()), y)
    if reduce:
        D.all_reduce_sum(sums)
    loss, c1, c5, n, t1, t5 = sums.tolist()
    images, n = int(n), max(n, 1)
    out = {"test_loss": loss / n, "top1": 100 * c1 / n, "top5": 100 * c5 / n,
           "images": images}
    if tta == "flip":
        out.update(top1_tta=100 * t1 / n, top5_tta=100 * t5 / n)
    return out


def _hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits] of a batch, as a float64 tensor on the logits' device."""
    k = min(5, logits.shape[1])
    hit = logits.topk(k, dim=1).indices.eq(y.view(-1, 1))
    return torch.stack([hit[:, :1].sum(), hit.sum()]).double()


def evaluate_splits(model: nn.Module, data, device: torch.device, precision: str,
                    tta: str = "none") -> dict:
    """The test metrics (reported), and the validation split's as val_loss, val_top1,
    val_top5 (what in-run decisions use) when `data` has one. Without `images`: a summary
    or a metrics row reports accuracy, `eval` counts images. TTA applies to the test split."""
    out = evaluate(model, data.test, device, precision, tta)
    out.pop("images")
    if getattr(data, "val", None) is not None:
        v = evaluate(model, data.val, device, precision)
        out.update(val_loss=v["test_loss"], val_top1=v["top1"], val_top5=v["top5"])
    return out


def optimizer_for(module: nn.Module, cfg: OptimizerConfig, base_lr: float,
                  device: torch.device) -> torch.optim.Optimizer:
    """The training optimizer of `module`: fused kernels on CUDA (one launch per step, and
    GradScaler.step without a host sync: for a non-fused optimizer it reads the inf check
    with .item())."""
    return build_optimizer(module, cfg, base_lr, fused=device.type == "cuda")


def compiled(net: nn.Module, module: nn.Module, stage: str, is_main: bool = True) -> nn.Module:
    """`net` (`module`, maybe under DDP) under torch.compile with static shapes (the last
    partial batch compiles once more instead of switching every later step to a
    dynamic-shape graph); uncompiled, with a warning, when `module` has SyncBatchNorm
    (torch.compile of a DDP model with it fails or computes wrong gradients,
    pytorch#107372)."""
    if any(isinstance(m, nn.SyncBatchNorm) for m in module.modules()):
        if is_main:
            log.warning("stages.%s.compile: torch.compile does not support SyncBatchNorm "
                        "under DDP (pytorch#107372); training uncompiled", stage)
        return net
    return torch.compile(net, dynamic=False)


class Trainer:
    """Trains `model` under `cfg`, writing checkpoints and metrics into `out_dir`.

    `model` is the plain (possibly pruned) network; the trainer wraps it in DDP and
    torch.compile itself and always saves the plain module. `run` holds what the run's
    stages share; `arch` (with its `num_classes`) and `meta` go into every checkpoint;
    `teacher` is the frozen model to distill from (with `cfg.distill`); `hooks` are
    `HookBase` callbacks, run in their order; `data.train` is a `TrainLoader`.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, data, out_dir: Path, *,
                 run: RunSettings, arch: dict, base_lr: float,
                 teacher: nn.Module | None = None, meta: dict | None = None,
                 hooks: Sequence[HookBase] = (), schedule=None):
        self.cfg, self.data, self.out_dir = cfg, data, Path(out_dir)
        self.device, self.dist, self.seed = run.device, run.dist, run.seed
        self.arch, self.base_lr, self.num_classes = arch, base_lr, arch["num_classes"]
        self.meta = dict(meta or {})
        self.stage = str(self.meta.get("stage", self.out_dir.name))
        self.teacher = teacher
        self.show_progress = run.show_progress
        self.tensorboard = run.tensorboard and self.dist.is_main
        self.hooks: list[HookBase] = list(hooks)
        self._check_batch_size()
        self.checkpoints = CheckpointSaver(self.out_dir, self.dist, stage=self.stage,
                                           required=TRAINER_KEYS)
        self.decision = self._decide_precision(model, cfg.precision or run.precision)
        self.precision, self.channels_last = self.decision.precision, self.decision.channels_last
        for loader in (data.train, data.test, getattr(data, "val", None)):  # batch formats
            if hasattr(loader, "memory_format"):
                loader.memory_format = (torch.channels_last if self.channels_last
                                        else torch.contiguous_format)
        self._warn_small_bn_batch(model)
        self.model = self._placed(model)
        self.module = self.model  # the unwrapped module, what gets saved
        self.optimizer = optimizer_for(self.module, cfg.optimizer, base_lr, self.device)
        self.ema = ModelEMA(self.module, cfg.ema_decay) if cfg.ema_decay else None
        self.scaler = torch.amp.GradScaler("cuda") if (
            self.precision == "fp16" and self.device.type == "cuda") else None
        lam = cfg.sparsity.l1_bn if cfg.sparsity else 0.0
        self.l1_bn = float(lam)
        self.sparse_scales = bn_scales(self.module) if lam > 0 else []
        if lam > 0 and not self.sparse_scales:
            raise ConfigError(f"stages.{self.stage}.sparsity.l1_bn: the model has no "
                              "BatchNorm scale to penalize")
        if lam > 0 and self.dist.is_main:
            log.info("sparsity: L1 penalty %g on the scales of %d BatchNorm layers", lam,
                     len(self.sparse_scales))
        self.steps_per_epoch = len(data.train)
        # `schedule`: any object with lr(step), e.g. a ReplaySchedule (rewinding)
        self.schedule = schedule or Schedule(cfg.schedule, base_lr, cfg.epochs,
                                             self.steps_per_epoch)
        self.net = self._wrapped(self.module)  # what the training step calls
        if teacher is not None:
            freeze(teacher.to(self.device))
        # progress state (restored on resume)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch = -1.0, -1
        # on-device sums since the start of the epoch: loss * n, correct, n (this rank's)
        self.acc = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        self.saved_step: int | None = None  # global step of the newest checkpoint on disk
        self._synced_stop: int | None = None  # the job's stop signal at the last sync
        self._saved_world: int | None = None  # processes that wrote the resumed checkpoint
        self.skipped_steps = self.skipped_in_a_row = 0  # on_nonfinite: skip_step
        self.val = getattr(data, "val", None)  # the validation split: best epoch by it
        self.metrics_log = CsvLog(self.out_dir / "metrics.csv", METRIC_FIELDS + (
            ["bn_l1"] if self.sparse_scales else []) + (
            VAL_FIELDS if self.val is not None else []) + (
            TTA_FIELDS if cfg.tta != "none" else []))
        self.train_log = CsvLog(self.out_dir / "train_log.csv", TRAIN_LOG_FIELDS)
        self._mark = _Mark()
        self._tb = None

    def _check_batch_size(self) -> None:
        batch, world = self.cfg.batch_size, self.dist.world_size
        if batch < 2 * world:
            raise ConfigError(f"stages.{self.stage}.batch_size: {batch} is the global "
                              f"batch; {world} processes need at least {2 * world}")

    def _warn_small_bn_batch(self, model: nn.Module) -> None:
        """Under DDP without SyncBatchNorm each process normalizes over its own share of
        the batch: below BN_MIN_BATCH images the statistics get noisy (Wu & He 2018,
        "Group Normalization", Fig. 1: ResNet-50 loses accuracy below 32 per GPU)."""
        per_rank = self.cfg.batch_size // max(self.dist.world_size, 1)
        synced = self.cfg.sync_bn and self.device.type == "cuda"
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if self.dist.enabled and has_bn and not synced and per_rank < BN_MIN_BATCH \
                and self.dist.is_main:
            log.warning("stages.%s.batch_size: BatchNorm normalizes over %d images per "
                        "process (global batch %d over %d processes), below %d: its "
                        "statistics are noisy; set sync_bn: true (CUDA) or a larger batch",
                        self.stage, per_rank, self.cfg.batch_size, self.dist.world_size,
                        BN_MIN_BATCH)


    def _decide_precision(self, model: nn.Module, configured: str) -> Decision:
        """The stage's precision and memory format: as configured, or for `auto` the choice
        stored in its checkpoint (a resumed stage keeps it), else a fresh decision
        (`pipeline.precision.decide`: the CUDA rule, or the CPU probe on the first batch),
        made on rank 0 and shared with the others."""
        if configured != AUTO:
            return Decision(configured, self.cfg.channels_last, "config", str(self.device))
        stored = self.checkpoints.peek(DECISION_KEY)
        if stored:
            decision = Decision.from_dict(stored)
            log.info("stage %s: %s (kept from the checkpoint the stage resumes)", self.stage,
                     decision.label)
            return decision
        decision = None
        if self.dist.is_main:
            batch = first_batch(self.data.train) if self.device.type != "cuda" else None
            decision = decide(model.to(self.device), batch, self.device, self.cfg.channels_last)
            log.info("stage %s: %s", self.stage, decision.describe())
        return D.broadcast_object(decision)

    def _placed(self, model: nn.Module) -> nn.Module:
        """The model on the device, in its memory format, with SyncBatchNorm if asked."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.cfg.sync_bn:
            if self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.dist.is_main:
                log.warning("stages.%s.sync_bn: SyncBatchNorm needs CUDA; on the CPU each "
                            "process keeps its own BatchNorm statistics", self.stage)
        return model

    def _wrapped(self, module: nn.Module) -> nn.Module:
        """`module` under DDP (several processes) and torch.compile (if asked)."""
        net = module
        if self.dist.enabled:
            net = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            net = compiled(net, module, self.stage, self.dist.is_main)
        return net

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """The checkpoint dict (a collective under DDP: the epoch sums are reduced)."""
        payload = ckpt.model_payload(self.module, self.arch, self.meta)
        payload.update({
            "kind": "trainer", "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.state_dict() if self.ema else None,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "best_top1": self.best_top1,
            "best_epoch": self.best_epoch, "epoch_acc": self._global_acc().cpu(),
            "rng": rng_state(self.device), "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.dist.world_size, "precision": self.precision,
            "channels_last": self.channels_last, DECISION_KEY: self.decision.as_dict(),
            "skipped_steps": self.skipped_steps, "skipped_in_a_row": self.skipped_in_a_row,
        })
        return payload

    def _save(self, best: bool = False) -> None:
        """Checkpoint the current step (as best.pt too with `best`), then run the
        checkpoint hooks."""
        self.checkpoints.save(self.state(), best=best)
        self.saved_step = self.global_step
        for hook in self.hooks:
            hook.after_checkpoint(self)

    def try_resume(self) -> bool:
        """Restore the newest good checkpoint of this stage; False: start afresh."""
        path = self.checkpoints.resume(self._incompatibility, self._restore)
        if path is None:
            return False
        self.saved_step = self.global_step
        log.info("resumed from %s at epoch %d, step %d (of %d)", path, self.epoch,
                 self.global_step, self.cfg.epochs * self.steps_per_epoch)
        if self._saved_world not in (None, self.dist.world_size):
            log.warning("%s was written by %d processes, this run has %d: the same global "
                        "batches go on, but the BatchNorm statistics (per process) and the "
                        "summation order differ from an uninterrupted run", path,
                        self._saved_world, self.dist.world_size)
        return True

    def _incompatibility(self, s: dict) -> str | None:
        """Why checkpoint `s` cannot continue this run, or None."""
        if s["steps_per_epoch"] != self.steps_per_epoch:
            saved_world = s.get("world_size", self.dist.world_size)
            why = (f"it was written by {saved_world} processes, this run has "
                   f"{self.dist.world_size}: the last partial batch is split differently"
                   if saved_world != self.dist.world_size else "data or batch size changed")
            return (f"it has {s['steps_per_epoch']} steps per epoch, this config "
                    f"{self.steps_per_epoch} ({why})")
        ours = self.module.state_dict()
        theirs = s.get("state_dict", {})
        if set(ours) != set(theirs):
            diff = sorted(set(ours) ^ set(theirs))
            return f"its model has other layers ({diff[0]!r} differs)"
        for k, v in ours.items():
            if tuple(theirs[k].shape) != tuple(v.shape):
                return f"{k} has shape {tuple(theirs[k].shape)}, the model {tuple(v.shape)}"
        groups = s["optimizer"].get("param_groups", [])
        if [len(g["params"]) for g in groups] != [
                len(g["params"]) for g in self.optimizer.param_groups]:
            return "its optimizer has other parameter groups (optimizer settings changed)"
        if bool(self.ema) != (s.get("ema") is not None):
            return "ema_decay was switched " + ("on" if self.ema else "off")
        return None

    def _restore(self, s: dict) -> None:
        self._saved_world = s.get("world_size")
        self.module.load_state_dict(s["state_dict"], strict=True)
        self.optimizer.load_state_dict(s["optimizer"])
        if self.scaler and s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        if self.ema:
            self.ema.load_state_dict(s["ema"])
        self.epoch, self.step_in_epoch = int(s["epoch"]), int(s["step_in_epoch"])
        self.global_step = int(s["global_step"])
        self.skipped_steps = int(s.get("skipped_steps", 0))
        self.skipped_in_a_row = int(s.get("skipped_in_a_row", 0))
        self.best_top1, self.best_epoch = float(s["best_top1"]), int(s["best_epoch"])
        # the stored sums are over all ranks: rank 0 carries them, the others start at 0
        acc = s["epoch_acc"].to(self.device, torch.float64)[:3]
        self.acc = acc if self.dist.is_main else torch.zeros_like(acc)
        set_rng_state(s["rng"], self.device, self.dist.rank, self.dist.world_size)

    # ------------------------------------------------------------------ log files

    def _trim_logs(self) -> None:
        """Drop rows after the checkpoint we start from: no duplicates after a resume."""
        if self.dist.is_main:
            self.metrics_log.trim(lambda r: int(r["epoch"]) < self.epoch)
            self.train_log.trim(lambda r: int(r["step"]) <= self.global_step)

    def _append(self, csv_log: CsvLog, row: dict) -> None:
        if self.dist.is_main:
            csv_log.append(row)

    def _open_tb(self, resumed: bool):
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("logging.tensorboard: the tensorboard package is not installed "
                        "(pip install tensorboard); skipping TensorBoard scalars")
            return None
        if self.dist.is_main:
            ensure_dir(self.out_dir / "tb")
        # purge what a killed run logged after the checkpoint we resumed from
        return SummaryWriter(str(self.out_dir / "tb"),
                             purge_step=self.global_step + 1 if resumed else None)

    def _tb_scalars(self, prefix: str, row: dict, step: int) -> None:
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    # ------------------------------------------------------------------ training

    def _set_lr(self, step: int) -> float:
        lr = self.schedule.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def _loss(self, x: torch.Tensor, y: torch.Tensor, step: int):
        cfg = self.cfg
        target: torch.Tensor = y
        if cfg.mixup > 0 or cfg.cutmix > 0:
            g = torch.Generator().manual_seed((self.seed * 7919 + step) % 2**64)
            x, target = mix_batch(x, y, self.num_classes, cfg.mixup, cfg.cutmix, g)
        with autocast_context(self.device, self.precision):
            logits = self.net(x)
            loss = soft_cross_entropy(logits.float(), target, cfg.label_smoothing)
            if self.teacher is not None and cfg.distill is not None and cfg.distill.alpha > 0:
                with torch.no_grad():
                    t_logits = self.teacher(x)
                kd = distillation_loss(logits.float(), t_logits.float(), cfg.distill.temperature)
                loss = (1 - cfg.distill.alpha) * loss + cfg.distill.alpha * kd
        return logits, loss

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step; statistics stay on the device (no host sync)."""
        step = self.global_step
        self._set_lr(step)
        logits, loss = self._loss(x, y, step)
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.on_nonfinite == "skip_step" and self._skip_nonfinite(loss):
            self.global_step += 1
            self.step_in_epoch += 1
            return
        if self.scaler:
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip or self.sparse_scales:
                self.scaler.unscale_(self.optimizer)  # the penalty and the clip see true grads
        else:
            loss.backward()
        if self.sparse_scales:
            add_l1_subgradient(self.sparse_scales, self.l1_bn)
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.ema:
            self.ema.update(self.module)
        with torch.no_grad():
            n = y.shape[0]
            loss = loss.detach()
            # first non-finite step, kept on the device until the next check
            self.bad_step = torch.where((self.bad_step < 0) & ~torch.isfinite(loss),
                                        step, self.bad_step)
            self.acc[0] += loss.double() * n
            self.acc[1] += (logits.detach().argmax(1) == y).sum()
            self.acc[2] += n
        self.global_step += 1
        self.step_in_epoch += 1

    def _skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """skip_step: whether any rank's loss of this step is non-finite (a host sync and,
        under DDP, a collective: every rank skips the same steps). Stops after
        max_skipped_steps in a row."""
        bad = (~torch.isfinite(loss.detach())).to(torch.float64).view(1)
        D.all_reduce_sum(bad)
        if not bad.item():
            self.skipped_in_a_row = 0
            return False
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        log.warning("stage %s: non-finite loss at step %d; update skipped (%d in a row, %d in "
                    "all)", self.stage, self.global_step, self.skipped_in_a_row,
                    self.skipped_steps)
        if self.skipped_in_a_row >= self.cfg.max_skipped_steps:
            raise TrainingError(
                f"stage {self.stage}: {self.skipped_in_a_row} non-finite steps in a row (up to "
                f"step {self.global_step}, max_skipped_steps {self.cfg.max_skipped_steps}); "
                f"stopped, {self._last_good()}; lower the lr or set grad_clip")
        return True

    def _last_good(self) -> str:
        """Where the newest checkpoint is and what it holds, for an error message."""
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return (f"the last good checkpoint is {self.checkpoints.last_path} (epoch "
                f"{self.saved_step / self.steps_per_epoch:g}, step {self.saved_step})")

    def _global_acc(self) -> torch.Tensor:
        """The epoch's sums over all ranks (a collective under DDP)."""
        return D.all_reduce_sum(self.acc.clone())

    def _sync(self) -> list[float]:
        """The one host sync of a log interval: epoch sums over ranks, the job's stop
        request (any rank's signal, see `_stop_request`), and stop on the first non-finite
        loss any rank saw."""
        flags = torch.tensor(preemption.as_flags(preemption.pending()), dtype=torch.float64,
                             device=self.device)
        t = torch.cat([self.acc, flags, torch.where(self.bad_step < 0, math.inf,
                                                    self.bad_step.double()).view(1)])
        D.all_reduce_sum(t[:5])
        D.all_reduce_min(t[5:])
        *sums, term, usr1, bad = t.tolist()
        self._synced_stop = preemption.from_flags(term, usr1)
        if math.isfinite(bad):
            self._fail_non_finite(int(bad))
        return sums

    def _stop_request(self) -> int | None:
        """The signal to stop on, or None. One process: its own, checked every step (no
        cost). Several: the job's, as all-reduced at the last log interval (`_sync`, the
        one collective there is anyway): every rank stops at the same step, at most
        log_interval - 1 steps after the signal, without a collective per step."""
        if not self.dist.enabled:
            return preemption.pending()
        return self._synced_stop

    def _fail_non_finite(self, bad: int) -> None:
        epoch, k = divmod(bad, self.steps_per_epoch)
        raise TrainingError(
            f"stage {self.stage}: non-finite loss at step {bad} (epoch {epoch + 1}, batch "
            f"{k + 1}); stopped, {self._last_good()}; lower the lr or set grad_clip, or "
            "on_nonfinite: skip_step")

    def _stop_if_requested(self, saved: bool = False) -> None:
        """At a step boundary: on SIGTERM/SIGUSR1 (any rank's: all ranks stop at the same
        step) checkpoint this step atomically and raise Preempted."""
        signum = self._stop_request()
        if signum is None:
            return
        if not saved:
            self._sync()  # never checkpoint a diverged model
            self._save()
        total = self.cfg.epochs * self.steps_per_epoch
        raise preemption.Preempted(
            f"stage {self.stage}: stopped on {preemption.name(signum)} at step "
            f"{self.global_step} of {total} (epoch {self.global_step / self.steps_per_epoch:.2f}"
            f" of {self.cfg.epochs}); checkpoint {self.checkpoints.last_path} written; run "
            "the same command to resume", signum)

    def _log_interval(self, progress: _Progress) -> list[float]:
        """Check for non-finite losses, write a train_log.csv row, update the bar."""
        sums = self._sync()
        now = time.perf_counter()
        mark = self._mark
        loss, correct, n = (a - b for a, b in zip(sums, mark.sums, strict=True))
        row = {"step": self.global_step, "epoch": self.epoch,
               "lr": self.schedule.lr(self.global_step - 1), "loss": loss / max(n, 1),
               "acc": 100 * correct / max(n, 1), "images": int(n),
               "images_per_s": n / max(now - mark.time, 1e-9)}
        if n > 0:
            row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
            self._append(self.train_log, row)
            self._tb_scalars("train", row, self.global_step)
        progress.update(self.step_in_epoch, sums, row["lr"], row["images_per_s"])
        self._mark = _Mark(sums, now)
        return sums

    def fit(self) -> dict:
        """Run (or resume) the whole schedule; returns the final metrics."""
        if self.dist.is_main:
            ensure_dir(self.out_dir)
        resumed = self.try_resume()
        if not resumed:
            seed_everything(self.seed, self.device, self.dist.rank)
        self._trim_logs()
        progress = _Progress(self.dist.is_main and self._progress_enabled())
        self._tb = self._open_tb(resumed)
        last_metrics, images, seconds = {}, 0.0, 0.0
        for hook in self.hooks:
            hook.before_train(self)
        try:
            while self.epoch < self.cfg.epochs:
                last_metrics, n, t = self._epoch(progress)
                images, seconds = images + n, seconds + t
                if self.epoch < self.cfg.epochs:
                    self._stop_if_requested(saved=True)
        finally:
            progress.close()
            if self._tb is not None:
                self._tb.close()
        if not last_metrics:  # resumed after the final epoch: evaluate for the summary
            last_metrics = self._evaluate()
        for hook in self.hooks:
            hook.after_train(self)
        val = {} if self.val is None else {k: last_metrics[k] for k in VAL_FIELDS}
        tta = {k: last_metrics[k] for k in TTA_FIELDS if k in last_metrics}
        return {"top1": last_metrics["top1"], "top5": last_metrics["top5"],
                "test_loss": last_metrics["test_loss"], **val, **tta, "best_top1": self.best_top1,
                "best_epoch": self.best_epoch, "best_split": "test" if self.val is None else "val",
                "epochs": self.cfg.epochs,
                "global_steps": self.global_step, "skipped_steps": self.skipped_steps,
                "images_per_s": round(images / seconds, 1) if seconds else None}

    def _epoch(self, progress: _Progress) -> tuple[dict, float, float]:
        """Train one epoch (from `step_in_epoch` on), evaluate, log and checkpoint.
        Returns the metrics row, the images trained and the training seconds."""
        cfg, spe = self.cfg, self.steps_per_epoch
        t0 = time.perf_counter()
        self.data.train.set_epoch(self.epoch)
        self.net.train()
        start = self.step_in_epoch
        if start == 0:
            self.acc.zero_()
        # rank 0 holds the epoch's global sums after a resume, the others zeros
        self._mark = _Mark(tuple(self.acc.tolist()) if start else (0.0, 0.0, 0.0), t0)
        n0 = self._mark.sums[2]  # images of this epoch trained before a resume
        progress.start(self.epoch, cfg.epochs, spe, start)
        every = cfg.checkpoint_every_steps
        for x, y in self.data.train.iterate(start):
            for hook in self.hooks:
                hook.before_step(self)
            self.train_step(x, y)
            for hook in self.hooks:
                hook.after_step(self)
            if self.step_in_epoch >= spe:
                break
            if self.step_in_epoch % cfg.log_interval == 0:
                self._log_interval(progress)
            if every and self.global_step % every == 0:
                self._sync()  # never checkpoint a diverged model
                self._save()
            self._stop_if_requested(saved=self.saved_step == self.global_step)
        if self.step_in_epoch != spe:
            raise TrainingError(f"stage {self.stage}: the training loader gave "
                                f"{self.step_in_epoch} batches in epoch {self.epoch + 1}, "
                                f"expected {spe}")
        sums = self._log_interval(progress)
        progress.close()
        train_seconds = time.perf_counter() - t0
        for hook in self.hooks:
            hook.after_epoch(self)
        # each rank updated its BatchNorm statistics (and the EMA copied them) with its own
        # last batch: evaluate and save rank 0's everywhere, the model that model.pt holds
        self.sync_buffers()
        train_loss, correct, n = sums
        evaluated = self.evaluates(self.epoch)
        metrics = (self._evaluate() if evaluated else
                   {k: None for k in ["test_loss", "top1", "top5", *VAL_FIELDS]})
        row = {"epoch": self.epoch, "lr": self.schedule.lr(self.epoch * spe),
               "train_loss": train_loss / max(n, 1), "train_acc": 100 * correct / max(n, 1),
               **metrics, "seconds": time.perf_counter() - t0}
        if self.sparse_scales:
            row["bn_l1"] = mean_abs(self.sparse_scales)
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self._append(self.metrics_log, row)
        self._tb_scalars("epoch", row, self.global_step)
        ips = (n - n0) / max(train_seconds, 1e-9)
        test = (f"test loss {row['test_loss']:.4f}  top1 {row['top1']:.2f}  top5 {row['top5']:.2f}"
                if evaluated else f"(test every {cfg.eval_every} epochs)")
        if evaluated and self.val is not None:
            test += f"  val top1 {row['val_top1']:.2f}"
        if evaluated and row.get("top1_tta") is not None:
            test += f"  top1 flip-TTA {row['top1_tta']:.2f}"
        log.info("epoch %d/%d  lr %.4g  loss %.4f  acc %.2f  %s  %.0f img/s  %.1fs",
                 self.epoch + 1, cfg.epochs, row["lr"], row["train_loss"], row["train_acc"],
                 test, ips, row["seconds"])
        if self.sparse_scales:
            log.info("sparsity: mean |BN gamma| %.4f (l1_bn %g)", row["bn_l1"], self.l1_bn)
        chosen = metrics["val_top1" if self.val is not None else "top1"]
        improved = evaluated and chosen > self.best_top1
        if improved:
            self.best_top1, self.best_epoch = chosen, self.epoch
        self.epoch += 1
        self.step_in_epoch = 0
        self._save(best=improved)
        return row, n - n0, train_seconds

    def _evaluate(self) -> dict:
        return evaluate_splits(self.final_model(), self.data, self.device, self.precision,
                               self.cfg.tta)

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) in the model and the EMA on every rank."""
        D.broadcast_buffers(self.module, *([self.ema.module] if self.ema else []))

    def evaluates(self, epoch: int) -> bool:
        """Whether epoch (0-based) ends with a test-set evaluation."""
        return (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 >= self.cfg.epochs

    def final_model(self) -> nn.Module:
        """The weights a stage hands downstream: the EMA when kept, else the model."""
        return self.ema.module if self.ema else self.module

    def _progress_enabled(self) -> bool:
        if self.show_progress is not None:
            return self.show_progress
        return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass
class _Mark:
    """Epoch sums (loss * n, correct, n over all ranks) and time at the last log point."""

    sums: tuple = (0.0, 0.0, 0.0)
    time: float = 0.0


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

    def update(self, done: int, sums: list[float], lr: float, images_per_s: float) -> None:
        if self.bar is None:
            return
        loss, correct, n = sums
        self.bar.update(done - self.bar.n)
        # redrawn once per log interval (the only time these numbers are known)
        self.bar.set_postfix(loss=f"{loss / max(n, 1):.3f}", acc=f"{100 * correct / max(n, 1):.1f}",
                             lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
