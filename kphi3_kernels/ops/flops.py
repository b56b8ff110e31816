"""FLOP formulas of the ``torch.ops.kphi3`` operators for ``torch.utils.flop_counter``.

Without them ``FlopCounterMode`` counts nothing for a grouped layer (an opaque custom op), so a
model's count would hold only its attention and dense layers. Each formula is the op's own
arithmetic, 2 FLOPs per multiply-add of its grouped GEMMs, whatever the backend or tile sizes:
``[G, s, og]`` weights over M rows are ``2 * M * G * s * og``. ``FORMULAS`` (op-level) and
``FUSED_FORMULAS`` (the fused decoder's) are the operator table's FLOP part:
``registry.register_family`` registers each for both backends' operators.
"""
from __future__ import annotations


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


# The fused decoder's operators (``fused_ops.py``) count the IO block's arithmetic, as the
# op-level ``gpc_io`` does: the layout's padding channels meet zero weight rows and are not
# the model's work; the norms and the activation are elementwise (no FLOPs, like interleave).
def _io_forward(rows: int, weight1_shape) -> int:
    return 2 * _gemm(rows, weight1_shape)


def _io_backward(rows: int, weight1_shape, need_input: bool, need_dw1: bool, need_dw2: bool) -> int:
    # The input gradient is two GEMMs (through W1 and W2), each weight gradient one.
    return (2 * int(need_input) + int(need_dw1) + int(need_dw2)) * _gemm(rows, weight1_shape)


def gpc_io_layout(t_shape, weight1_shape, *_, **__) -> int:
    return _io_forward(t_shape[0], weight1_shape)


def gpc_io_layout_bwd(dy_shape, t_shape, weight1_shape, weight2_shape, need_dt, need_dw1,
                      need_dw2, *_, **__) -> int:
    return _io_backward(dy_shape[0], weight1_shape, need_dt, need_dw1, need_dw2)


def mlp_tail(gu_shape, weight1_shape, *_, **__) -> int:
    return _io_forward(gu_shape[0], weight1_shape)


def mlp_tail_bwd(dy_shape, gu_shape, t_shape, weight1_shape, weight2_shape, need_dgu, need_dw1,
                 need_dw2, *_, **__) -> int:
    return _io_backward(dy_shape[0], weight1_shape, need_dgu, need_dw1, need_dw2)


def norm_io(x_shape, norm_weight_shape, eps, weight1_shape, *_, **__) -> int:
    return _io_forward(x_shape[0], weight1_shape)


def norm_io_bwd(dy_shape, dh_shape, x_shape, norm_weight_shape, rstd_shape, t_shape,
                weight1_shape, weight2_shape, need_dx, need_dnorm, need_dw1, need_dw2, *_,
                **__) -> int:
    return _io_backward(dy_shape[0], weight1_shape, need_dx or need_dnorm, need_dw1, need_dw2)


def norm_io_split_bwd(dy_shape, dh_shape, x_shape, norm_weight_shape, rstd_shape, n_shape,
                      xi_shape, weight1_shape, weight2_shape, need_dx, need_dnorm, need_dw1,
                      need_dw2, *_, **__) -> int:
    return _io_backward(dy_shape[0], weight1_shape, need_dx or need_dnorm, need_dw1, need_dw2)


def elementwise(*_, **__) -> int:
    return 0


FUSED_FORMULAS = dict(gpc_io_layout=gpc_io_layout, gpc_io_layout_bwd=gpc_io_layout_bwd,
                      mlp_tail=mlp_tail, mlp_tail_bwd=mlp_tail_bwd, norm_io=norm_io,
                      norm_io_bwd=norm_io_bwd, norm_io_split=norm_io,
                      norm_io_split_bwd=norm_io_split_bwd, silu_mul_layout=elementwise,
                      silu_mul_layout_bwd=elementwise, rms_norm=elementwise,
                      add_rms_norm=elementwise, rms_norm_bwd=elementwise)

