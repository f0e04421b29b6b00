"""Every random generator's state (Python, numpy, torch, CUDA), captured into a checkpoint
and restored from it, so a resumed run draws the same numbers as one never stopped."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

log = logging.getLogger("pipeline")


def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states as checkpoint-safe tensors/numbers."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"python": torch.tensor(py[1], dtype=torch.int64), "python_gauss": py[2],
             "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": int(np_state[2]), "numpy_has_gauss": int(np_state[3]),
             "numpy_gauss": float(np_state[4]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured (CUDA only on a machine with as many devices)."""
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # resumed on another machine: nothing in training draws from it anyway
            log.warning("checkpoint has CUDA RNG states of %d devices, this machine has %d; "
                        "not restoring them", len(cuda), torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) for a run started afresh."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = ["rng_state", "set_rng_state", "seed_everything"]
