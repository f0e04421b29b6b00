"""How long a model's forward pass takes on this machine.

Eval mode, no autograd, a few warm-up passes, then timed passes with the device synchronised
after each (queued GPU work counts), the median kept. Weights and input may be put in
channels_last memory format (NHWC: the fast path of oneDNN on the CPU, where a pruned
net's MAC savings show) or stay contiguous (NCHW). The forward runs in fp32, without autocast:
on a GPU, cuDNN's fastest NHWC (tensor-core) kernels need fp16/bf16, so an fp32 measurement
there understates what channels_last and pruning bring. `compare --latency` and
benchmarks/pruned_latency.py both measure through this module.

Backends (`compare --latency-backend`): `torch` times the PyTorch module; `onnxruntime` and
`torchscript` export the stage's model to a temporary file through pipeline.export (verified
against the PyTorch model on a random batch, exactly as `python -m pipeline export` does)
and time that file in its own runtime on the CPU, with torch's intra-op thread count, so the
speedup is the one a deployment sees. ONNX has no memory format (onnxruntime picks its own
layout); TorchScript files are exported in the memory format asked for.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn

from ..config import Loader
from ..data import DataConfig, input_size
from ..distributed import check_device
from ..errors import UsageError, first_line
from ..export import FORMATS, ExportOptions, export_stage, time_exported
from ..models import load_model
from ..modes import eval_mode
from ..rundir import CONFIG_FILE, read_config
from ..timing import interleaved_ms, median_ms

log = logging.getLogger("pipeline")

MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# backend -> the export format it runs (None: the PyTorch module itself)
LATENCY_BACKENDS: dict[str, str | None] = {"torch": None, "onnxruntime": "onnx",
                                           "torchscript": "torchscript"}
T = TypeVar("T", nn.Module, torch.Tensor)


def latency_device(requested: str | None) -> str:
    """The device asked for, else (or for `auto`) cuda when present, else cpu."""
    if requested and requested.strip().lower() != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_backend(backend: str, device: str | None = None) -> None:
    """UsageError (one line, exit 2) for a backend that cannot be timed here: an unknown
    name, a device that is not here (or not a device), a device other than the CPU for an
    exported form, or a missing `export` extra
    (MissingExtraError names the install command)."""
    if backend not in LATENCY_BACKENDS:
        raise UsageError(f"--latency-backend {backend}: expected one of "
                         f"{list(LATENCY_BACKENDS)}")
    fmt = LATENCY_BACKENDS[backend]
    if fmt is None:
        if device is not None:
            check_device(device, "--latency-device")
        return
    if device not in (None, "cpu"):
        raise UsageError(f"--latency-backend {backend} runs on the CPU; --latency-device "
                         f"{device} applies to --latency-backend torch only")
    FORMATS[fmt].require()


def latency_device_for(backend: str, requested: str | None) -> str:
    """The device a backend is timed on: the exported forms run on the CPU."""
    return latency_device(requested) if LATENCY_BACKENDS.get(backend) is None else "cpu"


def in_memory_format(obj: T, memory_format: str) -> T:
    """A model (its 4-d weights, in place) or a 4-d batch in `memory_format`
    ("channels_last" or "contiguous")."""
    return obj.to(memory_format=MEMORY_FORMATS[memory_format])


def sync(device: torch.device) -> None:
    """Wait for the work queued on `device` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward pass of `x`, the device synchronised before the clock stops."""
    t0 = time.perf_counter()
    model(x)
    sync(x.device)
    return time.perf_counter() - t0


def warm_up(models: Iterable[nn.Module], x: torch.Tensor, runs: int) -> None:
    """`runs` untimed passes through each model (allocator, kernel choice, caches)."""
    models = list(models)
    for _ in range(runs):
        for model in models:
            model(x)
    sync(x.device)


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward pass of `x` through `model`, the device synchronised after it."""
    def run() -> None:
        model(x)
        sync(x.device)
    return run


@torch.inference_mode()
def median_seconds(model: nn.Module, x: torch.Tensor, min_runs: int = 10,
                   min_seconds: float = 1.0, max_runs: int = 1000, warmup: int = 3) -> float:
    """Median seconds of a forward pass: at least `min_runs` passes, more until `min_seconds`
    have gone by (at most `max_runs`)."""
    return median_ms(_forward(model, x), min_runs, min_seconds, warmup, max_runs) / 1000


@torch.inference_mode()
def interleaved_median_seconds(models: dict[str, nn.Module], x: torch.Tensor, rounds: int,
                               warmup: int = 1) -> dict[str, float]:
    """Median seconds of a forward pass of each named model; every round runs each model
    once in turn, so a change in the machine's load hits all of them alike."""
    t = interleaved_ms({n: _forward(m, x) for n, m in models.items()}, rounds, warmup)
    return {n: v["median_ms"] / 1000 for n, v in t.items()}


def model_latency_ms(model: nn.Module, input_size: tuple[int, ...], batch: int, device: str,
                     memory_format: str = "channels_last", min_seconds: float = 1.0,
                     min_runs: int = 10) -> float:
    """Median wall time (ms) of one forward pass of a random batch through `model`, in eval
    mode (restored afterwards); the model is moved to `device` and `memory_format`."""
    dev = torch.device(device)
    model = model.to(dev)
    x = torch.randn((batch, *input_size), device=dev)
    if x.dim() == 4:
        model, x = in_memory_format(model, memory_format), in_memory_format(x, memory_format)
    with eval_mode(model):
        return 1000 * median_seconds(model, x, min_runs, min_seconds)


def measure_latency(model_path: Path, input_size: tuple[int, ...], batch: int, device: str,
                    memory_format: str = "channels_last", min_seconds: float = 1.0,
                    min_runs: int = 10) -> float:
    """`model_latency_ms` of the model in model_path (loaded with pipeline.load_model)."""
    return model_latency_ms(load_model(model_path), input_size, batch, device, memory_format,
                            min_seconds, min_runs)


def exported_latency_ms(stage_dir: Path, backend: str, batch: int,
                        memory_format: str = "channels_last", threads: int | None = None,
                        min_seconds: float = 1.0, min_runs: int = 10) -> float:
    """Median wall time (ms) of one forward pass of a random batch through RUN_DIR/STAGE's
    model exported for `backend` ("onnxruntime" or "torchscript"): written to a temporary
    file by pipeline.export (fixed batch `batch`, verified against the PyTorch model on a
    random batch; a mismatch raises ExportError), then timed in its runtime on `threads`
    intra-op threads (default: torch's current count). The file is removed afterwards."""
    fmt = LATENCY_BACKENDS[backend]
    if fmt is None:
        raise UsageError(f"--latency-backend {backend}: not an exported form")
    channels_last = memory_format == "channels_last" and fmt != "onnx"
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        out = Path(tmp) / f"model{FORMATS[fmt].suffix}"
        export_stage(stage_dir, ExportOptions(format=fmt, out=out, batch=batch,
                                              channels_last=channels_last, eval_images=0))
        return time_exported(out, fmt, batch, threads=threads or torch.get_num_threads(),
                             min_seconds=min_seconds, min_runs=min_runs)


def file_latency_ms(path: Path, input_size: tuple[int, ...], batch: int, device: str,
                    memory_format: str, backend: str = "torch") -> float | None:
    """`measure_latency` (backend "torch") or `exported_latency_ms` of the stage holding the
    file (the other backends), or None (with a warning saying why) when the file is missing
    or cannot be measured: the report then shows the row without latency."""
    if not path.is_file():
        return None
    try:
        if LATENCY_BACKENDS.get(backend) is None:
            return measure_latency(path, input_size, batch, device, memory_format)
        return exported_latency_ms(path.parent, backend, batch, memory_format)
    except Exception as err:  # report the row without latency, say why
        log.warning("latency of %s (%s) not measured: %s", path, backend, first_line(err))
        return None


def input_size_of(run_dir: Path) -> tuple[int, int, int]:
    """(C, H, W) the run's models take, from its resolved data config."""
    data = read_config(run_dir).get("data") or {}
    try:
        return tuple(input_size(Loader(str(run_dir / CONFIG_FILE)).load(DataConfig, data,
                                                                        "data")))
    except Exception:  # an older or foreign config: the usual sizes
        if data.get("dataset") == "synthetic":
            s = data.get("image_size") or (data.get("synthetic") or {}).get("image_size", 32)
        else:
            s = data.get("image_size") or (224 if data.get("dataset") == "imagefolder" else 32)
        return (3, int(s), int(s))


__all__ = ["MEMORY_FORMATS", "LATENCY_BACKENDS", "check_backend", "latency_device",
           "latency_device_for", "exported_latency_ms", "in_memory_format", "sync", "timed_forward",
           "warm_up", "median_seconds", "interleaved_median_seconds", "model_latency_ms",
           "measure_latency", "file_latency_ms", "input_size_of"]
