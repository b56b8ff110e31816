"""The Triton launchers of the fused decoder's operators, under the names ``fused_ops.py``'s
bodies call (``torch_impl.py`` has the same names and signatures in PyTorch): one module per
backend, as ``triton_impl.py`` is for the op-level operators. Nothing of its own: it gathers the
launchers of ``layout_act.py``, ``layout_gemm.py``, ``layout_norm.py``, ``mlp_tail.py`` and
``norm_head.py``, and the bias gradient both backends share."""
from __future__ import annotations

from .layout_act import silu_mul_layout_bwd, silu_mul_layout_fwd
from .layout_gemm import gpc_io_layout_bwd, gpc_io_layout_fwd
from .layout_norm import rms_norm_bwd, rms_norm_fwd
from .mlp_tail import mlp_tail_bwd, mlp_tail_fwd
from .norm_head import norm_io_bwd, norm_io_fwd, norm_io_split_bwd, norm_io_split_fwd
from .torch_impl import bias_grad

__all__ = [
    "silu_mul_layout_fwd", "silu_mul_layout_bwd", "gpc_io_layout_fwd", "gpc_io_layout_bwd",
    "mlp_tail_fwd", "mlp_tail_bwd", "rms_norm_fwd", "rms_norm_bwd", "norm_io_fwd",
    "norm_io_split_fwd", "norm_io_bwd", "norm_io_split_bwd", "bias_grad",
]
