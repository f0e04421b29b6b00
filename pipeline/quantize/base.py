"""What every quantization backend provides, and the errors they raise.

A backend turns an fp32 network and its calibration batches into the bytes of an int8
artifact (`quantize`), runs such bytes or file in its own runtime (`runner`), and says what
it needs installed (`require`: a one-line MissingBackendError, exit 2, before any work).

  onnxruntime  (default) QDQ ONNX: activations uint8 per tensor, weights int8 per output
               channel (symmetric); onnxruntime's CPU provider fuses the QDQ pairs into
               QLinearConv / QGemm kernels when it loads the file. Needs onnx + onnxruntime.
  pt2e         torch.export + the x86 inductor quantizer (torchao's PT2E flow): the same
               scheme, saved as a torch.export program (.pt2); `torch.compile` (inductor)
               lowers it to oneDNN int8 kernels. Needs torchao.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from ..errors import PipelineError, UsageError

Runner = Callable[[torch.Tensor], torch.Tensor]
Ranges = Mapping[str, tuple[float, float]]  # module name -> (min, max) of its input
log = logging.getLogger("pipeline.quantize")
OBSERVERS = ("minmax", "percentile", "entropy")
DEFAULT_BACKEND = "onnxruntime"
INSTALL_HINT = "pip install 'prune-pipeline[quantize]'"


class QuantizeError(PipelineError):
    """The quantization or its verification failed at run time (exit 1): nothing written."""


class MissingBackendError(UsageError):
    """The backend's packages are not installed: one line with the install command."""


class Backend(Protocol):
    """What a quantization backend provides (see the module docstring)."""

    name: str
    suffix: str  # the artifact's file suffix
    runtime: str  # what loads and runs the artifact, in words

    def require(self) -> None:
        """MissingBackendError when the backend's packages are missing."""

    def quantize(self, model: nn.Module, batches: list[torch.Tensor], observer: str,
                 percentile: float, metadata: dict, work_dir: Path,
                 reduce_range: bool = False, ranges: Ranges | None = None) -> bytes:
        """The int8 artifact of `model` (eval mode, CPU, fp32) calibrated on `batches`;
        temporary files go under `work_dir` (removed by the caller); `reduce_range`: 7-bit
        weights (onnxruntime only); `ranges`: the input range of some Conv2d/Linear modules
        (by name; QAT's learned ones), used for those inputs instead of calibrated ones; how
        many layers took theirs is written into the artifact as metadata["learned_ranges"]
        (`metadata` is updated in place), the others are calibrated (a warning names them)."""

    def fp32_artifact(self, model: nn.Module, example: torch.Tensor, work_dir: Path) -> bytes:
        """`model` in fp32 in the artifact's format (what the int8 file is compared with)."""

    def runner(self, data: bytes | Path, threads: int | None = None,
               compiled: bool = False) -> Runner:
        """A function running the artifact: NCHW fp32 batch -> logits (`compiled`: the
        deployment form where it differs, e.g. torch.compile for pt2e)."""

    def read_metadata(self, path: Path) -> dict:
        """The provenance the artifact carries ({} without)."""


def widen(span: dict, key, lo: float, hi: float) -> None:
    """span[key] grown to include [lo, hi]: one input read by several layers takes the
    union of their ranges."""
    a, b = span.get(key, (lo, hi))
    span[key] = (min(a, lo), max(b, hi))


def note_learned(metadata: dict, ranges: Ranges, missing: list[str], where: str) -> None:
    """Record how many layers took their learned range, and warn about the others."""
    metadata["learned_ranges"] = len(ranges) - len(missing)
    if missing:
        log.warning("%d layer input(s) not found in %s keep calibrated ranges instead of the "
                    "learned ones: %s", len(missing), where,
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))


def layer_calls(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The Conv2d and Linear modules of `model` in the order one forward pass calls them (a
    module called twice appears twice): the order an exported graph lists their ops in."""
    calls: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: calls.append((n, mod)))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return calls


__all__ = ["Backend", "DEFAULT_BACKEND", "OBSERVERS", "INSTALL_HINT", "MissingBackendError",
           "QuantizeError", "Ranges", "Runner", "layer_calls", "note_learned", "widen"]
