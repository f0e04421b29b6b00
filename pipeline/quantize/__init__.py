"""Static int8 quantization of a stage's network: calibration data, the two backends
(onnxruntime QDQ and PyTorch's PT2E flow), fake quantization for quantization-aware
training, and the check of an int8 model against its fp32 source.

    calibration.py  the calibration batches (training split or validation split) and
                    their checks
    base.py         the backend interface and the errors (a missing package: exit 2)
    backends.py     the registry of backends
    ort.py          onnxruntime: QDQ ONNX with per-channel int8 weights, CPU provider
    pt2e.py         torch.export + the x86 quantizer (torchao), saved as a .pt2 program
    fakequant.py    fake-quantized Conv/Linear for QAT, and their removal
    verify.py       top-1 agreement and accuracy of the int8 model against fp32
    timing.py       the forward time of an artifact in its runtime
"""

from .backends import BACKENDS, backend_of
from .base import (
    DEFAULT_BACKEND,
    OBSERVERS,
    Backend,
    MissingBackendError,
    QuantizeError,
    Runner,
)
from .calibration import CalibrationError, calibration_batches, check_calibration
from .fakequant import (
    attach_fake_quant,
    calibrate_fake_quant,
    learned_ranges,
    remove_fake_quant,
)
from .timing import artifact_latency_ms
from .verify import Agreement, accuracy, agreement

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "OBSERVERS", "Backend", "MissingBackendError",
           "QuantizeError", "Runner", "backend_of", "CalibrationError", "calibration_batches",
           "check_calibration", "attach_fake_quant", "calibrate_fake_quant", "learned_ranges",
           "remove_fake_quant", "Agreement", "accuracy", "agreement", "artifact_latency_ms"]
