"""Kernels (``grouped_gemm.py``, ``interleave.py``), their launchers (``triton_impl.py``, and the
same functions in PyTorch in ``torch_impl.py``) and the registered operators with their autograd
formulas (``custom_ops.py``, namespace ``torch.ops.kphi3``)."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["custom_ops", "fused_ops", "get_impl"]


def get_impl(backend: str) -> ModuleType:
    """The launcher module of a concrete backend: ``"triton"`` or ``"torch"``."""
    if backend not in ("triton", "torch"):
        raise ValueError(f"no implementation for backend {backend!r}")
    # Imported on first use: triton_impl needs Triton, which only exists on Linux.
    return importlib.import_module(f".{backend}_impl", __name__)


from . import custom_ops  # noqa: E402  (registers the operators)
from . import fused_ops  # noqa: E402  (the fused decoder's operators)
