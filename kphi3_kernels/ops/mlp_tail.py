"""Launchers of the fused MLP tail: ``down_proj(up * silu(gate))`` from ``gate_up``'s output.

Forward, two launches: ``silu_mul_layout`` writes ``h = up * silu(gate)`` in the block-residue
layout of down_proj's IO block (``layout_act.py``), ``gpc_io_layout_fwd`` reads it for both
products (``layout_gemm.py``) and, where given, adds the decoder's residual stream in its
epilogue (the residual add has no launch of its own). ``t`` (the layout) is returned for the backward's weight
gradients, as the op-level IO block returns its de-interleaved input.

Backward, three launches, no pass of the activation of its own:

* ``mlp_tail_bwd_dxi``: ``dxi_n = dy_n @ W2[n]^T`` (in dy's dtype), group n contiguous.
* ``mlp_tail_bwd_dgate_up``: ``dh = dy_b @ W1[b]^T`` plus ``dxi`` gathered at its interleaved
  channels (the op-level ``gpc_io_bwd_dx``), then, in the same epilogue, ``d(gate)`` and
  ``d(up)`` from ``dh`` and the saved ``gate_up``: ``dh`` is never written.
* ``gpc_io_layout_bwd_dw``: ``dW1`` and ``dW2`` from the saved layout, one paired launch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout_act import silu_mul_layout_fwd
from .layout_gemm import gpc_io_layout_bwd, gpc_io_layout_fwd
from .triton_impl import io_input_grad


def mlp_tail_fwd(gate_up, weight1, weight2, bias1=None, bias2=None, run: int = 8,
                 residual=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, t)``: down_proj's output (plus ``residual`` where given: the decoder's residual
    add, in down_proj's epilogue) and its input ``up * silu(gate)`` in the layout."""
    t = silu_mul_layout_fwd(gate_up, weight1.shape[0], run)
    return gpc_io_layout_fwd(t, weight1, weight2, bias1, bias2, residual), t


def mlp_tail_bwd(dy, gate_up, t, weight1, weight2, need_dgu=True, need_dw1=True,
                 need_dw2=True) -> Tuple[Optional[torch.Tensor], ...]:
    """``(d gate_up, dW1, dW2)``, None where not asked."""
    dgu = None
    if need_dgu:
        G, s = weight1.shape[:2]
        dgu = io_input_grad(dy, weight1, weight2, ("mlp_tail_bwd_dxi", "mlp_tail_bwd_dgate_up"),
                            act_grad=(gate_up, G * s))
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dgu, dw1, dw2
