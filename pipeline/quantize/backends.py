"""The registry of quantization backends: `backend:` name -> backend (base.py says what
each provides; ort.py and pt2e.py are the two)."""

from __future__ import annotations

from ..errors import UsageError
from .base import Backend
from .ort import OrtBackend
from .pt2e import Pt2eBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (OrtBackend(), Pt2eBackend())}


def backend_of(name: str) -> Backend:
    """The backend named `name` (UsageError with the known names otherwise)."""
    if name not in BACKENDS:
        raise UsageError(f"quantization backend {name!r}: expected one of {list(BACKENDS)}")
    return BACKENDS[name]


__all__ = ["BACKENDS", "backend_of"]
