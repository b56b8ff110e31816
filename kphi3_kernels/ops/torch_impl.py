"""PyTorch launchers with the same signatures as ``triton_impl``: the ``torch`` backend.

Faster than the plain reference (``reference.py``) on CPU: at training sizes one BLAS GEMM per
group writing straight into its slice of the output (no einsum permutes, no output copy), and for
the IO block a single contiguous copy of the interleaved input; at decode sizes (few rows) one
batched GEMM for all groups, since there the per-call overhead dominates. Tested against
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


# Below this many rows one batched GEMM beats G separate calls: at decode sizes the per-call
# overhead dominates (measured on a 2-core CPU at the released shapes: M <= 16 is up to 3x faster
# with bmm, M = 2048 is 10-25% faster with the per-group loop).
_BATCHED_MAX_ROWS = 256


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
    """``out[:, n*og:(n+1)*og] (+)= a_groups[n] @ weights[n]`` (+ bias[n]); ``out`` is ``[M, G*og]``
    with unit column stride."""
    G, _, og = weights.shape
    M = out.shape[0]
    if M < _BATCHED_MAX_ROWS:
        y = torch.bmm(torch.stack(a_groups), weights)
        if bias is not None:
            y += bias.unsqueeze(1)
        target = out.view(M, G, og)
        if accumulate:
            target.add_(y.transpose(0, 1))
        else:
            target.copy_(y.transpose(0, 1))
        return out
    for n in range(G):
        _mm_into(out[:, n * og:(n + 1) * og], a_groups[n], weights[n], accumulate,
                 None if bias is None else bias[n])
    return out


def _column_groups(x: torch.Tensor, width: int):
    return [x[:, n * width:(n + 1) * width] for n in range(x.shape[1] // width)]


def _weight_grad(a_groups, dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    G, _, og = weight.shape
    dw = outputs.new_output(weight.shape, weight.dtype, weight.device)
    if dy.shape[0] < _BATCHED_MAX_ROWS:
        dy_groups = dy.reshape(-1, G, og).transpose(0, 1)
        return torch.bmm(torch.stack(a_groups).transpose(1, 2), dy_groups, out=dw)
    for n in range(G):
        torch.mm(a_groups[n].t(), dy[:, n * og:(n + 1) * og], out=dw[n])
    return dw


def bias_grad(dy: torch.Tensor, groups: int) -> torch.Tensor:
    """``dy`` summed over rows as ``[G, og]``, accumulated in fp32 (both backends use this)."""
    return dy.sum(0, dtype=torch.float32).to(dy.dtype).reshape(groups, -1)


def grouped_linear_fwd(x, weight, bias=None):
    G, s, og = weight.shape
    y = outputs.new_output((x.shape[0], G * og), x.dtype, x.device)
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
        db = bias_grad(dy, G)
    return dx, dw, db


def gpc_io_fwd(x, weight1, weight2, bias1=None, bias2=None):
    G = weight1.shape[0]
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
