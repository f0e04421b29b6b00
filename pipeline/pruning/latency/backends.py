"""The runtimes a model is timed in, each turning a network into a function that runs one
fixed batch the way a deployment would.

  torch        eager PyTorch in eval mode under inference_mode (channels_last optional)
  onnxruntime  exported to ONNX (BN folded) and run by onnxruntime's CPU execution
               provider, or its CUDA provider on a GPU
  torchscript  traced and frozen (BN folded into the convolutions), run by torch.jit
  compile      torch.compile (inductor); compiling takes seconds per shape, so a table
               takes long to build
  tensorrt     ONNX parsed into a TensorRT engine (needs the `tensorrt` package and a GPU)

`problem(cfg)` says, in one line, why a backend cannot run here (None when it can); the
stages' preflight turns that into a config error. Every runner synchronises the device
before it returns, so its wall time is the batch's.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn as nn

from ...onnxrt import CPU, DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, quiet, to_onnx
from ...onnxrt import load as onnx_load
from ...timing import torch_threads
from .config import LatencyConfig

Runner = Callable[[], object]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_HINT = "pip install 'prune-pipeline[export]'"


def device_of(cfg: LatencyConfig) -> torch.device:
    """The device a latency config times on (auto: cuda when present, else cpu)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_problem(cfg: LatencyConfig) -> str | None:
    dev = device_of(cfg)
    if dev.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return f"device {cfg.device}: no CUDA device on this machine"
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"device {cfg.device}: this machine has {torch.cuda.device_count()} GPU(s)"
    return None


class TorchBackend:
    """Eager PyTorch."""

    name = "torch"

    def problem(self, cfg: LatencyConfig) -> str | None:
        if cfg.precision == "fp16" and device_of(cfg).type == "cpu":
            return "precision fp16 on the CPU: PyTorch has no fast fp16 convolution there"
        return _cuda_problem(cfg)

    def prepare(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
        model, x, dev = self._placed(model, x, cfg)
        return self._runner(model, x, dev)

    @staticmethod
    def _placed(model: nn.Module, x: torch.Tensor, cfg: LatencyConfig
                ) -> tuple[nn.Module, torch.Tensor, torch.device]:
        """The model (eval) and input on cfg's device, precision and memory layout."""
        dev = device_of(cfg)
        fmt = torch.channels_last if cfg.channels_last and x.dim() == 4 \
            else torch.contiguous_format
        model = model.eval().to(device=dev, dtype=DTYPES[cfg.precision], memory_format=fmt)
        x = x.to(device=dev, dtype=DTYPES[cfg.precision]).contiguous(memory_format=fmt)
        return model, x, dev

    @staticmethod
    def _runner(model: Callable, x: torch.Tensor, dev: torch.device) -> Runner:
        def run() -> object:
            with torch.inference_mode():
                out = model(x)
            _sync(dev)
            return out
        return run


class TorchScriptBackend(TorchBackend):
    """torch.jit.trace + freeze: BN folded, weights constants."""

    name = "torchscript"

    def prepare(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
        model, x, dev = self._placed(model, x, cfg)
        with quiet(), torch.no_grad():
            module = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))
        return self._runner(module, x, dev)


class CompileBackend(TorchBackend):
    """torch.compile with inductor, shapes static."""

    name = "compile"

    def problem(self, cfg: LatencyConfig) -> str | None:
        if not hasattr(torch, "compile"):
            return "torch.compile is not in this torch"
        return super().problem(cfg)

    def prepare(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
        model, x, dev = self._placed(model, x, cfg)
        return self._runner(torch.compile(model, dynamic=False), x, dev)


def layer_onnx(layer: nn.Module, x: torch.Tensor) -> bytes:
    """A one-layer ONNX graph (Conv2d with its bias, or Linear as MatMul + Add), written
    directly: what the exporter writes for the layer, in milliseconds instead of seconds."""
    from onnx import TensorProto, helper, numpy_helper

    w = layer.weight.detach().float().numpy()
    b = (layer.bias.detach().float().numpy() if layer.bias is not None
         else torch.zeros(w.shape[0]).numpy())
    if isinstance(layer, nn.Conv2d):
        pads = [int(p) for p in layer.padding] * 2
        node = [helper.make_node("Conv", [INPUT_NAME, "w", "b"], [OUTPUT_NAME],
                                 kernel_shape=list(layer.kernel_size),
                                 strides=list(layer.stride), pads=pads,
                                 dilations=list(layer.dilation), group=layer.groups)]
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    else:
        node = [helper.make_node("MatMul", [INPUT_NAME, "wt"], ["y"]),
                helper.make_node("Add", ["y", "b"], [OUTPUT_NAME])]
        inits = [numpy_helper.from_array(w.T.copy(), "wt"), numpy_helper.from_array(b, "b")]
    with torch.no_grad():
        out_shape = list(layer(x[:1]).shape)
    out_shape[0] = x.shape[0]
    graph = helper.make_graph(
        node, "layer", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT,
                                                      list(x.shape))],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", DEFAULT_OPSET)]
                             ).SerializeToString()


def _onnx_of(model: nn.Module, x: torch.Tensor) -> bytes:
    if isinstance(model, (nn.Conv2d, nn.Linear)) and x.dtype == torch.float32:
        return layer_onnx(model, x)
    return to_onnx(model, x)


class OnnxRuntimeBackend:
    """ONNX in onnxruntime: the CPU execution provider, or CUDA's on a GPU."""

    name = "onnxruntime"

    def problem(self, cfg: LatencyConfig) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None \
                or importlib.util.find_spec("onnx") is None:
            return f"backend onnxruntime needs onnx and onnxruntime: {EXPORT_HINT}"
        if cfg.channels_last:
            return "channels_last: onnxruntime picks its own layout (leave it false)"
        dev = device_of(cfg)
        if dev.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return (f"device {cfg.device}: this onnxruntime has no CUDA execution "
                        "provider (install onnxruntime-gpu, or use device cpu)")
            return _cuda_problem(cfg)
        if cfg.precision != "fp32":
            return f"precision {cfg.precision}: onnxruntime's CPU provider runs fp32 here"
        return None

    def prepare(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
        dev = device_of(cfg)
        dtype = DTYPES[cfg.precision]
        model = model.eval().to(device="cpu", dtype=dtype)
        x = x.to(dtype=dtype)
        data = _onnx_of(model, x)
        providers = [CPU]
        if dev.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": dev.index or 0}), CPU]
        session = onnx_load(data, cfg.threads, providers)
        feed = {INPUT_NAME: x.contiguous().numpy()}
        return lambda: session.run(None, feed)


class TensorRTBackend:
    """An ONNX export built into a TensorRT engine (fp32 or fp16), run on the GPU."""

    name = "tensorrt"

    def problem(self, cfg: LatencyConfig) -> str | None:
        if importlib.util.find_spec("tensorrt") is None:
            return "backend tensorrt: the tensorrt package is not installed on this machine"
        if device_of(cfg).type != "cuda":
            return f"backend tensorrt runs on a GPU, not device {cfg.device}"
        if cfg.precision == "bf16":
            return "precision bf16: use fp32 or fp16 with tensorrt"
        if cfg.channels_last:
            return "channels_last: TensorRT picks its own layout (leave it false)"
        return _cuda_problem(cfg)

    def prepare(self, model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
        import tensorrt as trt

        dev = device_of(cfg)
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(_onnx_of(model.eval().cpu().float(), x.float())):
            raise RuntimeError(f"TensorRT cannot parse the model: {parser.get_error(0)}")
        config = builder.create_builder_config()
        if cfg.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        engine = trt.Runtime(logger).deserialize_cuda_engine(
            builder.build_serialized_network(network, config))
        context = engine.create_execution_context()
        xin = x.float().to(dev).contiguous()
        out_name = engine.get_tensor_name(1)
        out = torch.empty(tuple(engine.get_tensor_shape(out_name)), device=dev)
        context.set_tensor_address(engine.get_tensor_name(0), xin.data_ptr())
        context.set_tensor_address(out_name, out.data_ptr())
        stream = torch.cuda.Stream(dev)

        def run() -> object:
            context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
            return out
        return run


BACKENDS = {b.name: b for b in (TorchBackend(), OnnxRuntimeBackend(), TorchScriptBackend(),
                                CompileBackend(), TensorRTBackend())}


def backend_problem(cfg: LatencyConfig) -> str | None:
    """Why `cfg` cannot be timed on this machine, in one line (None: it can)."""
    return BACKENDS[cfg.backend].problem(cfg)


def prepare(model: nn.Module, x: torch.Tensor, cfg: LatencyConfig) -> Runner:
    """`model` made ready in cfg's backend, as a function running the batch `x` once."""
    with torch_threads(cfg.threads):
        return BACKENDS[cfg.backend].prepare(model, x, cfg)


__all__ = ["BACKENDS", "DTYPES", "Runner", "backend_problem", "device_of", "to_onnx",
           "prepare"]
