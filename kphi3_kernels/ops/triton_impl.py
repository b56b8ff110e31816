"""Triton launchers of every grouped op, forward and backward, on 2-D ``[M, C]`` operands.

Each function here describes its GEMMs to ``grouped_gemm`` as strided operands and lets the one
kernel do the work; ``torch_impl.py`` has the same functions with the same signatures in PyTorch.
Inputs may have any strides; outputs are fresh contiguous tensors.

Every operand a GEMM reads has a unit stride along its rows or its columns, and every GEMM writes
with a unit column stride: the tensor cores are fed by 16-byte pipelined loads. The channel
interleaves that sit between the grouped GEMMs of a block (a stride-G gather, which no wide load
can serve) run as separate bandwidth-bound passes of ``interleave.py``:

* IO block forward: ``xi = interleave(x, s)`` (group n of ``xi`` is ``x[:, n::G]``), then one GEMM
  over K = 2s reading ``x`` and ``xi``; ``xi`` is returned for the backward. At decode sizes
  (``FUSED_MAX_ROWS``) one launch reads ``x[:, n::G]`` in place instead (2-byte loads of a few
  activation rows, next to the weights it streams): ``IO_FORWARD`` picks, or forces either.
* IO block backward: ``dxi = dy_n W2^T`` (in dy's dtype), then ``dx = dy_n W1^T`` with ``dxi`` added,
  gathered at the interleaved columns, in the GEMM's epilogue; ``dW1`` and ``dW2`` (reading the
  saved ``xi``) as one paired launch that reads ``dy`` once.
* non-IO block: ``first(x)`` stored in natural order, ``h = interleave(first(x), og)``, and the
  second GEMM adds ``first(x)`` as a unit-stride residual.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import outputs
from .grouped_gemm import Operand, grouped_gemm, intermediate_dtype
from .interleave import interleave_fwd
# A column sum runs at bandwidth in torch already: both backends share it.
from .torch_impl import bias_grad

__all__ = [
    "grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd",
    "gpc_block_fwd", "gpc_block_bwd", "interleave_fwd",
]

Grads = Tuple[Optional[torch.Tensor], ...]


def _groups_of(t: torch.Tensor, width: int) -> Operand:
    """``t[:, g*width : (g+1)*width]`` as group g (rows = M, columns = width)."""
    return Operand(t, width * t.stride(1), t.stride(0), t.stride(1))


def _groups_of_transposed(t: torch.Tensor, width: int) -> Operand:
    """The transpose of ``_groups_of``: group g is ``t[:, g*width:(g+1)*width].T`` (K = M)."""
    return Operand(t, width * t.stride(1), t.stride(1), t.stride(0))


def _weight(w: torch.Tensor) -> Operand:
    return Operand(w, w.stride(0), w.stride(1), w.stride(2))


def _weight_t(w: torch.Tensor) -> Operand:
    return Operand(w, w.stride(0), w.stride(2), w.stride(1))


def _empty(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    return outputs.new_output((rows, cols), like.dtype, like.device)


# How the IO block's forward reads its interleaved operand x[:, n::G]:
# "split": the de-interleave pre-pass writes xi, then one clean GEMM.
# "fused": one launch reading x[:, n::G] in place with 2-byte loads.
# "auto" (default): "split" where the backward will want xi (``save_xi``: it is dW2's operand,
# and the split forward writes it anyway); otherwise "fused" for at most FUSED_MAX_ROWS rows,
# where x is a few rows next to the weights and a pre-pass would be a second launch for little,
# and "split" above. Read once at import; tests and benchmarks may assign it.
IO_FORWARDS = ("auto", "split", "fused")
FUSED_MAX_ROWS = 64
IO_FORWARD = os.environ.get("KPHI3_IO_FORWARD", "auto")
if IO_FORWARD not in IO_FORWARDS:
    raise ValueError(f"KPHI3_IO_FORWARD must be one of {IO_FORWARDS}, got {IO_FORWARD!r}")


def io_forward_mode(rows: int, save_xi: bool = False) -> str:
    """``"split"`` or ``"fused"``: how ``gpc_io_fwd`` runs under IO_FORWARD."""
    if IO_FORWARD == "auto":
        return "fused" if rows <= FUSED_MAX_ROWS and not save_xi else "split"
    return IO_FORWARD


def io_saves_xi(save_xi: bool) -> bool:
    """Whether ``gpc_io_fwd(..., save_xi)`` returns the de-interleaved input ``[M, C]`` (else
    an empty tensor): as asked, whatever M (an output shape must not depend on M)."""
    return save_xi


def grouped_linear_fwd(x, weight, bias=None):
    """``y[:, n*og + j] = sum_i x[:, n*s + i] * weight[n, i, j] + bias[n, j]``."""
    M = x.shape[0]
    G, s, og = weight.shape
    y = _empty(M, G * og, x)
    grouped_gemm(G, M, og, _groups_of(x, s), _weight(weight), s, _groups_of(y, og), bias=bias,
                 name="grouped_linear_fwd")
    return y


def _grouped_input_grad(dy, weight, name: str, dtype: Optional[torch.dtype] = None
                        ) -> torch.Tensor:
    """``dx_n = dy_n @ weight[n]^T``, a new ``[M, G*s]`` tensor (in ``dtype``, default dy's)."""
    M = dy.shape[0]
    G, s, og = weight.shape
    dx = outputs.new_output((M, G * s), dtype or dy.dtype, dy.device)
    grouped_gemm(G, M, s, _groups_of(dy, og), _weight_t(weight), og, _groups_of(dx, s),
                 name=name)
    return dx


def _grouped_weight_grad(a: Operand, dy, weight, name: str) -> torch.Tensor:
    """``dW[n] = A[n] @ dy_n`` with A[n] the ``s x M`` input slice of group n."""
    M = dy.shape[0]
    G, s, og = weight.shape
    dw = outputs.new_output((G, s, og), weight.dtype, weight.device)
    grouped_gemm(G, s, og, a, _groups_of(dy, og), M, _weight(dw), weight_grad=True, name=name)
    return dw


def grouped_linear_bwd(dy, x, weight, need_dx=True, need_dw=True, need_db=False) -> Grads:
    G, s, og = weight.shape
    dx = dw = db = None
    if need_dx:
        dx = _grouped_input_grad(dy, weight, "grouped_linear_bwd_dx")
    if need_dw:
        dw = _grouped_weight_grad(_groups_of_transposed(x, s), dy, weight, "grouped_linear_bwd_dw")
    if need_db:
        db = bias_grad(dy, G)
    return dx, dw, db


def _deinterleave(x, groups: int) -> torch.Tensor:
    """``xi[:, n*s + k] = x[:, k*G + n]``: group n of ``xi`` is ``x[:, n::G]``, contiguous."""
    return interleave_fwd(x, x.shape[1] // groups, name="gpc_io_deinterleave")


def gpc_io_fwd(x, weight1, weight2, bias1=None, bias2=None, save_xi=False):
    """``y_n = x[:, n*s:(n+1)*s] @ W1[n] + x[:, n::G] @ W2[n]`` on one fp32 accumulator.

    Returns ``(y, xi)``. With ``save_xi``, ``xi`` is the de-interleaved input (group n is
    ``x[:, n::G]``, contiguous), for the backward's ``dW2``; else it is empty.
    """
    M = x.shape[0]
    G, s, og = weight1.shape
    y = _empty(M, G * og, x)
    if io_forward_mode(M, save_xi) == "fused":
        # Only a forced "fused" that must save xi writes it in a pass of its own.
        xi = _deinterleave(x, G) if save_xi else x.new_empty(0)
        second = Operand(x, x.stride(1), x.stride(0), G * x.stride(1))
        name = "gpc_io_fwd_fused"
    else:
        x = x.contiguous()
        xi = _deinterleave(x, G)
        return gpc_io_fwd_split(x, xi, weight1, weight2, bias1, bias2), \
            xi if save_xi else x.new_empty(0)
    grouped_gemm(
        G, M, og, _groups_of(x, s), _weight(weight1), s, _groups_of(y, og),
        a2=second, b2=_weight(weight2), K2=s, bias=bias1, bias2=bias2, name=name,
    )
    return y, xi if save_xi else x.new_empty(0)


def gpc_io_fwd_split(x, xi, weight1, weight2, bias1=None, bias2=None, name="gpc_io_fwd",
                     act_layout=None):
    """The IO block's ``y`` from ``x`` and its de-interleaved copy ``xi`` (both contiguous
    ``[M, G*s]``, however ``xi`` was written): x and xi get one layout (and W1, W2 one
    layout) so the GEMM runs ONE K loop of 2s. ``act_layout`` (``grouped_gemm``'s): the
    epilogue also writes ``up * silu(gate)`` of ``y`` into that layout."""
    M = x.shape[0]
    G, s, og = weight1.shape
    y = _empty(M, G * og, x)
    grouped_gemm(
        G, M, og, _groups_of(x, s), _weight(weight1.contiguous()), s, _groups_of(y, og),
        a2=_groups_of(xi, s), b2=_weight(weight2.contiguous()), K2=s, bias=bias1, bias2=bias2,
        act_layout=act_layout, name=name,
    )
    return y


def io_input_grad(dy, weight1, weight2, names=("gpc_io_bwd_dxi", "gpc_io_bwd_dx")
                  ) -> torch.Tensor:
    """The IO block's input gradient in channel order, in dy's dtype: ``dxi = dy_n W2[n]^T``
    (launch ``names[0]``), then ``dy_n W1[n]^T`` with ``dxi`` gathered at the interleaved
    columns in the epilogue (``names[1]``)."""
    M = dy.shape[0]
    G, s, og = weight1.shape
    dxi = _grouped_input_grad(dy, weight2, names[0])
    dx = _empty(M, G * s, dy)
    grouped_gemm(G, M, s, _groups_of(dy, og), _weight_t(weight1), og, _groups_of(dx, s),
                 residual=Operand(dxi, 0, dxi.stride(0), dxi.stride(1)),
                 residual_gather=(G, s), name=names[1])
    return dx


def gpc_io_bwd(dy, x, xi, weight1, weight2, need_dx=True, need_dw1=True, need_dw2=True,
               need_db1=False, need_db2=False) -> Grads:
    """The IO block's gradients. ``xi`` is what the forward returned (recomputed when empty).

    * ``dx = dy_n W1[n]^T + (dy_n W2[n]^T at columns k*G + n)``: the second product ``dxi`` is
      written once, in dy's dtype, and the first GEMM adds it, gathered, in its fp32 epilogue:
      no full-size pass after the GEMMs. In fp16 / bf16 that rounds ``dxi`` once before the sum
      (docs/numerics.md states the bound); it halves the bytes of the op's largest intermediate.
    * ``dW1 = x_n^T dy_n`` and ``dW2 = xi_n^T dy_n`` run as ONE paired launch over 2G groups.
    """
    M = x.shape[0]
    G, s, og = weight1.shape
    dx = dw1 = dw2 = db = None
    if need_dx:
        dx = io_input_grad(dy, weight1, weight2)
    if need_dw2 and xi.shape != x.shape:
        xi = _deinterleave(x, G)
    if need_dw1 and need_dw2:
        # The paired launch needs one layout for both; an empty tensor counts as contiguous
        # whatever its strides, so it gets fresh ones.
        x, xi = (t.contiguous() if t.numel() else t.new_empty(t.shape) for t in (x, xi))
        dw1 = outputs.new_output((G, s, og), weight1.dtype, weight1.device)
        dw2 = outputs.new_output((G, s, og), weight2.dtype, weight2.device)
        grouped_gemm(G, s, og, _groups_of_transposed(x, s), _groups_of(dy, og), M, _weight(dw1),
                     a2=_groups_of_transposed(xi, s), b2=_groups_of(dy, og), c2=_weight(dw2),
                     weight_grad=True, name="gpc_io_bwd_dw")
    elif need_dw1:
        dw1 = _grouped_weight_grad(_groups_of_transposed(x, s), dy, weight1, "gpc_io_bwd_dw1")
    elif need_dw2:
        dw2 = _grouped_weight_grad(_groups_of_transposed(xi, s), dy, weight2, "gpc_io_bwd_dw2")
    if need_db1 or need_db2:
        db = bias_grad(dy, G)
    return dx, dw1, dw2, db if need_db1 else None, db if need_db2 else None


def gpc_block_fwd(x, weight1, weight2=None, bias1=None, bias2=None):
    """Non-IO block without activation. Returns ``(y, h)``: ``h`` is ``first(x)`` interleaved.

    ``first(x)`` is stored in natural order; the interleave with step og makes ``h``; the second
    GEMM reads ``h`` and adds ``first(x)`` as its residual, in its fp32 epilogue.
    """
    M = x.shape[0]
    G, s, og = weight1.shape
    first = grouped_linear_fwd(x, weight1, bias1)
    h = interleave_fwd(first, og, name="gpc_block_interleave")
    if weight2 is None:
        return h, h
    y = _empty(M, G * og, x)
    grouped_gemm(G, M, og, _groups_of(h, og), _weight(weight2), og, _groups_of(y, og),
                 bias=bias2, residual=_groups_of(first, og), name="gpc_block_fwd_second")
    return y, h


def gpc_block_bwd(dy, x, h, weight1, weight2=None, need_dx=True, need_dw1=True, need_dw2=True,
                  need_db1=False, need_db2=False) -> Grads:
    G, s, og = weight1.shape
    dw2 = db2 = None
    if weight2 is None:
        # y = interleave(first(x), og); its inverse is the interleave with step G.
        dh = interleave_fwd(dy, G, name="gpc_block_bwd_interleave")
    else:
        if need_dw2:
            dw2 = _grouped_weight_grad(_groups_of_transposed(h, og), dy, weight2,
                                       "gpc_block_bwd_dw2")
        if need_db2:
            db2 = bias_grad(dy, G)
        # d first(x) = dy (the residual) + the inverse interleave of dy_n @ W2[n]^T, the product
        # kept in fp32 until that sum.
        d_h = _grouped_input_grad(dy, weight2, "gpc_block_bwd_dh", intermediate_dtype(dy.dtype))
        dh = interleave_fwd(d_h, G, addend=dy, out_dtype=dy.dtype,
                            name="gpc_block_bwd_interleave")
    dx, dw1, db1 = grouped_linear_bwd(dh, x, weight1, need_dx, need_dw1, need_db1)
    return dx, dw1, dw2, db1, db2
