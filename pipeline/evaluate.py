"""`python -m pipeline eval RUN_DIR/STAGE`: a stage's model.pt (or another checkpoint of
it) evaluated on the run's test set, or on another data root or split.

The network is loaded with weights_only=True (dense or pruned alike) and evaluated by the
trainer's own `evaluate` on the loaders of `build_data`, so the numbers are the ones a
stage's summary reports. Under `torchrun --nproc_per_node N` each process evaluates its
share of every batch and the sums are reduced: each image is counted once.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from . import distributed as D
from .config import Loader
from .data import DataConfig, build_data, check_available, describe, input_size
from .data.config import is_torchvision_cifar, resolve_root
from .data.folders import split_folders
from .errors import UsageError, did_you_mean, first_line
from .models import check_forward, count_macs, count_params, model_from_payload
from .precision import AUTO, eval_precision
from .rng import configure_kernels
from .rundir import CONFIG_FILE, MODEL_FILE, read_config, stage_specs
from .trainer import TTA, evaluate

SPLITS = ("test", "val")
PRECISIONS = ("fp32", "bf16", "fp16")


class EvalUsageError(UsageError):
    """What `eval` was asked cannot be done: a missing stage, a corrupt file, other data."""


MAX_EVAL_BATCH = 65536  # images per evaluation batch, at most


@dataclass
class EvalOptions:
    checkpoint: str | None = None  # default RUN_DIR/STAGE/model.pt
    data_root: str | None = None  # default the run's data.root
    split: str | None = None  # test | val (ImageFolder trees); default the run's eval split
    batch_size: int = 256
    precision: str | None = None  # default the run's precision
    device: str = "auto"
    tta: str = "none"  # none | flip: also top1_tta/top5_tta (mean logits of image and mirror)


def _stage_dir(path: Path) -> Path:
    if path.name in ("", ".."):
        path = Path(os.path.abspath(path))
    if path.is_dir():
        return path
    run_dir = path.parent
    names = list(stage_specs(run_dir)) if run_dir.is_dir() else []
    raise EvalUsageError(f"{path}: no such stage directory{did_you_mean(path.name, names)}"
                         + (f"; stages: {names}" if names else ""))


def _data_config(run_dir: Path, options: EvalOptions) -> tuple[DataConfig, dict]:
    plain = read_config(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not plain:
        raise EvalUsageError(f"{config_path}: missing or unreadable; the run's config names "
                             "the data set and its preprocessing")
    cfg = Loader(str(config_path)).load(DataConfig, plain.get("data") or {}, "data")
    changes: dict = {}
    if options.data_root is not None:
        changes["root"] = str(options.data_root)
    if options.split is not None:
        if options.split not in SPLITS:
            raise EvalUsageError(f"--split {options.split}: expected one of {list(SPLITS)}")
        one_eval_set = cfg.dataset == "synthetic" or is_torchvision_cifar(
            dataclasses.replace(cfg, **changes))
        if options.split == "val" and cfg.val_split:
            pass  # the validation split held out of the training set (data.val_split)
        elif one_eval_set:
            if options.split != "test":
                raise EvalUsageError(f"--split {options.split}: {cfg.dataset} has only a test "
                                     "split (val/ exists in ImageFolder trees)")
        else:
            changes["eval_split"] = options.split
    return dataclasses.replace(cfg, **changes), plain


def _load(path: Path) -> tuple[torch.nn.Module, dict]:
    try:
        payload = checkpoint.load(path)
        return model_from_payload(payload, str(path)), payload
    except checkpoint.CheckpointError as err:  # a file the user pointed at: exit 2
        raise EvalUsageError(first_line(err)) from None


def evaluate_stage(stage: str | Path, options: EvalOptions) -> dict:
    """Evaluate RUN_DIR/STAGE's model (or `options.checkpoint`); the result on every rank."""
    stage_dir = _stage_dir(Path(stage))
    run_dir = stage_dir.parent
    path = Path(options.checkpoint) if options.checkpoint else stage_dir / MODEL_FILE
    if not path.is_file():
        what = "" if options.checkpoint else " (the stage has not completed)"
        raise EvalUsageError(f"{path}: checkpoint not found{what}")
    if options.tta not in TTA:
        raise EvalUsageError(f"--tta {options.tta}: expected one of {list(TTA)}")
    if not 1 <= options.batch_size <= MAX_EVAL_BATCH:
        raise EvalUsageError(f"--batch-size: expected an integer in [1, {MAX_EVAL_BATCH}], "
                             f"got {options.batch_size}")
    data_cfg, plain = _data_config(run_dir, options)
    precision = options.precision or plain.get("precision") or "fp32"
    if precision not in (*PRECISIONS, AUTO) or (precision == AUTO and options.precision):
        raise EvalUsageError(f"--precision {precision}: expected one of {list(PRECISIONS)}")
    info = D.env_info()
    backend = str((plain.get("distributed") or {}).get("backend", "auto"))
    device = D.resolve_device(options.device, info, "--device", backend)
    precision = eval_precision(precision, device)  # the run's auto: no training to probe
    if precision == "fp16" and device.type != "cuda":
        raise EvalUsageError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    model, payload = _load(path)
    try:
        check_forward(model, tuple(input_size(data_cfg)), str(path))
    except checkpoint.CheckpointError as err:  # a file the user pointed at: exit 2
        raise EvalUsageError(first_line(err)) from None
    num_classes = int(payload["arch"].get("num_classes", 0))
    check_available(data_cfg)
    data_classes, _ = describe(data_cfg)
    if data_classes != num_classes:
        raise EvalUsageError(f"{data_cfg.root}: {data_classes} classes, the model of {path} "
                             f"has {num_classes}; point --data-root at data with the run's "
                             "classes")
    D.init(info, device, float((plain.get("distributed") or {}).get("timeout_minutes", 60)),
           backend)
    configure_kernels(device, bool(plain.get("deterministic")))  # cuDNN autotuning on CUDA
    try:
        batch = max(options.batch_size, 2 * info.world_size)
        data = build_data(dataclasses.replace(data_cfg, persistent_workers=False), batch, batch,
                          int(plain.get("seed") or 0), device, info.rank, info.world_size)
        held_out = options.split == "val" and data.val is not None
        t0 = time.perf_counter()
        metrics = evaluate(model.to(device), data.val if held_out else data.test, device,
                           precision, options.tta)
        seconds = time.perf_counter() - t0
    finally:
        D.shutdown()
    macs = count_macs(model.cpu(), data.input_size)
    fixed = data_cfg.dataset == "synthetic" or is_torchvision_cifar(data_cfg)
    eval_dir = "generated" if data_cfg.dataset == "synthetic" else str(data_cfg.root)
    return {"stage": stage_dir.name, "run": run_dir.name, "checkpoint": str(path),
            "model": payload["arch"].get("name"), "top1": metrics["top1"],
            "top5": metrics["top5"], "test_loss": metrics["test_loss"],
            **{k: metrics[k] for k in ("top1_tta", "top5_tta") if k in metrics},
            "images": metrics["images"], "data": eval_dir, "dataset": data_cfg.dataset,
            "split": ("val (held out of train: data.val_split)" if held_out else "test"
                      if fixed else split_folders(resolve_root(data_cfg),
                                                  data_cfg.eval_split)[1].name),
            "batch_size": batch,
            "precision": precision, "device": str(device), "processes": info.world_size,
            "params": count_params(model), "macs": macs["total"],
            "seconds": round(seconds, 3)}


def format_text(r: dict) -> str:
    return (f"{r['run']}/{r['stage']} ({r['model']}, {r['checkpoint']}): top-1 {r['top1']:.2f}  "
            f"top-5 {r['top5']:.2f}  loss {r['test_loss']:.4f}  "
            + (f"(flip TTA: top-1 {r['top1_tta']:.2f}  top-5 {r['top5_tta']:.2f})  "
               if "top1_tta" in r else "")
            + f"on {r['images']} images of "
            f"{r['dataset']} {r['data']} (split {r['split']}), {r['precision']} on {r['device']}"
            + (f" x{r['processes']} processes" if r["processes"] > 1 else ""))


__all__ = ["EvalOptions", "EvalUsageError", "evaluate_stage", "format_text"]
