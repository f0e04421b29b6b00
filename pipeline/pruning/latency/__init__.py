"""Pruning aimed at measured time in the runtime a model is deployed on.

  config    `LatencyConfig` (the `latency:` keys) and the target keys' validation
  backends  the runtimes: torch, onnxruntime, torchscript, compile, tensorrt
  timing    interleaved medians, warm-up discarded
  sites     the layers whose widths a pruning changes, with their shapes
  table     the latency model: per layer time against widths, staircases, disk cache
  search    the widths that keep the most importance within a time budget
  prune     `prune_to_latency`: table, search, surgery, end-to-end check, retries
"""

from .backends import BACKENDS, backend_problem, device_of
from .config import BACKEND_NAMES, LatencyConfig, validate_target
from .prune import LatencyResult, Target, end_to_end, latency_table, prune_to_latency, prune_widths
from .search import kept_importance, search_widths
from .table import LatencyTable, TableCache, build_table, user_cache_dir

__all__ = ["BACKENDS", "BACKEND_NAMES", "LatencyConfig", "LatencyResult", "LatencyTable",
           "TableCache", "Target", "backend_problem", "build_table", "device_of", "end_to_end",
           "kept_importance", "latency_table", "prune_to_latency", "prune_widths",
           "search_widths", "user_cache_dir", "validate_target"]
