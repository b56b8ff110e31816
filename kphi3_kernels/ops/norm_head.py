"""Launchers of the fused norm head: an IO block (qkv_proj, gate_up_proj) of ``RMSNorm(x)``.

Forward, two launches: ``rms_norm_layout`` writes the normalized input in the block-residue
layout of the IO block (``layout_norm.py``), ``gpc_io_layout_fwd`` reads it for both products
(``layout_gemm.py``): no de-interleave pass. ``t`` (the layout) and the fp32 ``rstd`` are
returned for the backward.

Backward, four launches:

* ``norm_io_bwd_dxi``: ``dxi_n = dy_n @ W2[n]^T`` (in dy's dtype), group n contiguous.
* ``norm_io_bwd_dxn``: ``dn = dy_b @ W1[b]^T`` plus ``dxi`` gathered at its interleaved channels
  (the op-level ``gpc_io_bwd_dx``): the gradient of the normalized input, in channel order.
* ``gpc_io_layout_bwd_dw``: ``dW1`` and ``dW2`` from the saved layout, one paired launch.
* ``rms_norm_bwd``: ``dx`` and the norm weight's gradient from ``dn``.

The norm's backward needs a sum over every channel of a row, which no GEMM tile holds, so it
stays a pass of its own (the op-level path has the same pass).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout_gemm import gpc_io_layout_bwd, gpc_io_layout_fwd
from .layout_norm import rms_norm_bwd, rms_norm_layout_fwd
from .triton_impl import io_input_grad


def norm_io_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                run: int = 8) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, t, rstd)``: the IO block's output, its normalized input in the layout, the norm's
    saved reciprocal RMS. ``x`` and ``norm_weight`` may be wider than the block's weights (fp32
    under autocast): the norm reads them as they are and writes ``t`` in the weights' dtype."""
    t, rstd = rms_norm_layout_fwd(x, norm_weight, eps, weight1.shape[0], run, weight1.dtype)
    return gpc_io_layout_fwd(t, weight1, weight2, bias1, bias2), t, rstd


def norm_io_bwd(dy, x, norm_weight, rstd, t, weight1, weight2, need_dx=True, need_dnorm=True,
                need_dw1=True, need_dw2=True) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, d norm_weight, dW1, dW2)``, None where not asked."""
    dx = dnorm = None
    if need_dx or need_dnorm:
        dn = io_input_grad(dy, weight1, weight2, ("norm_io_bwd_dxi", "norm_io_bwd_dxn"))
        dx, dnorm = rms_norm_bwd(dn, x, norm_weight, rstd, need_dx, need_dnorm)
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2
