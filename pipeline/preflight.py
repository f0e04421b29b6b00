"""Preflight: every check that can fail a run, done before any work (in `--dry-run` and at
the start of every `run`), so that a mistake costs seconds, not the hours of the stages
before the one it breaks.

Each stage kind resolves its spec against the model it will get (`Stage.preflight`):
the dense network is built on the CPU (random weights: the widths are what the checks
need), `model.pretrained` loaded into it, and every prune spec applied to a copy of its
input (layer names, globs and numbers, include/skip, layer_ratios, the policy, the
reachability of target_macs_reduction), which also gives the pruned widths, MACs and
params the plan shows. Distillation teachers' output sizes, the data root's layout and
class count, and whether `out_dir` is writable are checked too. A failure is one
ConfigError line naming the file and the dotted key (exit 2).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn

from stages import Preflight, stage_of

from .data import check_available, describe
from .data.config import DataError, input_size
from .data.sizes import train_size
from .errors import show_value
from .runconfig import RunConfig

log = logging.getLogger("pipeline")

# class counts assumed by `--dry-run` when the data set is not there (yet)
KNOWN_CLASSES = {"cifar10": 10, "cifar100": 100, "imagefolder": 1000}


def data_shape(cfg: RunConfig, source: str, need_data: bool) -> tuple[int, tuple, str]:
    """(classes, input size, where the class count comes from). With `need_data` a
    missing or malformed data root is an error; without (dry run) a missing one is
    assumed to have the data set's known class count."""
    try:
        check_available(cfg.data)
        classes, size = describe(cfg.data)
        return classes, tuple(size), "data"
    except DataError as err:
        root = Path(cfg.data.root)
        if need_data or root.exists() and cfg.data.dataset == "imagefolder":
            raise DataError(f"{source}: data.root: {err}") from None
        return KNOWN_CLASSES[cfg.data.dataset], tuple(input_size(cfg.data)), "assumed"


def check_writable(cfg: RunConfig, source: str, pf: Preflight) -> None:
    """out_dir (or its nearest existing parent) must be a writable folder on a file system
    that stores files: not read-only, not a virtual one such as /proc or /sys (where even
    root's writes fail), and no name in the path longer than the file system allows."""
    path = cfg.run_dir
    too_long = [p for p in path.parts if len(os.fsencode(p)) > 255]
    if too_long or len(os.fsencode(str(path))) > 4095:
        pf.fail("out_dir", f"the run directory's path {show_value(str(path), 80)} is too long "
                "(names up to 255 bytes, paths up to 4095)")
    if path.is_symlink():
        pf.fail("name", f"the run directory {path} is a symbolic link (to "
                f"{show_value(os.readlink(path))}); the pipeline does not write through links")
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        pf.fail("out_dir", f"{path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        pf.fail("out_dir", f"{path} is not writable (run directory {cfg.run_dir})")
    try:
        fs = os.statvfs(path)
    except OSError:
        return
    if fs.f_flag & os.ST_RDONLY:
        pf.fail("out_dir", f"{path} is on a read-only file system (run directory "
                f"{cfg.run_dir})")
    if fs.f_blocks == 0 and fs.f_files == 0:
        pf.fail("out_dir", f"{path} is on a virtual file system that stores no files (run "
                f"directory {cfg.run_dir})")


def nondeterministic_on_cuda(model: nn.Module) -> list[str]:
    """The layers of `model` whose CUDA backward has no deterministic kernel, so that
    `deterministic: true` fails at the first training step: adaptive average or max
    pooling to an output larger than 1x1 (torchvision's VGG and AlexNet: `avgpool`, to 7x7
    and 6x6; a 1x1 output, as in the ResNets, is a mean and deterministic)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
            if any(s != 1 for s in size):
                out.append(f"{name} ({type(m).__name__}{tuple(size)})")
    return out


def check_deterministic(cfg: RunConfig, source: str, pf: Preflight,
                        device: torch.device | None) -> None:
    """`deterministic: true` with a layer that has no deterministic CUDA backward: an error
    on CUDA, a plan note when the device is not known yet (dry run), nothing on the CPU."""
    if not cfg.deterministic or (device is not None and device.type != "cuda") or (
            device is None and cfg.device == "cpu"):
        return
    for name, model in pf.models.items():
        bad = nondeterministic_on_cuda(model)
        if not bad:
            continue
        problem = (f"{cfg.model.arch}'s {bad[0]} has no deterministic CUDA backward (stage "
                   f"{name!r} would fail at its first step); set deterministic: false, or "
                   "run on the CPU")
        if device is None:
            pf.notes.append(f"deterministic: on CUDA, {problem}")
            return
        pf.fail("deterministic", problem)


def preflight(cfg: RunConfig, source: str, need_data: bool = True,
              device: torch.device | None = None) -> dict[str, dict]:
    """Run every check; returns per stage what the plan adds to its entry. `device`: the
    device the run will use (None in a dry run)."""
    t0 = time.perf_counter()
    classes, size, how = data_shape(cfg, source, need_data)
    try:  # data.val_split against the training set's size
        train_size(cfg.data)
    except DataError as err:
        raise DataError(f"{source}: {err}") from None
    cuda = (device.type == "cuda" if device is not None else cfg.device.startswith("cuda")
            or (cfg.device == "auto" and torch.cuda.is_available()))
    pf = Preflight(run=cfg, source=source, num_classes=classes, input_size=size,
                   need_files=need_data, cuda=cuda)
    if how == "assumed":
        pf.notes.append(f"data root {cfg.data.root} absent: {classes} classes assumed")
    check_writable(cfg, source, pf)
    entries: dict[str, dict] = {}
    torch.manual_seed(cfg.seed)
    # the pruning's notes (coupled groups left out, ...) are for when the stage runs
    quiet = logging.getLogger("pipeline.pruning")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for name, spec in cfg.stages.items():
            model, entry = stage_of(spec).preflight(spec, name, pf)
            if model is not None:
                pf.models[name] = model
            entries[name] = entry
    finally:
        quiet.setLevel(level)
    check_deterministic(cfg, source, pf, device)
    entries["_data"] = {"num_classes": classes, "num_classes_source": how, "notes": pf.notes,
                        "preflight_seconds": round(time.perf_counter() - t0, 3)}
    return entries


__all__ = ["KNOWN_CLASSES", "check_deterministic", "data_shape", "nondeterministic_on_cuda",
           "preflight"]
