"""The onnxruntime backend: the fp32 network exported to ONNX (BatchNorm folded into the
convolutions by constant folding), calibrated with onnxruntime's calibrators and written as
a QDQ model: QuantizeLinear/DequantizeLinear pairs around every quantizable op (Conv, Gemm,
MatMul, Add, pooling, ...), activations uint8 per tensor (asymmetric), weights int8 per
output channel (symmetric), biases int32. onnxruntime's CPU provider fuses the pairs into
QLinearConv / QLinearAdd / QGemm kernels when it loads the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .. import onnxrt
from ..onnxrt import INPUT_NAME, OUTPUT_NAME
from .base import (
    INSTALL_HINT,
    MissingBackendError,
    Ranges,
    Runner,
    layer_calls,
    note_learned,
    widen,
)

OPSET = onnxrt.DEFAULT_OPSET  # per-channel QDQ needs >= 13; the opset pipeline export writes
METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def has_int8_dot(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies uint8 x int8 without an int16 intermediate: an x86 CPU
    with VNNI (or AMX), or a CPU that is not x86 (Arm's kernels do not saturate). Without
    it onnxruntime's u8s8 kernels (AVX2 vpmaddubsw) add pairs of products in int16, which
    saturates when weights use the full int8 range."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True  # not Linux: assume the vendor's int8 path
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not flags or "sse2" not in flags:  # no x86 flags line: not an x86 CPU
        return True
    return any(f in flags for f in VNNI_FLAGS)


def _packages():
    try:
        import onnx
        import onnxruntime
        from onnxruntime import quantization
    except ImportError as err:
        raise MissingBackendError(f"backend onnxruntime needs the onnx and onnxruntime "
                                  f"packages ({err.name} is not installed): "
                                  f"{INSTALL_HINT}") from None
    return onnx, onnxruntime, quantization


def export_fp32(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The fp32 ONNX file quantization starts from: dynamic batch, constants folded."""
    path.write_bytes(onnxrt.to_onnx(model, example, dynamic_batch=True, opset=OPSET))


def compact(proto):
    """The model with short tensor names (t0, t1, ...; the input and output keep theirs), no
    node names and no intermediate shape records: the quantizer's derived names
    ("onnx::Conv_358_DequantizeLinear_Output", ...) are about a fifth of a small int8 file.
    The graph and every value are unchanged."""
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    del graph.value_info[:]
    return proto


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, batches: list[torch.Tensor]):
        self._it = iter(batches)

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        return None if x is None else {INPUT_NAME: x.float().contiguous().numpy()}

    def rewind(self) -> None:  # not needed: one pass per calibrator
        return None


def _unqualified(name: str) -> str:
    """A module's name as the ONNX exporter's node scopes write it: from its last atom that
    is not a number ("layer1.0.conv1" -> "conv1", "blocks.0" -> "blocks.0")."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isdigit():
            return ".".join(atoms[i:])
    return name


def layer_inputs(proto, calls: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """The graph tensor read by each Conv2d/Linear module, by module name: the exported
    graph's Conv/Gemm/MatMul nodes with a weight initializer, in order, matched to the
    modules in the order a forward pass calls them. A node matches when its weight has the
    module's weight shape (a Linear's may be stored transposed) and its scope, where it has
    one, ends with the module's name; other weighted nodes (an `F.linear` on a parameter)
    are skipped. A module called twice reads two tensors."""
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    out: dict[str, list[str]] = {}
    k = 0
    for node in proto.graph.node:
        if k == len(calls):
            break
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 \
                or node.input[1] not in shapes:
            continue
        name, module = calls[k]
        w = tuple(module.weight.shape)
        shape = shapes[node.input[1]]
        fits = (shape == w) if isinstance(module, nn.Conv2d) else (
            node.op_type != "Conv" and shape in (w, w[::-1]))
        scope = node.name.split("/")
        if fits and len(scope) >= 3 and scope[-2] != _unqualified(name):
            fits = False
        if fits:
            out.setdefault(name, []).append(node.input[0])
            k += 1
    return out


def range_overrides(inputs: dict[str, list[str]], ranges: Ranges
                    ) -> tuple[dict[str, list[dict]], list[str]]:
    """onnxruntime's TensorQuantOverrides giving each layer input its range (a tensor read
    by several layers: the union of their ranges), and the names of the layers whose input
    was not found."""
    span: dict[str, tuple[float, float]] = {}
    missing = []
    for name, (lo, hi) in ranges.items():
        if name not in inputs:
            missing.append(name)
            continue
        for tensor in inputs[name]:
            widen(span, tensor, lo, hi)
    overrides = {t: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                 for t, (lo, hi) in span.items()}
    return overrides, missing


class OrtBackend:
    name, suffix, runtime = "onnxruntime", ".int8.onnx", "onnxruntime CPU execution provider"

    def require(self) -> None:
        _packages()

    def quantize(self, model: nn.Module, batches: list[torch.Tensor], observer: str,
                 percentile: float, metadata: dict, work_dir: Path,
                 reduce_range: bool = False, ranges: Ranges | None = None) -> bytes:
        onnx, _, q = _packages()
        fp32, int8 = work_dir / "fp32.onnx", work_dir / "int8.onnx"
        export_fp32(model.eval(), batches[0][:2], fp32)
        method = getattr(q.CalibrationMethod, METHODS[observer])
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 "CalibPercentile": percentile}
        if ranges:
            inputs = layer_inputs(onnx.load(str(fp32)), layer_calls(model, batches[0][:2]))
            overrides, missing = range_overrides(inputs, ranges)
            extra["TensorQuantOverrides"] = overrides
            note_learned(metadata, ranges, missing, "the ONNX graph")
        with onnxrt.quiet(stdout=True):
            q.quantize_static(str(fp32), str(int8), _Reader(batches),
                              quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, calibrate_method=method,
                              reduce_range=reduce_range, extra_options=extra)
        proto = compact(onnx.load(str(int8)))
        onnxrt.add_metadata(proto, metadata)
        onnx.checker.check_model(proto)
        return proto.SerializeToString()

    def fp32_artifact(self, model: nn.Module, example: torch.Tensor, work_dir: Path) -> bytes:
        path = work_dir / "fp32_size.onnx"
        export_fp32(model.eval(), example, path)
        return path.read_bytes()

    def runner(self, data: bytes | Path, threads: int | None = None,
               compiled: bool = False) -> Runner:
        _packages()
        return onnxrt.runner(data, threads)

    def read_metadata(self, path: Path) -> dict:
        _packages()
        return onnxrt.read_metadata(path)


__all__ = ["OrtBackend", "compact", "export_fp32", "has_int8_dot", "INPUT_NAME", "OUTPUT_NAME"]
