"""Exporting a stage's network for deployment: ONNX, TorchScript or a torch.export program,
verified against the PyTorch model on export, with the run's provenance attached.

    python -m pipeline export RUN_DIR/STAGE --format onnx|torchscript|exported

`export_stage` writes and verifies a file (exporter.py), `load_exported` runs one in its own
runtime, `read_metadata` reads the provenance it carries, `time_exported` times it. What each
format folds is in formats.py; the tolerances in verify.py.
"""

from .exporter import ExportOptions, ExportResult, default_out, export_stage
from .formats import (
                      DEFAULT_OPSET,
                      FORMATS,
                      INSTALL_HINT,
                      MAX_OPSET,
                      MIN_OPSET,
                      ExportError,
                      MissingExtraError,
                      load_exported,
                      read_metadata,
                      sidecar_path,
)
from .source import ExportUsageError
from .timing import time_exported
from .verify import Check

__all__ = ["ExportOptions", "ExportResult", "export_stage", "default_out", "DEFAULT_OPSET",
           "MIN_OPSET", "MAX_OPSET",
           "FORMATS", "INSTALL_HINT", "ExportError", "ExportUsageError", "MissingExtraError",
           "load_exported", "read_metadata", "sidecar_path", "time_exported", "Check"]
