"""ONNX in and out of torch, and models loaded in onnxruntime: the one home of what `export`, the
quantize stage's onnxruntime backend and the latency table's onnxruntime backend all do with
ONNX. Each caller checks that the packages are installed first (each says so in its own
words: a usage error for `export --format onnx`, a missing backend for `quantize`, a config
problem for a latency target); these helpers import them lazily."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# opset 17 (ONNX 1.12): read by every current runtime (onnxruntime >= 1.12, TensorRT 8.5+,
# OpenVINO) and written by torch's exporter since torch 1.13; per-channel QDQ needs >= 13
DEFAULT_OPSET = 17
CPU = "CPUExecutionProvider"
SPIN_STOP = "session.force_spinning_stop"  # onnxruntime's config key


@contextlib.contextmanager
def quiet(stdout: bool = False) -> Iterator[None]:
    """Silence the tracer's and exporter's warnings (constant-folded branches of the option-A
    shortcut, deprecation notices); with `stdout`, also the prints and root-logger advice of
    onnxruntime's quantization tools."""
    root = logging.getLogger()
    level = root.level
    if stdout:
        root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.simplefilter("ignore")
            if stdout:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            yield
    finally:
        root.setLevel(level)


def to_onnx(model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = False,
            opset: int | None = None) -> bytes:
    """The model as serialized ONNX, BatchNorm folded into the convolutions by constant
    folding. The TorchScript-based exporter (dynamo=False): for these feed-forward conv nets
    it writes the same folded graph as the dynamo exporter, 5-10x faster, and needs no
    onnxscript."""
    buf = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with quiet(), torch.no_grad():
        torch.onnx.export(model, (example,), buf, dynamo=False, export_params=True,
                          opset_version=DEFAULT_OPSET if opset is None else opset,
                          do_constant_folding=True, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes)
    return buf.getvalue()


def add_metadata(proto, metadata: dict) -> None:
    """Each entry as a JSON string in the model's metadata_props (read back by read_metadata)."""
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def read_metadata(path: Path) -> dict:
    """An ONNX file's metadata_props, JSON values decoded (a foreign file's plain strings
    kept as they are); the weights are not read."""
    import onnx

    out = {}
    for p in onnx.load(str(path), load_external_data=False).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def load(data: bytes | Path, threads: int | None = None,
            providers: Sequence | None = None):
    """The onnxruntime inference handle of serialized bytes or a file: errors-only logging,
    `threads` intra-op threads (None: onnxruntime's default) and one inter-op thread, the CPU
    execution provider unless `providers` says otherwise.

    Its intra-op threads spin while a run lasts and stop when it returns
    (`session.force_spinning_stop`): by default they spin on after each run, and where
    several models are timed side by side (interleaved rounds), the spinning threads of the
    one that ran last took the cores from the one timed next (measured on 2 cores at batch
    32: a ResNet-20 at 36 ms instead of 11 ms; BENCHMARKS.md#quantize)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry(SPIN_STOP, "1")
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(data if isinstance(data, bytes) else str(data), options,
                                providers=list(providers or [CPU]))


def runner(data: bytes | Path, threads: int | None = None
           ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function from an fp32 input batch to the model's first output, on the CPU provider."""
    sess = load(data, threads)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.float32):
            x = x.float()
        return torch.from_numpy(sess.run(None, {name: x.contiguous().numpy()})[0])

    return run


__all__ = ["CPU", "DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "add_metadata", "load", "quiet",
           "read_metadata", "runner", "to_onnx"]
