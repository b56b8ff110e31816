"""Kernels (``grouped_gemm.py``, ``interleave.py``, ``layout_*.py``), their launchers
(``triton_impl.py``, and the same functions in PyTorch in ``torch_impl.py``), the registration
helper (``registry.py``) and the registered operators with their autograd formulas
(``custom_ops.py`` and the fused decoder's ``fused_ops.py``, namespace ``torch.ops.kphi3``)."""
from __future__ import annotations

from .registry import get_impl

__all__ = ["custom_ops", "fused_ops", "get_impl"]

from . import custom_ops  # noqa: E402  (registers the operators)
from . import fused_ops  # noqa: E402  (the fused decoder's operators)
