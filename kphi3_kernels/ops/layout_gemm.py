"""The IO block's GEMMs on an input in the block-residue layout (``kphi3_kernels.layout``).

The input ``t`` is ``[M, G*G*R]``: channel ``c`` of ``x`` at slot ``(b, n, r)`` with ``b = c // s``,
``n = c % G``, ``r = (c % s) // G``, every ``(b, n)`` run padded with zeros to ``R`` elements
(``R`` a multiple of 8). Group ``g``'s operand of ``first`` is block ``g``, one span of ``G*R``
elements; of ``second``, residue ``g``, G runs of ``R`` elements ``G*R`` apart. Both are read
with unit-stride 16-byte accesses. The weights stay in their ``[G, s, og]`` parameter layout:
each kernel maps a layout index ``j`` of group ``g`` (``j = n*R + r`` in a block,
``j = b*R + r`` in a residue) to the weight row of its channel, and masks the padding slots.

Three kernels, named by the launches they make:

* ``gpc_io_layout_fwd``: ``y_g = t[block g] @ W1[g] + t[residue g] @ W2[g] (+ biases)``, one
  pipelined K loop of ``2*G*R`` steps on one fp32 accumulator; optionally ``+ residual`` in the
  epilogue (the decoder's residual add after down_proj, no pass of its own).
* ``gpc_io_layout_bwd_dt_second`` then ``gpc_io_layout_bwd_dt``: the gradient of ``t``, in the
  layout. The first writes every slot of every residue (``dy_n @ W2[n]^T``, zeros at padding);
  the second adds ``dy_b @ W1[b]^T`` to every slot of every block in place. Each slot is read and
  written by one program of each launch, with 16-byte accesses: what the plain-order backward
  does with a gather of the interleaved term is here two contiguous passes of one tensor.
* ``gpc_io_layout_bwd_dw``: ``dW1[b] = t[block b]^T dy_b`` and ``dW2[n] = t[residue n]^T dy_n`` in
  one launch over 2G groups (each reads ``dy`` and ``t`` once), rows stored at their channels'
  weight rows, padding rows skipped.

``G`` and ``R`` are compile-time constants (``GROUPS``, ``RUN``): a run's length must be known
to the compiler for it to prove that an address range is contiguous and 16-byte aligned. A
model has a handful of shapes, so a handful of compilations.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import outputs
from .grouped_gemm import (_input_precision, _interpreter_config, _smem_limit,
                           accumulator_dtype, configs_for, tile_ids)
from .launch import KernelLaunch, launch


@triton.jit
def _weight_row(j, g, per_group, GROUPS: tl.constexpr, RUN: tl.constexpr, SECOND):
    """The weight row of layout index ``j`` of group ``g``'s operand, and whether it is a channel.

    ``first`` (group g = block b, ``j = n*R + r``) and ``second`` (group g = residue n,
    ``j = b*R + r``) name the same slot ``(b, n, r)``. Its channel is ``c = b*s + i`` with
    ``i = ((n - b*s) mod G) + r*G`` (the ``r``-th index of block b congruent to n), a channel
    only if ``i < s``. W1[b]'s row is ``i``; W2[n]'s row is ``c // G`` (c's place in x[n::G]).
    """
    outer = j // RUN
    rank = j % RUN
    b = tl.where(SECOND, outer, g)
    n = tl.where(SECOND, g, outer)
    i = (n + GROUPS - (b * per_group) % GROUPS) % GROUPS + rank * GROUPS
    row = tl.where(SECOND, (b * per_group + i) // GROUPS, i)
    return row, i < per_group


@triton.jit
def _slot(j, g, GROUPS: tl.constexpr, RUN: tl.constexpr, SECOND):
    """The column of ``t`` that holds layout index ``j`` of group ``g``'s operand."""
    in_block = g * (GROUPS * RUN) + j
    in_residue = (j // RUN) * (GROUPS * RUN) + g * RUN + j % RUN
    return tl.where(SECOND, in_residue, in_block)


@triton.jit
def _layout_fwd_kernel(
    t_ptr, w1_ptr, w2_ptr, y_ptr, bias1_ptr, bias2_ptr, residual_ptr,
    M, OG, per_group,
    s_wg, s_wr, s_wc, s_ym, s_yc, s_bias1g, s_bias2g, s_rm, s_rc,
    p_bucket,  # autotune key only
    GROUPS: tl.constexpr, RUN: tl.constexpr, HAS_BIAS1: tl.constexpr, HAS_BIAS2: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    g = tl.program_id(1)
    pid_p, pid_q = tile_ids(tl.program_id(0), M, OG, BLOCK_P, BLOCK_Q, GROUP_P)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < M
    mask_q = offs_q < OG
    K: tl.constexpr = GROUPS * RUN
    t_rows = t_ptr + offs_p[:, None] * (GROUPS * K)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    steps = tl.cdiv(K, BLOCK_K)
    # One pipelined loop: steps [0, steps) read block g and W1[g], the rest residue g and W2[g].
    for i in range(0, 2 * steps):
        second = i >= steps
        j = tl.where(second, i - steps, i) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = j < K
        a = tl.load(t_rows + _slot(j, g, GROUPS, RUN, second)[None, :],
                    mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        row, is_channel = _weight_row(j, g, per_group, GROUPS, RUN, second)
        w_base = tl.where(second, w2_ptr, w1_ptr) + g.to(tl.int64) * s_wg
        b = tl.load(w_base + row[:, None] * s_wr + offs_q[None, :] * s_wc,
                    mask=(mask_k & is_channel)[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    if HAS_BIAS1:
        acc += tl.load(bias1_ptr + g * s_bias1g + offs_q, mask=mask_q, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS2:
        acc += tl.load(bias2_ptr + g * s_bias2g + offs_q, mask=mask_q, other=0.0).to(ACC_DTYPE)[None, :]
    cols = g * OG + offs_q
    mask = mask_p[:, None] & mask_q[None, :]
    y = y_ptr + offs_p[:, None] * s_ym + cols[None, :] * s_yc
    if HAS_RESIDUAL:  # the decoder's residual add, on the accumulator (float64 for a float64 y)
        residual = tl.load(residual_ptr + offs_p[:, None] * s_rm + cols[None, :] * s_rc,
                           mask=mask, other=0.0)
        if y_ptr.dtype.element_ty == tl.float64:
            tl.store(y, acc.to(tl.float64) + residual.to(tl.float64), mask=mask)
        else:
            tl.store(y, (acc + residual.to(ACC_DTYPE)).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layout_dt_kernel(
    dy_ptr, w_ptr, dt_ptr,
    M, OG, per_group,
    s_dym, s_dyc, s_wg, s_wr, s_wc,
    p_bucket,  # autotune key only
    GROUPS: tl.constexpr, RUN: tl.constexpr, SECOND: tl.constexpr, ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    # dt[:, slot(j, g)] (+)= dy_g @ W[g, row(j)]^T for the G*R layout indices j of group g.
    g = tl.program_id(1)
    Q: tl.constexpr = GROUPS * RUN
    pid_p, pid_q = tile_ids(tl.program_id(0), M, Q, BLOCK_P, BLOCK_Q, GROUP_P)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    j = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < M
    mask_j = j < Q
    row, is_channel = _weight_row(j, g, per_group, GROUPS, RUN, SECOND)
    mask_b = mask_j & is_channel
    dy_rows = dy_ptr + offs_p[:, None] * s_dym + g.to(tl.int64) * OG * s_dyc
    w_cols = w_ptr + g.to(tl.int64) * s_wg + row[None, :] * s_wr
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    for k0 in range(0, OG, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < OG
        a = tl.load(dy_rows + k[None, :] * s_dyc, mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(w_cols + k[:, None] * s_wc, mask=mask_k[:, None] & mask_b[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    dt = dt_ptr + offs_p[:, None] * (GROUPS * Q) + _slot(j, g, GROUPS, RUN, SECOND)[None, :]
    mask = mask_p[:, None] & mask_j[None, :]
    if ACCUMULATE:
        # The other product's term, written by the previous launch; fp32 sum, one rounding.
        acc += tl.load(dt, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(dt, acc.to(dt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layout_dw_kernel(
    t_ptr, dy_ptr, dw1_ptr, dw2_ptr,
    M, OG, per_group, first_problem,
    s_dym, s_dyc, s_dwg, s_dwr, s_dwc,
    k_bucket,  # autotune key only
    GROUPS: tl.constexpr, RUN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    # Problem 0: dW1[g][row(j)] = t[:, block g][:, j]^T dy_g; problem 1 the same for residue g
    # and dW2. Grid axis 1 runs over the asked problems' groups, from ``first_problem``.
    axis = tl.program_id(1) + first_problem * GROUPS
    second = axis >= GROUPS
    g = tl.where(second, axis - GROUPS, axis)
    P: tl.constexpr = GROUPS * RUN
    pid_p, pid_q = tile_ids(tl.program_id(0), P, OG, BLOCK_P, BLOCK_Q, GROUP_P)
    j = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_j = j < P
    mask_q = offs_q < OG
    t_cols = t_ptr + _slot(j, g, GROUPS, RUN, second)[:, None]
    dy_cols = dy_ptr + (g * OG + offs_q)[None, :] * s_dyc
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    for k0 in range(0, M, BLOCK_K):
        m = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_m = m < M
        a = tl.load(t_cols + m[None, :] * (GROUPS * P), mask=mask_j[:, None] & mask_m[None, :],
                    other=0.0)
        b = tl.load(dy_cols + m[:, None] * s_dym, mask=mask_m[:, None] & mask_q[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    row, is_channel = _weight_row(j, g, per_group, GROUPS, RUN, second)
    dw = tl.where(second, dw2_ptr, dw1_ptr) + g.to(tl.int64) * s_dwg
    tl.store(dw + row[:, None] * s_dwr + offs_q[None, :] * s_dwc, acc.to(dw1_ptr.dtype.element_ty),
             mask=(mask_j & is_channel)[:, None] & mask_q[None, :])


def _geometry(t: torch.Tensor, weight1: torch.Tensor) -> Tuple[int, int, int, int]:
    """``(G, s, og, R)`` of a layout input and its block's weights."""
    G, s, og = weight1.shape
    return G, s, og, t.shape[1] // (G * G)


def _grid(P: int, Q: int, groups: int):
    return lambda meta: (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]), groups)


def _run(name, kernel, P, Q, K, groups, args, dtype, device, restore=(), tune_key=("p_bucket",)):
    launch(KernelLaunch(
        name=name, kernel=kernel, grid=_grid(P, Q, groups), args=args,
        configs=configs_for(P, Q, dtype, _smem_limit(device)),
        interpreter_config=_interpreter_config(P, Q, K),
        tune_key=(*tune_key, "OG", "GROUPS", "RUN"), restore=restore, device=device,
    ))


def gpc_io_layout_fwd(t, weight1, weight2, bias1=None, bias2=None, residual=None
                      ) -> torch.Tensor:
    """``y`` ``[M, G*og]`` of the IO block from its input ``t`` in the layout (contiguous),
    plus ``residual`` ``[M, G*og]`` where given (added to the fp32 accumulator; ``y`` then in
    the promoted dtype of the two)."""
    M = t.shape[0]
    G, s, og, R = _geometry(t, weight1)
    weight1, weight2 = weight1.contiguous(), weight2.contiguous()
    out_dtype = t.dtype if residual is None else torch.promote_types(t.dtype, residual.dtype)
    y = outputs.new_output((M, G * og), out_dtype, t.device)
    if M == 0 or og == 0:
        return y
    bias1 = bias1.contiguous() if bias1 is not None else None
    bias2 = bias2.contiguous() if bias2 is not None else None
    args = dict(
        t_ptr=t, w1_ptr=weight1, w2_ptr=weight2, y_ptr=y,
        bias1_ptr=bias1 if bias1 is not None else y, bias2_ptr=bias2 if bias2 is not None else y,
        residual_ptr=residual if residual is not None else y,
        M=M, OG=og, per_group=s, s_wg=weight1.stride(0), s_wr=weight1.stride(1),
        s_wc=weight1.stride(2), s_ym=y.stride(0), s_yc=y.stride(1),
        s_bias1g=og, s_bias2g=og,
        s_rm=residual.stride(0) if residual is not None else 0,
        s_rc=residual.stride(1) if residual is not None else 0,
        p_bucket=triton.next_power_of_2(M),
        GROUPS=G, RUN=R, HAS_BIAS1=bias1 is not None, HAS_BIAS2=bias2 is not None,
        HAS_RESIDUAL=residual is not None,
        INPUT_PRECISION=_input_precision(t.dtype), ACC_DTYPE=accumulator_dtype(t.dtype),
        GROUP_P=8,
    )
    _run("gpc_io_layout_fwd", _layout_fwd_kernel, M, og, 2 * G * R, G, args, t.dtype, t.device,
         tune_key=("p_bucket", "HAS_RESIDUAL"))
    return y


def _dt_launch(dy, weight, dt, R: int, second: bool, name: str) -> None:
    M = dy.shape[0]
    G, s, og = weight.shape
    args = dict(
        dy_ptr=dy, w_ptr=weight, dt_ptr=dt, M=M, OG=og, per_group=s,
        s_dym=dy.stride(0), s_dyc=dy.stride(1), s_wg=weight.stride(0), s_wr=weight.stride(1),
        s_wc=weight.stride(2), p_bucket=triton.next_power_of_2(M),
        GROUPS=G, RUN=R, SECOND=second, ACCUMULATE=not second,
        INPUT_PRECISION=_input_precision(dy.dtype), ACC_DTYPE=accumulator_dtype(dy.dtype),
        GROUP_P=8,
    )
    _run(name, _layout_dt_kernel, M, G * R, og, G, args, dy.dtype, dy.device,
         restore=() if second else ("dt_ptr",), tune_key=("p_bucket", "SECOND"))


def gpc_io_layout_bwd(dy, t, weight1, weight2, need_dt=True, need_dw1=True, need_dw2=True
                      ) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dt, dW1, dW2)`` (None where not asked): ``dt`` in the layout (padding zero), in dy's
    dtype; its second term is rounded to that dtype once before the first is added in fp32
    (docs/numerics.md, "Rounded intermediates")."""
    M = t.shape[0]
    G, s, og, R = _geometry(t, weight1)
    weight1, weight2 = weight1.contiguous(), weight2.contiguous()
    dt = dw1 = dw2 = None
    if need_dt:
        dt = outputs.new_output((M, G * G * R), dy.dtype, dy.device)
        if M and og:
            _dt_launch(dy, weight2, dt, R, True, "gpc_io_layout_bwd_dt_second")
            _dt_launch(dy, weight1, dt, R, False, "gpc_io_layout_bwd_dt")
        elif M:
            dt.zero_()
    problems = [p for p, need in ((0, need_dw1), (1, need_dw2)) if need]
    if problems:
        dw1 = outputs.new_output((G, s, og), weight1.dtype, weight1.device) if need_dw1 else None
        dw2 = outputs.new_output((G, s, og), weight2.dtype, weight2.device) if need_dw2 else None
        # Rows of a weight no slot maps to do not exist (each row is one channel), so every
        # row is written; with no rows of input the gradient is zero.
        if M == 0:
            for dw in (dw1, dw2):
                if dw is not None:
                    dw.zero_()
        elif og:
            out = dw1 if dw1 is not None else dw2
            args = dict(
                t_ptr=t, dy_ptr=dy, dw1_ptr=dw1 if dw1 is not None else out,
                dw2_ptr=dw2 if dw2 is not None else out,
                M=M, OG=og, per_group=s, first_problem=problems[0],
                s_dym=dy.stride(0), s_dyc=dy.stride(1), s_dwg=out.stride(0),
                s_dwr=out.stride(1), s_dwc=out.stride(2), k_bucket=triton.next_power_of_2(M),
                GROUPS=G, RUN=R, INPUT_PRECISION=_input_precision(t.dtype),
                ACC_DTYPE=accumulator_dtype(t.dtype), GROUP_P=8,
            )
            _run("gpc_io_layout_bwd_dw", _layout_dw_kernel, G * R, og, M, len(problems) * G,
                 args, t.dtype, t.device, tune_key=("k_bucket",))
    return dt, dw1, dw2
