"""Every random generator's state (Python, numpy, torch, CUDA), captured into a checkpoint
and restored from it, so a resumed run draws the same numbers as one never stopped; and
the kernel settings that decide whether a CUDA run is reproducible at all.

Under torchrun each rank has its own CUDA generator (seeded with seed + rank, so ranks do
not draw identical dropout masks); a checkpoint holds every rank's CUDA state and each
rank restores its own. Resume is bitwise on the CPU, and on CUDA with `deterministic:
true` (cuDNN autotuning and non-deterministic kernels otherwise change the numbers).
"""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from . import distributed as D

log = logging.getLogger("pipeline")


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """`deterministic`: deterministic cuDNN/cuBLAS kernels and an error from any op that has
    none (`torch.use_deterministic_algorithms`); else, on CUDA, cuDNN autotuning
    (`cudnn.benchmark`: the fastest convolution algorithm per input shape)."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic (read when CUDA starts)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def rng_state(device: torch.device | None = None) -> dict:
    """Python, numpy, torch and (on a CUDA `device`) every rank's CUDA generator state as
    checkpoint-safe tensors/numbers. A collective under torchrun on CUDA (the ranks' CUDA
    states are gathered); it never initializes CUDA for a CPU run."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": torch.tensor(py[1], dtype=torch.int64), "python_gauss": py[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]),
             "numpy_gauss": float(np_state[4]), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda_ranks"] = D.all_gather_object(torch.cuda.get_rng_state(device))
    return state


def set_rng_state(state: dict, device: torch.device | None = None, rank: int = 0,
                  world_size: int = 1) -> None:
    """Restore what `rng_state` captured: on CUDA, rank `rank`'s own generator state when
    the checkpoint was written by as many ranks."""
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda_ranks")
    if device is None or device.type != "cuda" or cuda is None:
        return
    if len(cuda) == world_size:
        torch.cuda.set_rng_state(cuda[rank], device)
    elif rank == 0:  # another number of processes: reseeded streams, not the saved ones
        log.warning("checkpoint has the CUDA RNG states of %d processes, this run has %d; "
                    "not restoring them", len(cuda), world_size)


def seed_everything(seed: int, device: torch.device | None = None, rank: int = 0) -> None:
    """Seed Python, numpy and torch for a run started afresh; on CUDA, this rank's device
    generator with seed + rank (ranks draw different dropout masks)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        torch.cuda.manual_seed(seed + rank)


__all__ = ["configure_kernels", "rng_state", "set_rng_state", "seed_everything"]
