"""`precision: auto`: the precision (and, on the CPU, the memory format) a training stage
computes fastest in on the machine it runs on, decided once at the stage's start.

On CUDA the rule is fixed: bf16 autocast where the GPU computes it natively (compute
capability 8.0 and newer: Ampere, Hopper; not the emulated bf16 of a V100 or T4), else fp16
autocast with a GradScaler.
On the CPU no rule holds: bf16 is ~1.9x faster than fp32 on a CPU with AMX (Intel Sapphire
Rapids and newer) and 3-10x slower on one without (bf16 emulated through fp32 convolutions),
and channels_last wins or loses by model and batch. So `probe` times a few training steps
(forward, loss, backward, SGD step) of the stage's own model on a real batch of the stage's
own size in each of fp32 / bf16 x NCHW / channels_last, on a copy of the model (the weights
the stage trains are not touched), and picks the fastest. Where oneDNN has no bf16 kernels
for the CPU (`cpu_has_bf16`: no AVX-512 BW/VL/DQ, AVX-512 BF16, AMX or Arm bf16, e.g. an
AVX2-only AMD EPYC, where a bf16 ResNet-20 step measured 10.3 s against 0.57 s in fp32
channels_last) bf16 is not timed at all: two of its steps would cost more than the rest of
the probe.

The decision is a plain dict (`Decision.as_dict`) stored in the stage's checkpoints, summary
and the run's provenance, so a resumed stage reuses it instead of probing again: a stage
never switches precision halfway.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

log = logging.getLogger("pipeline")

AUTO = "auto"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# (precision, channels_last): the candidates the CPU probe times, in this order
CANDIDATES = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))
WARMUP_STEPS = 1  # untimed: oneDNN creates its kernels on the first step of a shape
TIMED_STEPS = 2  # timed steps per candidate, in rounds (the fastest is kept)
HOPELESS = 1.5  # stop timing a candidate whose first step is this many times the best


@dataclass
class Decision:
    """What `precision: auto` chose for a stage, and why."""

    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    how: str  # "cpu probe" | "cuda rule" | "config"
    device: str = "cpu"
    batch: int | None = None
    seconds_per_step: dict[str, float] = field(default_factory=dict)  # the probe's timings
    clock: str = "wall"  # what the probe timed: "wall", or "cpu" on a loaded machine
    note: str = ""  # e.g. why bf16 was not timed

    @property
    def label(self) -> str:
        return candidate_name(self.precision, self.channels_last)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        return cls(precision=str(d["precision"]), channels_last=bool(d["channels_last"]),
                   how=str(d.get("how", "stored")), device=str(d.get("device", "cpu")),
                   batch=d.get("batch"),
                   seconds_per_step={str(k): float(v)
                                     for k, v in (d.get("seconds_per_step") or {}).items()},
                   clock=str(d.get("clock", "wall")), note=str(d.get("note", "")))

    def describe(self) -> str:
        """One line for the log."""
        head = f"precision auto ({self.how} on {self.device}): {self.label}"
        if not self.seconds_per_step:
            return head + (f"; {self.note}" if self.note else "")
        times = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.seconds_per_step.items())
        clock = ("wall time" if self.clock == "wall" else
                 "CPU time of this process: other processes load the machine")
        note = f"; {self.note}" if self.note else ""
        step = "forward pass" if "inference" in self.how else "training step"
        return f"{head}; per {step} at batch {self.batch} ({clock}): {times}{note}"


def candidate_name(precision: str, channels_last: bool) -> str:
    return f"{precision}{' channels_last' if channels_last else ''}"


def autocast(device: torch.device, precision: str):
    """Autocast for bf16/fp16; nothing for fp32."""
    dtype = DTYPES[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively: compute capability 8.0 or newer (Ampere,
    Hopper, ...), or ROCm. `torch.cuda.is_bf16_supported()` also says True on a V100 or
    T4, where bf16 runs emulated (slow, some kernels missing)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def cuda_rule(device: torch.device, channels_last: bool) -> Decision:
    """bf16 where the GPU computes it natively, else fp16 (the trainer adds a GradScaler)."""
    bf16 = native_bf16(device)
    return Decision("bf16" if bf16 else "fp16", channels_last, "cuda rule", str(device))


def eval_precision(precision: str, device: torch.device) -> str:
    """The precision an evaluation-only pass uses for `precision` (auto: the CUDA rule on
    a GPU, fp32 on the CPU, where nothing is trained that a probe could be sized on)."""
    if precision != AUTO:
        return precision
    if torch.device(device).type == "cuda":
        return cuda_rule(torch.device(device), False).precision
    return "fp32"


def time_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
              optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one training step (forward, loss,
    backward, optimizer step)."""
    start, cpu = time.perf_counter(), time.process_time()
    with autocast(x.device, precision):
        loss = nn.functional.cross_entropy(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start, time.process_time() - cpu


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_clock() -> str:
    """What the CPU probe should time: wall time on a machine this process has to itself;
    its own CPU time when other processes keep the CPUs busy (1-minute load average above
    the CPUs available), where wall time would time them: measured with ~5 busy processes
    on 2 cores, the wall time of one fp32 step scattered between 2.6 and 25 s."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "wall"
    return "cpu" if load > cpus_available() else "wall"


class _Candidate:
    """A copy of the model in one (precision, memory format) setting, ready to step."""

    def __init__(self, model: nn.Module, x: torch.Tensor, precision: str, channels_last: bool):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.precision = precision
        self.net = copy.deepcopy(model).to(memory_format=fmt).train()
        self.x = x.contiguous(memory_format=fmt)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1e-6, momentum=0.9)

    def step(self, y: torch.Tensor, clock: str) -> float:
        wall, cpu = time_step(self.net, self.x, y, self.precision, self.opt)
        return cpu if clock == "cpu" else wall


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, candidates=CANDIDATES,
            clock: str = "wall") -> dict[tuple[str, bool], float]:
    """Seconds per training step of each candidate setting, on copies of `model`: after an
    untimed warmup step each, the candidates take turns, one timed step per round, so a
    change in the machine's load hits all of them alike; each keeps its fastest step (other
    processes only ever make a step slower). A candidate whose first timed step takes over
    HOPELESS x the best one is not timed again."""
    runs = {c: _Candidate(model, x, *c) for c in candidates}
    for run in runs.values():
        for _ in range(WARMUP_STEPS):
            run.step(y, clock)
    times: dict[tuple[str, bool], list[float]] = {c: [] for c in candidates}
    for r in range(TIMED_STEPS):
        best = min((min(t) for t in times.values() if t), default=None)
        for c, run in runs.items():
            if r and best is not None and times[c][0] > HOPELESS * best:
                continue
            times[c].append(run.step(y, clock))
    return {c: min(t) for c, t in times.items()}


def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, candidates=CANDIDATES,
          clock: str | None = None) -> Decision:
    """Time each (precision, channels_last) candidate on a real batch; the fastest wins
    (ties go to the earlier candidate: fp32 before bf16, NCHW before channels_last).
    `clock`: "wall" or "cpu" (default: `machine_clock()`)."""
    clock = clock or machine_clock()
    measured = measure(model, x, y, candidates, clock)
    best = min(candidates, key=lambda c: measured[c])  # min keeps the first of equals
    timings = {candidate_name(*c): round(float(measured[c]), 6) for c in candidates}
    return Decision(best[0], best[1], "cpu probe", str(x.device), int(x.shape[0]), timings,
                    clock)


def no_bf16_note() -> str:
    """Why a probe did not time bf16 (a decision's `note`)."""
    return (f"bf16 not timed: oneDNN has no bf16 kernels for this CPU "
            f"({torch.backends.cpu.get_cpu_capability()})")


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (its own check: AVX-512 BW/VL/DQ,
    AVX-512 BF16, AMX or Arm bf16). Without them bf16 autocast takes a reference path many
    times slower than fp32. Unknown (the check missing from a torch build): True, so the
    probe times bf16 and finds out."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def decide(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor] | None,
           device: torch.device, channels_last: bool) -> Decision:
    """The decision for a stage with `precision: auto` that starts afresh: the CUDA rule on
    a GPU (memory format as configured), the probe on the CPU (`batch`: a real training
    batch of the stage's size)."""
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_rule(device, channels_last)
    if batch is None:
        return Decision("fp32", channels_last, "no batch to probe", str(device))
    x, y = batch
    candidates, note = CANDIDATES, ""
    if not cpu_has_bf16():
        candidates = tuple(c for c in CANDIDATES if c[0] != "bf16")
        note = no_bf16_note()
    with torch.random.fork_rng(devices=[]):  # the probe leaves the run's RNG streams alone
        decision = probe(model, x, y, candidates)
    decision.note = note
    return decision


def time_forward(model: nn.Module, x: torch.Tensor, precision: str) -> float:
    """Wall seconds of one no-grad forward pass of `model` on `x` in `precision`."""
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(x.device, precision):
        model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0


def decide_inference(model: nn.Module, x: torch.Tensor | None,
                     device: torch.device) -> Decision:
    """`precision: auto` for a stage that only evaluates, many times over (a sensitivity
    sweep: hundreds of evaluations of one model's variants): on CUDA the CUDA rule; on the
    CPU the faster of fp32 and bf16 forward passes of `model` (eval mode, a copy) on the
    batch `x`, in x's memory format, bf16 only where oneDNN has bf16 kernels. bf16 rounds
    the logits: an accuracy can differ from fp32's in the last decimals."""
    device = torch.device(device)
    channels_last = bool(x is not None and x.dim() == 4 and not x.is_contiguous()
                         and x.is_contiguous(memory_format=torch.channels_last))
    if device.type == "cuda":
        return cuda_rule(device, channels_last)
    if x is None:
        return Decision("fp32", channels_last, "no batch to probe", str(device))
    if not cpu_has_bf16():
        return Decision("fp32", channels_last, "cpu probe", str(device), int(x.shape[0]),
                        note=no_bf16_note())
    net = copy.deepcopy(model).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for p in times:
        time_forward(net, x, p)  # untimed: oneDNN builds its kernels for the shape
    for _ in range(TIMED_STEPS):
        for p in times:
            times[p].append(time_forward(net, x, p))
    best = {p: min(t) for p, t in times.items()}
    choice = min(best, key=best.get)  # ties: fp32
    return Decision(choice, channels_last, "cpu inference probe", str(device), int(x.shape[0]),
                    {candidate_name(p, channels_last): round(t, 6) for p, t in best.items()})


__all__ = ["AUTO", "CANDIDATES", "Decision", "autocast", "candidate_name", "cpu_has_bf16",
           "cuda_rule", "decide", "decide_inference", "eval_precision", "machine_clock",
           "native_bf16",
           "measure", "probe", "time_forward", "time_step"]
