"""Process-group set-up for torchrun, and the few collective helpers the trainer needs.

Launched with `torchrun --nproc_per_node N -m pipeline run CONFIG` (multi-node through
torchrun's own rendezvous options), each process reads RANK / WORLD_SIZE / LOCAL_RANK from
the environment; nccl is used on CUDA, gloo on CPU. A plain `python -m pipeline run` is a
world of one and needs no process group: every helper here is then a no-op.

Batch sizes in configs are global: each rank takes a contiguous share of every global
batch (see `pipeline.data`), so a run's result does not depend on the number of processes
beyond floating-point summation order and per-rank BatchNorm statistics (`sync_bn`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """This process's place in the torchrun world (a world of one without torchrun)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """`auto` -> this process's CUDA device when CUDA is present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))
    return dev


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group torchrun set up: nccl on CUDA, gloo on the CPU."""
    if not info.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


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
