"""PyTorch launchers with the same signatures as ``triton_impl``: the ``torch`` backend.

Faster than the plain reference (``reference.py``) on CPU: one BLAS GEMM per group writing
straight into its slice of the output (no einsum permutes, no output copy), and for the IO block
a single contiguous copy of the interleaved input instead of a permute per op. Tested against
the reference, forward and backward, and gradchecked in float64.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import outputs

__all__ = [
    "grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd",
    "gpc_block_fwd", "gpc_block_bwd", "interleave_fwd",
]

Grads = Tuple[Optional[torch.Tensor], ...]


def interleave_fwd(x: torch.Tensor, step: int) -> torch.Tensor:
    M, C = x.shape
    return x.reshape(M, step, C // step).transpose(1, 2).reshape(M, C).contiguous()


def _interleaved_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[M, G, s]`` contiguous, group n holding ``x[:, n::G]``."""
    M, C = x.shape
    return x.reshape(M, C // groups, groups).transpose(1, 2).contiguous()


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool,
             bias: Optional[torch.Tensor] = None) -> None:
    if accumulate:
        out.addmm_(a, b)
    elif bias is not None:
        torch.addmm(bias, a, b, out=out)
    else:
        torch.mm(a, b, out=out)


def _grouped_mm(a_groups, weights, out: torch.Tensor, accumulate=False, bias=None) -> torch.Tensor:
    """``out[:, n*og:(n+1)*og] (+)= a_groups[n] @ weights[n]`` (+ bias[n])."""
    og = weights.shape[2]
    for n in range(weights.shape[0]):
        _mm_into(out[:, n * og:(n + 1) * og], a_groups[n], weights[n], accumulate,
                 None if bias is None else bias[n])
    return out


def _column_groups(x: torch.Tensor, width: int):
    return [x[:, n * width:(n + 1) * width] for n in range(x.shape[1] // width)]


def _weight_grad(a_groups, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    og = weight.shape[2]
    dw = outputs.new_output(weight.shape, weight.dtype, weight.device)
    for n in range(weight.shape[0]):
        torch.mm(a_groups[n].t(), dy[:, n * og:(n + 1) * og], out=dw[n])
    return dw


def _bias_grad(dy: torch.Tensor, groups: int) -> torch.Tensor:
    return dy.sum(0, dtype=torch.float32).to(dy.dtype).reshape(groups, -1)


# Below this many rows one batched GEMM beats G separate calls: at decode sizes the per-call
# overhead dominates (measured on a 2-core CPU at the released shapes: M <= 16 is up to 3x faster
# with bmm, M = 2048 is 10-25% faster with the per-group loop).
_BATCHED_MAX_ROWS = 256


def _batched(groups_first: torch.Tensor, weight, extra=None, bias=None) -> torch.Tensor:
    """``[M, G*og]`` from ``bmm(groups_first [G, M, s], weight)`` (+ ``extra``'s bmm) (+ bias)."""
    G, M = groups_first.shape[:2]
    og = weight.shape[2]
    y = torch.bmm(groups_first, weight)
    if extra is not None:
        y.baddbmm_(*extra)
    if bias is not None:
        y += bias.unsqueeze(1)
    out = outputs.new_output((M, G * og), y.dtype, y.device)
    out.view(M, G, og).copy_(y.transpose(0, 1))
    return out


def grouped_linear_fwd(x, weight, bias=None):
    G, s, og = weight.shape
    M = x.shape[0]
    if M < _BATCHED_MAX_ROWS:
        return _batched(x.reshape(M, G, s).transpose(0, 1), weight, bias=bias)
    y = outputs.new_output((M, G * og), x.dtype, x.device)
    return _grouped_mm(_column_groups(x, s), weight, y, bias=bias)


def grouped_linear_bwd(dy, x, weight, need_dx=True, need_dw=True, need_db=False) -> Grads:
    G, s, og = weight.shape
    dx = dw = db = None
    if need_dx:
        dx = outputs.new_output((x.shape[0], G * s), dy.dtype, dy.device)
        _grouped_mm(_column_groups(dy, og), weight.transpose(1, 2), dx)
    if need_dw:
        dw = _weight_grad(_column_groups(x, s), dy, weight)
    if need_db:
        db = _bias_grad(dy, G)
    return dx, dw, db


def gpc_io_fwd(x, weight1, weight2, bias1=None, bias2=None):
    G, s, og = weight1.shape
    M = x.shape[0]
    if M < _BATCHED_MAX_ROWS:
        bias = bias1 if bias2 is None else (bias2 if bias1 is None else bias1 + bias2)
        interleaved = x.reshape(M, s, G).permute(2, 0, 1).contiguous()
        return _batched(x.reshape(M, G, s).transpose(0, 1), weight1, (interleaved, weight2), bias)
    y = grouped_linear_fwd(x, weight1, bias1)
    _grouped_mm(_interleaved_groups(x, G).unbind(1), weight2, y, accumulate=True)
    if bias2 is not None:
        y += bias2.reshape(-1)
    return y


def gpc_io_bwd(dy, x, weight1, weight2, need_dx=True, need_dw1=True, need_dw2=True,
               need_db1=False, need_db2=False) -> Grads:
    G, s, og = weight1.shape
    dx, dw1, db = grouped_linear_bwd(dy, x, weight1, need_dx, need_dw1, need_db1 or need_db2)
    dw2 = None
    if need_dx:
        d_interleaved = outputs.new_output((x.shape[0], G, s), dy.dtype, dy.device)
        _grouped_mm(_column_groups(dy, og), weight2.transpose(1, 2),
                    d_interleaved.view(x.shape[0], G * s))
        dx.view(-1, s, G).add_(d_interleaved.transpose(1, 2))
    if need_dw2:
        dw2 = _weight_grad(_interleaved_groups(x, G).unbind(1), dy, weight2)
    return dx, dw1, dw2, db if need_db1 else None, db if need_db2 else None


def gpc_block_fwd(x, weight1, weight2=None, bias1=None, bias2=None):
    G, s, og = weight1.shape
    h = interleave_fwd(grouped_linear_fwd(x, weight1, bias1), og)
    if weight2 is None:
        return h, h
    y = grouped_linear_fwd(h, weight2, bias2)
    y += interleave_fwd(h, G)  # the residual first(x), back in natural order
    return y, h


def gpc_block_bwd(dy, x, h, weight1, weight2=None, need_dx=True, need_dw1=True, need_dw2=True,
                  need_db1=False, need_db2=False) -> Grads:
    G, s, og = weight1.shape
    dw2 = db2 = None
    if weight2 is None:
        dh = interleave_fwd(dy, G)
    else:
        d_interleaved, dw2, db2 = grouped_linear_bwd(dy, h, weight2, True, need_dw2, need_db2)
        dh = interleave_fwd(d_interleaved, G) + dy
    dx, dw1, db1 = grouped_linear_bwd(dh, x, weight1, need_dx, need_dw1, need_db1)
    return dx, dw1, dw2, db1, db2
