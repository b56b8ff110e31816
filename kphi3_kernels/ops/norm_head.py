"""Launchers of the fused norm heads: an IO block (qkv_proj, gate_up_proj) of ``RMSNorm(x)``, or
of ``RMSNorm(h)`` with ``h = residual + x`` (the attention's residual add before
post_attention_layernorm), the norm writing the block's input as its GEMMs read it.

Two ways to write it, by the block-residue layout's padding (``kphi3_kernels.fused.layout_padding``):

* **layout** (``norm_io_*``): the norm writes the block-residue layout ``t``, one tensor both
  products read with 16-byte loads (``layout_gemm.py``). Best where it adds no channel.
* **split** (``norm_io_split_*``): the norm writes ``n`` in channel order and its
  de-interleaved copy ``xi`` (group g is ``n[:, g::G]``), the op-level IO GEMM reads both
  (``triton_impl.gpc_io_fwd_split``): no padding, and no de-interleave pass of the block's own.

Forward, two launches: the norm (``rms_norm_layout`` / ``rms_norm_split``, ``add_`` before the
name with a residual, ``layout_norm.py``), then the block. ``h``, the layout (or ``n`` and
``xi``) and the fp32 ``rstd`` are returned for the backward.

Backward, four launches (and the torch sum of the norm weight's partial gradients):

* ``norm_io_bwd_dxi``: ``dxi_n = dy_n @ W2[n]^T`` (in dy's dtype), group n contiguous.
* ``norm_io_bwd_dxn``: ``dn = dy_b @ W1[b]^T`` plus ``dxi`` gathered at its interleaved channels
  (the op-level ``gpc_io_bwd_dx``): the gradient of the normalized input, in channel order.
* the weight gradients, one paired launch (``gpc_io_layout_bwd_dw`` from the layout,
  ``gpc_io_bwd_dw`` from ``n`` and ``xi``).
* ``rms_norm_bwd``: ``dx`` and the norm weight's gradient from ``dn``; with a residual, the
  residual stream's own gradient ``dh`` is added in the same pass.

The norm's backward needs a sum over every channel of a row, which no GEMM tile holds, so it
stays a pass of its own (the op-level path has the same pass).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout_gemm import gpc_io_layout_bwd, gpc_io_layout_fwd
from .layout_norm import rms_norm_bwd, rms_norm_fwd
from .triton_impl import gpc_io_bwd, gpc_io_fwd_split, io_input_grad

_DX_NAMES = ("norm_io_bwd_dxi", "norm_io_bwd_dxn")


def norm_io_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                run: int = 8, residual=None) -> Tuple[torch.Tensor, ...]:
    """``(y, h, t, rstd)``: the IO block's output, ``residual + x`` (None without a residual),
    the normalized input in the layout, the norm's saved reciprocal RMS. ``x`` (and
    ``residual``) and ``norm_weight`` may be wider than the block's weights (fp32 under
    autocast): the norm reads them as they are and writes ``t`` in the weights' dtype."""
    h, _, rstd, t = rms_norm_fwd(x, norm_weight, eps, residual,
                                 layout=(weight1.shape[0], run), out_dtype=weight1.dtype)
    return gpc_io_layout_fwd(t, weight1, weight2, bias1, bias2), h, t, rstd


def norm_io_split_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                      residual=None) -> Tuple[torch.Tensor, ...]:
    """``(y, h, n, xi, rstd)``: as ``norm_io_fwd``, the normalized input as ``n`` (channel
    order) and ``xi`` (de-interleaved) instead of the layout."""
    h, n, rstd, xi = rms_norm_fwd(x, norm_weight, eps, residual, split_groups=weight1.shape[0],
                                  out_dtype=weight1.dtype)
    return gpc_io_fwd_split(n, xi, weight1, weight2, bias1, bias2), h, n, xi, rstd


def norm_io_bwd(dy, x, norm_weight, rstd, t, weight1, weight2, need_dx=True, need_dnorm=True,
                need_dw1=True, need_dw2=True, dh=None) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, d norm_weight, dW1, dW2)``, None where not asked; ``x`` is the norm's input
    (``h`` with a residual, whose gradient ``dh`` is then added to ``dx``)."""
    dx, dnorm = _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh)
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2


def norm_io_split_bwd(dy, x, norm_weight, rstd, n, xi, weight1, weight2, need_dx=True,
                      need_dnorm=True, need_dw1=True, need_dw2=True, dh=None
                      ) -> Tuple[Optional[torch.Tensor], ...]:
    """``norm_io_bwd`` of the split head: the weight gradients from ``n`` and ``xi``."""
    dx, dnorm = _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh)
    _, dw1, dw2, _, _ = gpc_io_bwd(dy, n, xi, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2


def _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh):
    if not (need_dx or need_dnorm):
        return None, None
    dn = io_input_grad(dy, weight1, weight2, _DX_NAMES)
    return rms_norm_bwd(dn, x, norm_weight, rstd, need_dx, need_dnorm, dh)
