"""Kernels (``grouped_gemm.py``, ``interleave.py``), their launchers (``triton_impl.py``, and the
same functions in PyTorch in ``torch_impl.py``) and the autograd glue (``autograd.py``)."""
from __future__ import annotations

import importlib
from types import ModuleType

from .autograd import GpcBlockFunction, GpcIOFunction, GroupedLinearFunction, InterleaveFunction

__all__ = [
    "GroupedLinearFunction", "GpcIOFunction", "GpcBlockFunction", "InterleaveFunction", "get_impl",
]


def get_impl(backend: str) -> ModuleType:
    """The launcher module of a concrete backend: ``"triton"`` or ``"torch"``."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"no implementation for backend {backend!r}")
    # Imported on first use: triton_impl needs Triton, which only exists on Linux.
    return importlib.import_module(f".{backend}_impl", __name__)
