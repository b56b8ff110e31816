"""FLOP formulas of the ``torch.ops.kphi3`` operators for ``torch.utils.flop_counter``.

Without them ``FlopCounterMode`` counts nothing for a grouped layer (an opaque custom op), so a
model's count would hold only its attention and dense layers. Each formula is the op's own
arithmetic, 2 FLOPs per multiply-add of its grouped GEMMs, whatever the backend or tile sizes:
``[G, s, og]`` weights over M rows are ``2 * M * G * s * og``.
"""
from __future__ import annotations

from torch.utils.flop_counter import register_flop_formula


def _gemm(rows: int, weight_shape) -> int:
    G, s, og = weight_shape
    return 2 * rows * G * s * og


def grouped_linear(x_shape, weight_shape, bias_shape, out_shape=None, **_) -> int:
    return _gemm(x_shape[0], weight_shape)


def grouped_linear_bwd(dy_shape, x_shape, weight_shape, need_dx, need_dw, need_db,
                       out_shape=None, **_) -> int:
    return (int(need_dx) + int(need_dw)) * _gemm(x_shape[0], weight_shape)


def gpc_io(x_shape, weight1_shape, weight2_shape, bias1_shape, bias2_shape, save_xi=False,
           out_shape=None, **_) -> int:
    return 2 * _gemm(x_shape[0], weight1_shape)


def gpc_io_bwd(dy_shape, x_shape, xi_shape, weight1_shape, weight2_shape, need_dx, need_dw1, need_dw2,
               need_db1, need_db2, out_shape=None, **_) -> int:
    # dx is two GEMMs (through W1 and W2), each weight gradient one.
    return (2 * int(need_dx) + int(need_dw1) + int(need_dw2)) * _gemm(x_shape[0], weight1_shape)


def gpc_block(x_shape, weight1_shape, weight2_shape, bias1_shape, bias2_shape, out_shape=None,
              **_) -> int:
    second = 0 if weight2_shape is None else _gemm(x_shape[0], weight2_shape)
    return _gemm(x_shape[0], weight1_shape) + second


def gpc_block_bwd(dy_shape, x_shape, h_shape, weight1_shape, weight2_shape, need_dx, need_dw1,
                  need_dw2, need_db1, need_db2, out_shape=None, **_) -> int:
    rows = x_shape[0]
    first = (int(need_dx) + int(need_dw1)) * _gemm(rows, weight1_shape)
    if weight2_shape is None:
        return first
    # The gradient reaching the first GEMM always goes through W2 (dy @ W2^T).
    return first + (1 + int(need_dw2)) * _gemm(rows, weight2_shape)


def interleave(x_shape, step, out_shape=None, **_) -> int:
    return 0  # data movement only


FORMULAS = dict(grouped_linear=grouped_linear, grouped_linear_bwd=grouped_linear_bwd,
                gpc_io=gpc_io, gpc_io_bwd=gpc_io_bwd, gpc_block=gpc_block,
                gpc_block_bwd=gpc_block_bwd, interleave=interleave)


def register(op, backends) -> None:
    """Register every formula for ``op(name, backend)``'s operators of each of ``backends``."""
    for name, formula in FORMULAS.items():
        register_flop_formula([op(name, backend) for backend in backends])(formula)
