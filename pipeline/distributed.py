"""Process-group set-up for torchrun, and the few collective helpers the trainer needs.

Launched with `torchrun --nproc_per_node N -m pipeline run CONFIG` (multi-node through
torchrun's own rendezvous options), each process reads RANK / WORLD_SIZE / LOCAL_RANK from
the environment; nccl is used on CUDA, gloo on CPU. A plain `python -m pipeline run` is a
world of one and needs no process group: every helper here is then a no-op.

Batch sizes in configs are global: each rank takes a contiguous share of every global
batch (see `pipeline.data`), so a run's result does not depend on the number of processes
beyond floating-point summation order and per-rank BatchNorm statistics (`sync_bn`).

Failures: a rank that fails alone (an unreadable file in its shard, rank 0's disk full in a
checkpoint write) must not leave the others blocked in the next collective. The places
where one rank can fail alone run inside `together()`: every rank learns of the failure and
raises the same one-line error. Decisions read from the shared filesystem (is a stage
complete, does an input exist) are rank 0's, broadcast (`decide`): on NFS another node's
view may be stale.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError, opt
from .errors import EXIT_FAILED, PipelineError, first_line


@dataclass
class DistributedConfig:
    timeout_minutes: float = opt(
        60, "how long a rank waits in a collective before the job fails (torchrun; long "
        "enough for rank 0 to decode and cache an ImageNet-size folder)", gt=0)
    backend: Literal["auto", "nccl", "gloo"] = opt(
        "auto", "process-group backend: auto = nccl on CUDA, gloo on the CPU; gloo on CUDA "
        "lets several processes share one GPU (local rank k on GPU k mod count: checks on a "
        "1-GPU machine; slower collectives than nccl)")


class RankFailure(PipelineError):
    """A failure on some rank, raised on every rank (so the job stops as one)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code
        self.all_ranks = True


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """This process's place in the torchrun world (a world of one without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return DistInfo(int(os.environ.get("RANK", 0)), world,
                    int(os.environ.get("LOCAL_RANK", 0)),
                    int(os.environ.get("LOCAL_WORLD_SIZE", world)))


DEVICE_FORMS = "auto, cpu, cuda or cuda:N"


def check_device(name: Any, where: str) -> torch.device | None:
    """The device `name` asks for, checked against this machine: a ConfigError naming
    `where` (a file and key, or a flag) for a name that is not auto, cpu, cuda or cuda:N,
    for CUDA on a machine without it, and for a GPU index beyond the visible ones. None
    for `auto`."""
    text = str(name).strip().lower() if isinstance(name, str) else None
    if text == "auto":
        return None
    kind, _, index = (text or "").partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise ConfigError(f"{where}: expected {DEVICE_FORMS}, got {str(name)[:60]!r}")
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"{where}: {text}: CUDA is not available on this machine "
                          "(torch.cuda.is_available() is false); use auto or cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ConfigError(f"{where}: {text}: this machine has {count} visible GPU(s), "
                          f"cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", int(index)) if index else torch.device("cuda")


def resolve_device(name: str, info: DistInfo, source: str = "config",
                   backend: str = "auto") -> torch.device:
    """`auto` -> this process's CUDA device when CUDA is present, else the CPU; `cuda` ->
    cuda:LOCAL_RANK. Under torchrun each local rank needs a GPU of its own (NCCL refuses
    two ranks on one device): more local ranks than visible GPUs, or one explicit `cuda:N`
    for every rank, is a config error; with the gloo `backend` ranks share the GPUs
    (cuda:LOCAL_RANK mod count). `source` is a config file (its `device` key is meant) or
    a flag such as `--device`."""
    where = source if source.startswith("--") else f"{source}: device"
    checked = check_device(name, where)
    if checked is None and not torch.cuda.is_available():
        return torch.device("cpu")
    dev = checked if checked is not None else torch.device("cuda")
    if dev.type != "cuda":
        return dev
    if info.enabled and dev.index is not None:
        raise ConfigError(f"{where}: {name} would put all {info.world_size} "
                          "processes on one GPU; under torchrun use device: cuda (or auto): "
                          "local rank k takes cuda:k (choose GPUs with CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count()
    if info.enabled and backend == "gloo" and dev.index is None:
        return torch.device("cuda", info.local_rank % max(count, 1))
    if info.enabled and info.local_world_size > count:
        raise ConfigError(f"{where}: {name}: torchrun starts {info.local_world_size} "
                          f"processes on this node but {count} GPU(s) are visible; NCCL needs "
                          f"one GPU per process: use --nproc_per_node {count} or device: cpu")
    return torch.device("cuda", info.local_rank if dev.index is None else dev.index)


_joined = False


def joined() -> bool:
    """Whether this process has joined a process group (its errors may be its own)."""
    return _joined


def init(info: DistInfo, device: torch.device, timeout_minutes: float = 60,
         backend: str = "auto") -> None:
    """Make `device` current (CUDA) and join the process group torchrun set up: `backend`,
    by default nccl on CUDA and gloo on the CPU, collectives failing after
    `timeout_minutes`."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # also in a single process: cuda:N, not cuda:0
    if not info.enabled or dist.is_initialized():
        return
    global _joined
    _joined = True
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a checkpoint)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":  # name the device, or nccl guesses (and warns)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over ranks in place (on its own device: nccl needs CUDA tensors)."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of `t` over ranks, in place."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def broadcast_object(obj):
    """Rank 0's value of a small picklable object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's value of a small picklable object, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def decide(question: Callable[[], Any]):
    """Rank 0's answer to `question` (e.g. a look at the shared filesystem), on every rank."""
    if not dist.is_initialized():
        return question()
    return broadcast_object(question() if dist.get_rank() == 0 else None)


def read_on_rank0(read: Callable[[], Any]):
    """Rank 0's result of `read()` (a file of the shared filesystem, e.g. a checkpoint a
    resume continues from) on every rank: another node's stale view can neither miss it
    nor see an older one; a failure on rank 0 fails every rank (`together`)."""
    if not dist.is_initialized():
        return read()
    value = None
    with together():
        if dist.get_rank() == 0:
            value = read()
    return broadcast_object(value)


@contextlib.contextmanager
def together() -> Iterator[None]:
    """Run a block that may fail on one rank alone (file I/O, decoding its shard) and must
    not contain collectives: when it raised on any rank, every rank raises `RankFailure`
    with the first failing rank's one-line message and exit code. The block's end is a
    barrier (an exchange of outcomes)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as err:  # reported to every rank below
        error = err
    mine = None if error is None else (
        first_line(error), getattr(error, "exit_code", EXIT_FAILED), type(error).__name__)
    outcomes = all_gather_object(mine)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    rank, (message, code, _) = failed[0]
    raise RankFailure(message if rank == 0 else f"rank {rank}: {message}", code) from error


def broadcast_buffers(*modules: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics, ...) in `modules` on every rank:
    before an evaluation or a checkpoint, so that every rank evaluates the model that is
    saved."""
    if not dist.is_initialized():
        return
    for m in modules:
        for b in m.buffers():
            dist.broadcast(b.data, src=0)
