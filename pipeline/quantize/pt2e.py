"""The PT2E backend: the network captured with `torch.export`, annotated by the x86
inductor quantizer (torchao's PT2E flow; `torch.ao.quantization.quantize_pt2e` moved there
and is no longer in torch), calibrated, converted (weights int8 per output channel,
activations uint8 per tensor, BatchNorm folded) and saved as a torch.export program (.pt2)
with the provenance in the file (`extra_files`). `torch.export.load(...).module()` runs it
with reference (quantize -> fp32 op -> dequantize) kernels; `torch.compile` lowers it to
oneDNN int8 kernels, the deployment form (`compiled=True`).

Observers: minmax is torchao's MinMaxObserver; entropy is its HistogramObserver (a search
over the histogram for the range of least L2 quantization error, PyTorch's counterpart of a
KL-entropy calibration); percentile keeps the mean over calibration batches of each batch's
low and high percentile."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch._inductor import config as inductor_config

from ..onnxrt import quiet
from .base import INSTALL_HINT, MissingBackendError, Ranges, Runner, note_learned, widen

META_FILE = "pipeline_metadata.json"
MAX_BATCH = 65536
SAMPLE = 1 << 20  # values per batch a percentile is taken over (a strided subsample)


def _packages():
    try:
        from torchao.quantization.pt2e import observer
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
    except ImportError as err:
        raise MissingBackendError(f"backend pt2e needs torchao (PyTorch's PT2E quantization "
                                  f"flow; {err.name} is not importable): {INSTALL_HINT}") from None
    return observer, prepare_pt2e, convert_pt2e, x86


def _percentile_observer(observer_mod):
    """A MinMaxObserver whose range is the mean over batches of each batch's percentiles."""

    class PercentileObserver(observer_mod.MinMaxObserver):
        def __init__(self, percentile: float = 99.999, **kwargs):
            super().__init__(**kwargs)
            self.percentile = percentile
            self.register_buffer("batches", torch.zeros((), dtype=torch.long))

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.numel() == 0:
                return x_orig
            x = x_orig.detach().float().flatten()
            x = x[::max(1, x.numel() // SAMPLE)]
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            lo, hi = torch.quantile(x, q.to(x.device))
            n = self.batches.float()
            if int(self.batches) == 0:
                self.min_val, self.max_val = lo.reshape(()), hi.reshape(())
            else:
                self.min_val = (self.min_val * n + lo) / (n + 1)
                self.max_val = (self.max_val * n + hi) / (n + 1)
            self.batches += 1
            return x_orig

    return PercentileObserver


def quantization_config(observer: str, percentile: float):
    """The x86 inductor quantizer's default config, its activation observer as asked."""
    obs, _, _, x86 = _packages()
    config = x86.get_default_x86_inductor_quantization_config()
    ctor = {"minmax": obs.MinMaxObserver, "entropy": obs.HistogramObserver,
            "percentile": _percentile_observer(obs)}[observer]
    kwargs = {"eps": 2 ** -12} | ({"percentile": percentile} if observer == "percentile" else {})
    spec = config.input_activation
    act = type(spec)(dtype=spec.dtype, quant_min=spec.quant_min, quant_max=spec.quant_max,
                     qscheme=spec.qscheme, is_dynamic=False,
                     observer_or_fake_quant_ctr=ctor.with_args(**kwargs))
    return type(config)(act, act, config.weight, config.bias, False)


def _reference(module: nn.Module) -> Runner:
    """The loaded program as it is: reference quantize -> fp32 op -> dequantize kernels."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), quiet():
            return module(x.float().contiguous())

    return run


def _compiled(module: nn.Module) -> Runner:
    """The program compiled by inductor with freezing (weights as constants, which the x86
    lowering needs to pick oneDNN's int8 convolutions); compiled on the first call, under
    no_grad (inference_mode trips the lowering)."""
    fn = torch.compile(module)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), quiet(), inductor_config.patch(freezing=True):
            return fn(x.float().contiguous())

    return run


LAYER_OPS = ("aten.conv2d", "aten.linear")


def _module_of(node) -> str | None:
    """The qualified name of the module whose forward made `node` (torch.export records
    the module stack of every op)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _set_ranges(prepared, ranges: Ranges, obs_mod) -> list[str]:
    """Give the observer of each named layer's input the fixed range [lo, hi] (a min/max
    observer holding it, so any observer kind is replaced; an input shared by several
    layers gets the union of their ranges). Returns the names not found."""
    span: dict[str, tuple[float, float]] = {}
    found = set()
    for node in prepared.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith(LAYER_OPS):
            continue
        name = _module_of(node)
        arg = node.args[0] if node.args else None
        if name not in ranges or getattr(arg, "op", None) != "call_module":
            continue
        widen(span, arg.target, *ranges[name])
        found.add(name)
    for target, (lo, hi) in span.items():
        old = prepared.get_submodule(target)
        fixed = obs_mod.MinMaxObserver(dtype=old.dtype, qscheme=old.qscheme,
                                       quant_min=old.quant_min, quant_max=old.quant_max,
                                       eps=float(old.eps))
        fixed.min_val, fixed.max_val = torch.tensor(lo), torch.tensor(hi)
        prepared.set_submodule(target, fixed)
    return [n for n in ranges if n not in found]


def _dynamic() -> tuple[dict, ...]:
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


class Pt2eBackend:
    name, suffix, runtime = "pt2e", ".int8.pt2", "torch.export program (torch.compile: oneDNN)"

    def require(self) -> None:
        _packages()

    def quantize(self, model: nn.Module, batches: list[torch.Tensor], observer: str,
                 percentile: float, metadata: dict, work_dir: Path,
                 reduce_range: bool = False, ranges: Ranges | None = None) -> bytes:
        obs_mod, prepare_pt2e, convert_pt2e, x86 = _packages()
        example = (batches[0][:2].contiguous(),)
        with quiet(), torch.no_grad():
            graph = torch.export.export(model.eval(), example, dynamic_shapes=_dynamic()).module()
            quantizer = x86.X86InductorQuantizer().set_global(
                quantization_config(observer, percentile))
            prepared = prepare_pt2e(graph, quantizer)
            for x in batches:
                prepared(x.contiguous())
            if ranges:
                missing = _set_ranges(prepared, ranges, obs_mod)
                note_learned(metadata, ranges, missing, "the exported program")
            converted = convert_pt2e(prepared)
            program = torch.export.export(converted, example, dynamic_shapes=_dynamic())
            buf = io.BytesIO()
            torch.export.save(program, buf, extra_files={META_FILE: json.dumps(metadata)})
        return buf.getvalue()

    def fp32_artifact(self, model: nn.Module, example: torch.Tensor, work_dir: Path) -> bytes:
        buf = io.BytesIO()
        with quiet(), torch.no_grad():
            program = torch.export.export(model.eval(), (example.contiguous(),),
                                          dynamic_shapes=_dynamic())
            torch.export.save(program, buf)
        return buf.getvalue()

    def runner(self, data: bytes | Path, threads: int | None = None,
               compiled: bool = False) -> Runner:
        self.require()
        src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
        with quiet():
            module = torch.export.load(src).module()
        return _compiled(module) if compiled else _reference(module)

    def read_metadata(self, path: Path) -> dict:
        extra = {META_FILE: ""}
        try:
            with quiet():
                torch.export.load(str(path), extra_files=extra)
            return json.loads(extra[META_FILE] or "{}")
        except (OSError, RuntimeError, ValueError):
            return {}


__all__ = ["Pt2eBackend", "quantization_config", "META_FILE"]
