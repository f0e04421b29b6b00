"""The three file formats: how a network is written into each, and how each file is run
back in its own runtime.

  onnx         `torch.onnx.export` with constant folding: every BatchNorm that follows a
               convolution is folded into it at export (a BatchNorm1d after a Linear, as in
               the vgg*_l1 classifier, stays a node); onnxruntime's graph optimizer fuses
               further (Conv+ReLU, ...) when it loads the file. Runs on onnxruntime's CPU
               execution provider. Provenance in the model's metadata_props.
  torchscript  `torch.jit.trace`, then, in fp32, `torch.jit.freeze`: parameters become
               constants and Conv+BN and Linear+BN are folded. fp16/bf16 are traced
               unfrozen, BN computed in that precision as in the PyTorch model they are
               checked against. Runs with `torch.jit.load`. Provenance in `<file>.json`.
  exported     `torch.export.export` saved with `torch.export.save` (.pt2): the ATen graph as
               captured, BN kept as an inference batch-norm op; folding is left to the
               compiler that consumes the program (AOTInductor, torch.compile). Runs with
               `torch.export.load(...).module()`. Provenance in `<file>.json`.

Every format takes one NCHW input named "input" (the normalized image batch, in the
export's precision) and returns "logits".
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from .. import onnxrt
from ..errors import PipelineError, UsageError
from ..onnxrt import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, quiet

Runner = Callable[[torch.Tensor], torch.Tensor]
# the opsets accepted: torch's TorchScript-based ONNX exporter writes up to 20; strided
# slices (the option-A shortcut of the CIFAR ResNets) need 10
MIN_OPSET, MAX_OPSET = 10, 20
MAX_BATCH = 65536  # upper bound of a dynamic batch dimension (torch.export wants one)
INSTALL_HINT = "pip install 'prune-pipeline[export]'"


class ExportError(PipelineError):
    """The export or its verification failed; nothing was written."""


class MissingExtraError(UsageError):
    """A format whose packages (the `export` extra) are not installed."""


def sidecar_path(path: Path) -> Path:
    """Where the provenance of a TorchScript or .pt2 file goes: `<file>.json`."""
    return Path(path).with_name(Path(path).name + ".json")


def _read_sidecar(path: Path) -> dict:
    try:
        return json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return {}


def _source(data: bytes | Path) -> io.BytesIO | str:
    return io.BytesIO(data) if isinstance(data, bytes) else str(data)


def _onnx_packages():
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise MissingExtraError(f"--format onnx needs the onnx and onnxruntime packages "
                                f"({err.name} is not installed): {INSTALL_HINT}") from None
    return onnx, onnxruntime


class OnnxFormat:
    name, suffix, sidecar = "onnx", ".onnx", False

    def problem(self, precision: str, channels_last: bool) -> str | None:
        if precision == "bf16":
            return ("--precision bf16: onnxruntime's CPU provider has no bf16 convolution, so "
                    "the file could not be verified; use fp16 or fp32")
        if channels_last:
            return ("--channels-last: an ONNX graph has no memory format (onnxruntime picks "
                    "its own layout); leave the option out")
        return None

    def require(self) -> None:
        _onnx_packages()

    def serialize(self, model: nn.Module, example: torch.Tensor, dynamic: bool,
                  opset: int | None, metadata: dict) -> bytes:
        onnx, _ = _onnx_packages()
        proto = onnx.load_from_string(onnxrt.to_onnx(model, example, dynamic_batch=dynamic,
                                                     opset=opset))
        onnxrt.add_metadata(proto, metadata)
        onnx.checker.check_model(proto)
        return proto.SerializeToString()

    def runner(self, data: bytes | Path, threads: int | None = None) -> Runner:
        _onnx_packages()
        return onnxrt.runner(data, threads)

    def read_metadata(self, path: Path) -> dict:
        _onnx_packages()
        return onnxrt.read_metadata(path)


class _TorchRuntime:
    """A format torch itself loads back: every precision and layout, no extra to install,
    metadata in a sidecar .json."""

    sidecar = True

    def problem(self, precision: str, channels_last: bool) -> str | None:
        return None

    def require(self) -> None:
        return None

    def read_metadata(self, path: Path) -> dict:
        return _read_sidecar(path)


class TorchScriptFormat(_TorchRuntime):
    name, suffix = "torchscript", ".torchscript.pt"

    def serialize(self, model: nn.Module, example: torch.Tensor, dynamic: bool,
                  opset: int | None, metadata: dict) -> bytes:
        # a trace records the batch dimension symbolically: the file takes any batch size
        with quiet(), torch.no_grad():
            module = torch.jit.trace(model, example, check_trace=False)
            if example.dtype == torch.float32:
                module = torch.jit.freeze(module)
            buf = io.BytesIO()
            torch.jit.save(module, buf)
        return buf.getvalue()

    def runner(self, data: bytes | Path, threads: int | None = None) -> Runner:
        with quiet():
            module = torch.jit.load(_source(data), map_location="cpu")

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return run


class ExportedFormat(_TorchRuntime):
    name, suffix = "exported", ".pt2"

    def serialize(self, model: nn.Module, example: torch.Tensor, dynamic: bool,
                  opset: int | None, metadata: dict) -> bytes:
        shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic else None
        buf = io.BytesIO()
        with quiet():
            program = torch.export.export(model, (example,), dynamic_shapes=shapes)
            torch.export.save(program, buf)
        return buf.getvalue()

    def runner(self, data: bytes | Path, threads: int | None = None) -> Runner:
        with quiet():
            module = torch.export.load(_source(data)).module()

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return run


FORMATS = {f.name: f for f in (OnnxFormat(), TorchScriptFormat(), ExportedFormat())}


def read_metadata(path: str | Path, fmt: str) -> dict:
    """The provenance an exported file carries ({} when it has none)."""
    return FORMATS[fmt].read_metadata(Path(path))


def load_exported(path: str | Path, fmt: str, threads: int | None = None) -> Runner:
    """A function running an exported file in its own runtime: NCHW batch -> logits."""
    return FORMATS[fmt].runner(Path(path), threads)


__all__ = ["FORMATS", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "INSTALL_HINT",
           "ExportError", "MissingExtraError", "Runner", "sidecar_path", "read_metadata",
           "load_exported"]
