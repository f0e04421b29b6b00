"""The keys of a latency target: `target_speedup` or `target_latency_ms`, and `latency`
(the runtime the model is deployed on), with their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ...config import Invalid, opt

BACKEND_NAMES = ("torch", "onnxruntime", "torchscript", "compile", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
MAX_SPEEDUP = 100.0


@dataclass
class LatencyConfig:
    """Where the pruned model must be fast: the runtime, batch, device and threads it is
    timed with (the latency table and the end-to-end check both run there)."""

    backend: Literal[BACKEND_NAMES] = opt(  # type: ignore[valid-type]
        "torch", "the runtime timed: torch (eager), onnxruntime (CPU provider; CUDA provider "
        "with device cuda), torchscript (frozen), compile (torch.compile), tensorrt (when the "
        "tensorrt package imports and a GPU is present)")
    batch_size: int = opt(1, "the deployment batch size every measurement runs at", min=1,
                          max=65536)
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (cuda when present, else cpu)")
    threads: int | None = opt(None, "intra-op threads on the CPU (default: torch's count)",
                              min=1, max=1024)
    precision: Literal[PRECISIONS] = opt(  # type: ignore[valid-type]
        "fp32", "weights and input of the timed model: fp32 | fp16 | bf16")
    channels_last: bool = opt(False, "torch, torchscript, compile: NHWC weights and input")
    runs: int = opt(15, "timed runs per end-to-end measurement (median; warm-up discarded)",
                    min=3, max=10000)
    warmup: int = opt(3, "untimed runs before timing (per model)", min=1, max=1000)
    scan_points: int = opt(16, "widths each group's staircase is scanned at (a power-of-two "
                           "step; more: finer stairs, a longer table build)", min=2, max=4096)
    table_runs: int = opt(5, "timed runs per table entry (median)", min=1, max=1000)
    max_iterations: int = opt(5, "re-searches with a tightened budget when the measured "
                              "speedup misses the target", min=1, max=20)
    cache: Literal["run", "user", "none"] = opt(
        "run", "where the latency table is kept for reuse: run (<run dir>/latency_cache), "
        "user ($XDG_CACHE_HOME/prune-pipeline/latency, shared by runs on this machine) or "
        "none")

    def validate(self) -> None:
        if self.device != "auto" and self.device != "cpu" and not _is_cuda(self.device):
            raise Invalid("device", f"expected cpu, cuda, cuda:N or auto, got {self.device!r}")


def _is_cuda(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and (not index or index.isdigit())


def finite(key: str, value: float | None) -> None:
    """Invalid for a NaN or infinite number (YAML's .nan / .inf pass a range check)."""
    if value is not None and not math.isfinite(value):
        raise Invalid(key, f"expected a finite number, got {value}")


def validate_target(target_speedup: float | None, target_latency_ms: float | None,
                    others: dict[str, object]) -> None:
    """The latency target keys: finite, in range, exclusive with each other and with the
    other ways of saying how much to prune (`others`: key -> value, None when unset)."""
    finite("target_speedup", target_speedup)
    finite("target_latency_ms", target_latency_ms)
    if target_speedup is not None and not 1.0 < target_speedup <= MAX_SPEEDUP:
        raise Invalid("target_speedup", f"expected a number in (1, {MAX_SPEEDUP:g}], got "
                      f"{target_speedup:g}")
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise Invalid("target_latency_ms", f"expected a number > 0, got {target_latency_ms:g}")
    if target_speedup is not None and target_latency_ms is not None:
        raise Invalid("target_latency_ms", "give either target_speedup or target_latency_ms, "
                      "not both")
    key = "target_speedup" if target_speedup is not None else "target_latency_ms"
    if target_speedup is None and target_latency_ms is None:
        return
    for other, value in others.items():
        if value not in (None, False, [], {}):
            raise Invalid(key, f"a latency target decides the widths itself: leave {other} "
                          "unset")




@dataclass
class LatencyTargetKeys:
    """The keys of a stage that prunes to a measured time (prune, iterative)."""

    target_speedup: float | None = opt(
        None, "prune until the model runs this many times faster than the input in the "
        "`latency` runtime (measured end to end); instead of ratio", gt=1, max=MAX_SPEEDUP)
    target_latency_ms: float | None = opt(
        None, "prune until one batch takes at most this many ms in the `latency` runtime; "
        "instead of ratio", gt=0)
    latency: LatencyConfig | None = opt(
        None, "the runtime a latency target (or round_to: auto) is measured in, e.g. "
        "{backend: onnxruntime, batch_size: 32, device: cpu, threads: 2}; default: torch, "
        "batch 1, device auto")

    @property
    def has_latency_target(self) -> bool:
        return self.target_speedup is not None or self.target_latency_ms is not None

    def latency_config(self) -> LatencyConfig:
        """`latency`, or the defaults when it is unset."""
        return self.latency if self.latency is not None else LatencyConfig()


__all__ = ["BACKEND_NAMES", "LatencyConfig", "LatencyTargetKeys", "PRECISIONS", "finite",
           "validate_target"]
