"""Kernels (``grouped_gemm.py``, ``interleave.py``, ``layout_*.py``), their launchers
(``triton_impl.py`` and ``triton_fused.py``, and the same functions in PyTorch in
``torch_impl.py``), the operator table and its registration helper (``registry.py``), and the
registered operators with their autograd formulas (``custom_ops.py``, the op-level family, and
``fused_ops.py``, the fused decoder's; namespace ``torch.ops.kphi3``, every operator on both
backends). ``OPERATORS`` is the table: one ``registry.OpSpec`` per operator."""
from __future__ import annotations

from .registry import OPERATORS, get_impl

__all__ = ["OPERATORS", "custom_ops", "fused_ops", "get_impl"]

from . import custom_ops  # noqa: E402  (registers the op-level operators)
from . import fused_ops  # noqa: E402  (the fused decoder's operators)
