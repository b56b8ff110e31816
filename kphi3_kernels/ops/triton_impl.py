"""Triton launchers of every grouped op, forward and backward, on 2-D ``[M, C]`` operands.

Each function here describes its GEMMs to ``grouped_gemm`` as strided operands and lets the one
kernel do the work; ``torch_impl.py`` has the same functions with the same signatures in PyTorch.
Inputs may have any strides; outputs are fresh contiguous tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import outputs
from .grouped_gemm import Operand, grouped_gemm
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


def _strided_groups_transposed(t: torch.Tensor, groups: int) -> Operand:
    """Group n is ``t[:, n::groups].T``: the interleaved operand of the IO block, read in place."""
    return Operand(t, t.stride(1), groups * t.stride(1), t.stride(0))


def _weight(w: torch.Tensor) -> Operand:
    return Operand(w, w.stride(0), w.stride(1), w.stride(2))


def _weight_t(w: torch.Tensor) -> Operand:
    return Operand(w, w.stride(0), w.stride(2), w.stride(1))


def _empty(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    return outputs.new_output((rows, cols), like.dtype, like.device)


def grouped_linear_fwd(x, weight, bias=None):
    """``y[:, n*og + j] = sum_i x[:, n*s + i] * weight[n, i, j] + bias[n, j]``."""
    M = x.shape[0]
    G, s, og = weight.shape
    y = _empty(M, G * og, x)
    grouped_gemm(G, M, og, _groups_of(x, s), _weight(weight), s, _groups_of(y, og), bias=bias)
    return y


def _grouped_input_grad(dy, weight, out: torch.Tensor, accumulate_strided: bool = False) -> None:
    """``out_n = dy_n @ weight[n]^T``; with ``accumulate_strided`` add into ``out[:, n::G]``."""
    M = dy.shape[0]
    G, s, og = weight.shape
    if accumulate_strided:
        target = Operand(out, out.stride(1), out.stride(0), G * out.stride(1))
        grouped_gemm(G, M, s, _groups_of(dy, og), _weight_t(weight), og, target, residual=target)
    else:
        grouped_gemm(G, M, s, _groups_of(dy, og), _weight_t(weight), og, _groups_of(out, s))


def _grouped_weight_grad(a: Operand, dy, weight) -> torch.Tensor:
    """``dW[n] = A[n] @ dy_n`` with A[n] the ``s x M`` input slice of group n."""
    M = dy.shape[0]
    G, s, og = weight.shape
    dw = outputs.new_output((G, s, og), weight.dtype, weight.device)
    grouped_gemm(G, s, og, a, _groups_of(dy, og), M, _weight(dw))
    return dw


def grouped_linear_bwd(dy, x, weight, need_dx=True, need_dw=True, need_db=False) -> Grads:
    G, s, og = weight.shape
    dx = dw = db = None
    if need_dx:
        dx = _empty(x.shape[0], G * s, dy)
        _grouped_input_grad(dy, weight, dx)
    if need_dw:
        dw = _grouped_weight_grad(_groups_of_transposed(x, s), dy, weight)
    if need_db:
        db = bias_grad(dy, G)
    return dx, dw, db


def gpc_io_fwd(x, weight1, weight2, bias1=None, bias2=None):
    """``y_n = x[:, n*s:(n+1)*s] @ W1[n] + x[:, n::G] @ W2[n]``: one launch, one accumulator."""
    M = x.shape[0]
    G, s, og = weight1.shape
    y = _empty(M, G * og, x)
    interleaved = Operand(x, x.stride(1), x.stride(0), G * x.stride(1))
    grouped_gemm(
        G, M, og, _groups_of(x, s), _weight(weight1), s, _groups_of(y, og),
        a2=interleaved, b2=_weight(weight2), K2=s, bias=bias1, bias2=bias2,
    )
    return y


def gpc_io_bwd(dy, x, weight1, weight2, need_dx=True, need_dw1=True, need_dw2=True,
               need_db1=False, need_db2=False) -> Grads:
    G, s, og = weight1.shape
    dx = dw1 = dw2 = db = None
    if need_dx:
        # Two launches on one stream: the second adds the interleaved term into dx[:, n::G].
        dx = _empty(x.shape[0], G * s, dy)
        _grouped_input_grad(dy, weight1, dx)
        _grouped_input_grad(dy, weight2, dx, accumulate_strided=True)
    if need_dw1:
        dw1 = _grouped_weight_grad(_groups_of_transposed(x, s), dy, weight1)
    if need_dw2:
        dw2 = _grouped_weight_grad(_strided_groups_transposed(x, G), dy, weight2)
    if need_db1 or need_db2:
        db = bias_grad(dy, G)
    return dx, dw1, dw2, db if need_db1 else None, db if need_db2 else None


def gpc_block_fwd(x, weight1, weight2=None, bias1=None, bias2=None):
    """Non-IO block without activation. Returns ``(y, h)``: ``h`` is ``first(x)`` interleaved.

    The first GEMM stores straight into interleaved order; the second reads that and adds the
    residual ``first(x)`` (the same values, read back through the interleave map) in its epilogue.
    """
    M = x.shape[0]
    G, s, og = weight1.shape
    h = _empty(M, G * og, x)
    # Natural column q of first(x) lands at (q % G) * og + q // G: the interleave with step og.
    grouped_gemm(G, M, og, _groups_of(x, s), _weight(weight1), s, Operand(h, 0, G * og, 1),
                 bias=bias1, map_c=True, map_div=G, map_mul=og)
    if weight2 is None:
        return h, h
    y = _empty(M, G * og, x)
    grouped_gemm(G, M, og, _groups_of(h, og), _weight(weight2), og, _groups_of(y, og),
                 bias=bias2, residual=Operand(h, 0, G * og, 1), map_r=True, map_div=G, map_mul=og)
    return y, h


def gpc_block_bwd(dy, x, h, weight1, weight2=None, need_dx=True, need_dw1=True, need_dw2=True,
                  need_db1=False, need_db2=False) -> Grads:
    G, s, og = weight1.shape
    M = x.shape[0]
    dw2 = db2 = None
    if weight2 is None:
        # y = interleave(first(x), og); its inverse is the interleave with step G.
        dh = interleave_fwd(dy, G)
    else:
        dy = dy.contiguous()  # the mapped epilogue addresses columns with unit stride
        if need_dw2:
            dw2 = _grouped_weight_grad(_groups_of_transposed(h, og), dy, weight2)
        if need_db2:
            db2 = bias_grad(dy, G)
        # d first(x)[:, q] = dy[:, q] + (dy @ W2^T)[:, interleaved position of q]; computed per
        # group of the second GEMM and stored at q = (p % og) * G + p // og, dy added on the way.
        dh = _empty(M, G * og, dy)
        mapped = Operand(dh, 0, G * og, 1)
        grouped_gemm(G, M, og, _groups_of(dy, og), _weight_t(weight2), og, mapped,
                     residual=Operand(dy, 0, dy.stride(0), 1), map_c=True, map_r=True,
                     map_div=og, map_mul=G)
    dx, dw1, db1 = grouped_linear_bwd(dh, x, weight1, need_dx, need_dw1, need_db1)
    return dx, dw1, dw2, db1, db2
