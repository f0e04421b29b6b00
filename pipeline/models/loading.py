"""Networks from files: a pipeline checkpoint rebuilt (dense or pruned, `load_model`) and
a local weights file loaded strictly into a dense network (`load_pretrained`)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, load_weights_file, misfit, payload_parts
from ..checkpoint import load as load_checkpoint
from ..errors import first_line
from ..modes import eval_mode
from .build import build_model
from .widths import shrink_to


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local weights file into `model`, strictly: every tensor must exist in both
    with the same shape. Any problem is one CheckpointError line naming the file."""
    p = os.fspath(path)
    if os.path.isfile(p) and not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            legacy = f.read(1) == b"\x80"  # torch's pre-1.6 pickle format
        if not legacy:
            raise CheckpointError(f"{p}: not a torch weights file (model.pretrained)")
    state = load_weights_file(p)  # weights_only=True; one-line errors of its own
    own = model.state_dict()
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    problems = []
    if bad_shape:
        k = bad_shape[0]
        problems.append(f"{len(bad_shape)} tensor(s) of another shape, e.g. {k} "
                        f"{tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} here")
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    if problems:
        last = [m for m in model.modules() if isinstance(m, nn.Linear)]
        hint = ""
        if last and any(k.endswith("weight") and state[k].dim() == 2 for k in bad_shape):
            hint = (f"; the model has {last[-1].out_features} classes: are these weights for "
                    "another data set or architecture?")
        raise CheckpointError(f"{path}: weights do not fit the model (model.pretrained): "
                              f"{'; '.join(problems)}{hint}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # dtype or other problems the checks above missed
        raise CheckpointError(f"{path}: weights do not fit the model "
                              f"({first_line(err)})") from None
    return model


def model_from_payload(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """Rebuild the (possibly pruned) network stored in a checkpoint dict."""
    arch, sd = payload_parts(ckpt, source)
    try:
        model = build_model(arch)
        shrink_to(model, sd)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: arch: cannot rebuild {arch['name'][:60]!r} "
                              f"({first_line(err)[:160]})") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError:
        raise CheckpointError(f"{source}: weights do not fit the architecture "
                              f"{arch['name']!r}: {misfit(model.state_dict(), sd)}") from None
    return model


def check_forward(model: nn.Module, input_size: tuple[int, ...], source: str) -> None:
    """One image through the network on the CPU: a hand-made or damaged checkpoint whose
    shapes load but do not chain (a conv of the wrong rank, widths that disagree) is a
    CheckpointError naming the file, not a traceback in the middle of an evaluation."""
    p = next(model.parameters(), None)
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_size), dtype=p.dtype if p is not None else None))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise CheckpointError(f"{source}: the weights do not form a working network "
                              f"({first_line(err)[:160]})") from None


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a network (dense or pruned) from any pipeline checkpoint file.

    >>> model = pipeline.load_model("checkpoints/cifar10_fpgm/prune/model.pt")

    Works on stage outputs (`model.pt`) and trainer checkpoints (`last.pt`, `best.pt`);
    nothing is unpickled (weights_only=True) and no pruning is re-run.
    """
    ckpt = load_checkpoint(Path(path), map_location=map_location)
    return model_from_payload(ckpt, str(path))


__all__ = ["check_forward", "load_model", "load_pretrained", "model_from_payload"]
