"""The fused decoder's row-wise kernels: the elementwise producers that write (or read back) an IO
block's input in the form its GEMMs read, each one bandwidth-bound pass in fp32 registers
(float64 for float64), one rounding per output. Every slot <-> channel mapping goes through
``slots.py``.

**RMSNorm** (Phi-3's): one forward kernel for every way the next IO block reads the normalized
input, optionally with the residual add before the norm.

Forward, ``rstd = 1 / sqrt(mean(x^2) + eps)`` per row (saved, fp32), one launch named by what
it writes (``add_`` before the name with a residual):

* ``rms_norm``: ``n = weight * x * rstd`` in channel order.
* ``rms_norm_split``: ``n`` and its de-interleaved copy ``xi`` (group g is ``n[:, g::G]``), the
  op-level IO block's two operands, written from the row the program holds.
* ``rms_norm_layout``: ``t = layout(weight * x * rstd)``, straight into the layout of
  qkv_proj's or gate_up_proj's IO block (``kphi3_kernels.layout``), padding zero.

With a residual, ``x = h = residual + branch`` is first rounded to ``h``'s dtype and written
(the decoder's residual stream), then normalized: the residual add and the norm after it in
one launch. Each output is written in its own order with unit-stride stores; the gathered
reads of the copy and the layout hit the row already in L1 / L2.

Backward: the standard RMSNorm gradient from the plain-order gradient of the normalized input,
plus, where the norm's input is also the residual stream, the stream's own gradient ``dh``
(the sum at the branch point, in the same pass):

    dx = dh + rstd * (g - xhat * mean(g * xhat)),   g = dn * weight,   xhat = x * rstd
    dweight = sum over rows of dn * xhat

Each program takes ``BLOCK_M`` rows and loops over the channels in chunks (any width); the
weight gradient is one fp32 partial sum per program, added up by the launcher. Everything is
computed in fp32 (float64 for float64) and rounded once.

**The MLP activation** ``silu(gate) * up`` fused with the block-residue layout of down_proj's
input.
``gu`` is gate_up_proj's output ``[M, 2I]`` (the gate is the first half, as in Phi-3). The
forward writes ``h = up * silu(gate)`` straight into the layout of down_proj's IO block
(``kphi3_kernels.layout``: ``G`` groups, runs of ``R``), padding zero, so down_proj's GEMMs read
it with 16-byte loads and no layout pass runs in between. The backward reads the layout's
gradient ``dt`` (what ``gpc_io_layout_bwd`` writes) and returns ``dgu``. Both are one
bandwidth-bound pass, in fp32 registers (float64 for float64), one rounding per output.

Each program covers a ``BLOCK_M x BLOCK_C`` tile of the tensor it writes, so every store is a
unit-stride run; the other side is a gather (a layout run holds channels ``G`` apart). The
gathered lines are all used by the tile (it spans whole blocks of channels), so the gather costs
L1 traffic, not DRAM bytes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import outputs
from .activation import silu_mul, silu_mul_grads
from .grouped_gemm import accumulator_dtype, intermediate_dtype
from .launch import KernelLaunch, launch
from .slots import channel_of_slot, slot_of_channel


# --------------------------------------------------------------------------------------------
# RMSNorm, with the residual add before it
# --------------------------------------------------------------------------------------------


@triton.jit
def _norm_input(x_ptr, r_ptr, h_ptr, rows, c, mask, s_xm, s_xc, s_rm, s_rc, CHANNELS,
                HAS_RESIDUAL: tl.constexpr, COMPUTE: tl.constexpr, STORE_H: tl.constexpr):
    """The norm's input tile in ``COMPUTE``: ``x``, or ``h = residual + x`` rounded to h's
    dtype (as the unfused add rounds it), stored on the first pass."""
    x = tl.load(x_ptr + rows[:, None] * s_xm + c[None, :] * s_xc, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * s_rm + c[None, :] * s_rc, mask=mask, other=0.0)
        h = (r.to(COMPUTE) + x.to(COMPUTE)).to(h_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + rows[:, None] * CHANNELS + c[None, :], h, mask=mask)
        return h.to(COMPUTE)
    return x.to(COMPUTE)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, h_ptr, n_ptr, xi_ptr, t_ptr, rstd_ptr, M, eps, s_xm, s_xc, s_rm, s_rc,
    CHANNELS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_N: tl.constexpr,
    XI_GROUPS: tl.constexpr, LAYOUT_GROUPS: tl.constexpr, RUN: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < M
    squares = tl.zeros((BLOCK_M, BLOCK_C), dtype=COMPUTE)
    for c0 in range(0, CHANNELS, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_m[:, None] & (c < CHANNELS)[None, :]
        x = _norm_input(x_ptr, r_ptr, h_ptr, rows, c, mask, s_xm, s_xc, s_rm, s_rc, CHANNELS,
                        HAS_RESIDUAL, COMPUTE, True)
        squares += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=1) / CHANNELS + eps)
    tl.store(rstd_ptr + rows, rstd.to(rstd_ptr.dtype.element_ty), mask=mask_m)
    # Each output is written in its own order, its channels read again from L1 / L2 (gathered
    # for the de-interleaved copy and the layout); h is recomputed, bit for bit, not read back.
    if WRITE_N:
        for c0 in range(0, CHANNELS, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            _normalized_store(x_ptr, r_ptr, h_ptr, w_ptr, n_ptr, rows, c, c, c < CHANNELS,
                              c < CHANNELS, mask_m, rstd, s_xm, s_xc, s_rm, s_rc, CHANNELS,
                              CHANNELS, HAS_RESIDUAL, COMPUTE)
    if XI_GROUPS > 0:
        # xi[:, g*s + k] = n[:, k*G + g]: the IO block's second operand, group g contiguous.
        PER: tl.constexpr = CHANNELS // XI_GROUPS
        for j0 in range(0, CHANNELS, BLOCK_C):
            j = j0 + tl.arange(0, BLOCK_C)
            _normalized_store(x_ptr, r_ptr, h_ptr, w_ptr, xi_ptr, rows, (j % PER) * XI_GROUPS + j // PER,
                              j, j < CHANNELS, j < CHANNELS, mask_m, rstd, s_xm, s_xc, s_rm,
                              s_rc, CHANNELS, CHANNELS, HAS_RESIDUAL, COMPUTE)
    if LAYOUT_GROUPS > 0:
        # The block-residue layout; padding slots store 0 (their loads are masked).
        WIDTH: tl.constexpr = LAYOUT_GROUPS * LAYOUT_GROUPS * RUN
        for l0 in range(0, WIDTH, BLOCK_C):
            col = l0 + tl.arange(0, BLOCK_C)
            chan, is_channel = channel_of_slot(col, CHANNELS // LAYOUT_GROUPS, LAYOUT_GROUPS, RUN)
            _normalized_store(x_ptr, r_ptr, h_ptr, w_ptr, t_ptr, rows, chan, col,
                              is_channel & (col < WIDTH), col < WIDTH, mask_m, rstd, s_xm, s_xc,
                              s_rm, s_rc, CHANNELS, WIDTH, HAS_RESIDUAL, COMPUTE)


@triton.jit
def _normalized_store(x_ptr, r_ptr, h_ptr, w_ptr, out_ptr, rows, chan, col, is_channel, in_range,
                      mask_m, rstd, s_xm, s_xc, s_rm, s_rc, CHANNELS, WIDTH,
                      HAS_RESIDUAL: tl.constexpr, COMPUTE: tl.constexpr):
    """``out[:, col] = weight[chan] * x[:, chan] * rstd`` (0 where ``chan`` is not a channel),
    for the columns ``in_range`` of an output ``WIDTH`` wide."""
    load_mask = mask_m[:, None] & is_channel[None, :]
    x = _norm_input(x_ptr, r_ptr, h_ptr, rows, chan, load_mask, s_xm, s_xc, s_rm, s_rc, CHANNELS,
                    HAS_RESIDUAL, COMPUTE, False)
    w = tl.load(w_ptr + chan, mask=is_channel, other=0.0).to(COMPUTE)
    n = x * rstd[:, None] * w[None, :]
    tl.store(out_ptr + rows[:, None] * WIDTH + col[None, :], n.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & in_range[None, :])


@triton.jit
def _rms_norm_bwd_kernel(
    dn_ptr, dh_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, M, s_dnm, s_dhm, s_xm, s_xc,
    CHANNELS: tl.constexpr, HAS_DH: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < M
    rstd = tl.load(rstd_ptr + rows, mask=mask_m, other=0.0).to(COMPUTE)
    # Pass 1: mean(g * xhat) per row.
    dots = tl.zeros((BLOCK_M, BLOCK_C), dtype=COMPUTE)
    for c0 in range(0, CHANNELS, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_m[:, None] & (c < CHANNELS)[None, :]
        dn = tl.load(dn_ptr + rows[:, None] * s_dnm + c[None, :], mask=mask, other=0.0).to(COMPUTE)
        x = tl.load(x_ptr + rows[:, None] * s_xm + c[None, :] * s_xc, mask=mask,
                    other=0.0).to(COMPUTE)
        w = tl.load(w_ptr + c, mask=c < CHANNELS, other=0.0).to(COMPUTE)
        dots += dn * w[None, :] * x * rstd[:, None]
    mean = tl.sum(dots, axis=1) / CHANNELS
    # Pass 2: dx, and this program's share of dweight.
    for c0 in range(0, CHANNELS, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = mask_m[:, None] & (c < CHANNELS)[None, :]
        dn = tl.load(dn_ptr + rows[:, None] * s_dnm + c[None, :], mask=mask, other=0.0).to(COMPUTE)
        xhat = tl.load(x_ptr + rows[:, None] * s_xm + c[None, :] * s_xc, mask=mask,
                       other=0.0).to(COMPUTE) * rstd[:, None]
        if NEED_DX:
            w = tl.load(w_ptr + c, mask=c < CHANNELS, other=0.0).to(COMPUTE)
            dx = rstd[:, None] * (dn * w[None, :] - xhat * mean[:, None])
            if HAS_DH:  # the residual stream's own gradient, summed at the branch point
                dx += tl.load(dh_ptr + rows[:, None] * s_dhm + c[None, :], mask=mask,
                              other=0.0).to(COMPUTE)
            tl.store(dx_ptr + rows[:, None] * CHANNELS + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        if NEED_DW:
            tl.store(dw_partial_ptr + pid * CHANNELS + c, tl.sum(dn * xhat, axis=0),
                     mask=c < CHANNELS)


def _config(M: int, channels: int) -> triton.Config:
    # 16 rows x 256 channels per step (4K elements, 32 per thread on 4 warps); many rows per
    # program keep the weight gradient's partial sums few.
    block_c = max(16, min(256, triton.next_power_of_2(channels)))
    block_m = max(1, min(16, triton.next_power_of_2(max(M, 1))))
    return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=4)


def _launch(name, kernel, M, channels, args, device):
    config = _config(M, channels)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]),)

    launch(KernelLaunch(name=name, kernel=kernel, grid=grid, args=args, configs=[config],
                        interpreter_config=config, device=device))
    return config


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None, *, split_groups: int = 0,
                 layout: Optional[Tuple[int, int]] = None, out_dtype=None):
    """RMSNorm's forward in one launch, ``x`` ``[M, C]`` (any strides): ``(h, n, rstd, extra)``.

    * ``h``: with ``residual`` (``[M, C]``), ``residual + x`` in their promoted dtype, and the
      norm is of ``h``; without, None and the norm is of ``x``.
    * ``n``: the normalized input in channel order; None where ``layout`` is given.
    * ``rstd``: ``[M]`` in fp32 (float64 for float64).
    * ``extra``: with ``split_groups = G``, ``n``'s de-interleaved copy ``xi`` (group g is
      ``n[:, g::G]``, what the IO block's ``second`` reads); with ``layout = (G, R)``, the
      normalized input in the block-residue layout ``[M, G*G*R]`` instead of ``n``; else None.

    ``n`` and ``extra`` are in ``out_dtype``, by default the promoted dtype of the norm's input
    and ``weight`` (as ``weight * xhat.to(dtype)`` is); under autocast the next GEMM's.
    """
    M, channels = x.shape
    h = None
    if residual is not None:
        h = outputs.new_output((M, channels), torch.promote_types(residual.dtype, x.dtype),
                               x.device)
    source = h.dtype if h is not None else x.dtype
    out_dtype = out_dtype or torch.promote_types(source, weight.dtype)
    n = outputs.new_output((M, channels), out_dtype, x.device) if layout is None else None
    extra = None
    if split_groups:
        extra = outputs.new_output((M, channels), out_dtype, x.device)
    elif layout is not None:
        extra = outputs.new_output((M, layout[0] * layout[0] * layout[1]), out_dtype, x.device)
    rstd = outputs.new_output((M,), intermediate_dtype(source), x.device)
    if M == 0:
        return h, n, rstd, extra
    weight = weight.contiguous()
    r = residual if residual is not None else x
    somewhere = n if n is not None else extra  # the pointer of an output not written
    name = ("add_" if h is not None else "") + "rms_norm" + (
        "_split" if split_groups else "_layout" if layout is not None else "")
    _launch(name, _rms_norm_kernel, M, channels, dict(
        x_ptr=x, r_ptr=r, w_ptr=weight, h_ptr=h if h is not None else somewhere,
        n_ptr=somewhere, xi_ptr=extra if split_groups else somewhere,
        t_ptr=extra if layout is not None else somewhere, rstd_ptr=rstd,
        M=M, eps=float(eps), s_xm=x.stride(0), s_xc=x.stride(1), s_rm=r.stride(0),
        s_rc=r.stride(1), CHANNELS=channels, HAS_RESIDUAL=h is not None,
        WRITE_N=n is not None, XI_GROUPS=split_groups,
        LAYOUT_GROUPS=layout[0] if layout is not None else 0,
        RUN=layout[1] if layout is not None else 0, COMPUTE=accumulator_dtype(source)), x.device)
    return h, n, rstd, extra


def rms_norm_bwd(dn: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 need_dx: bool = True, need_dw: bool = True, dh: Optional[torch.Tensor] = None):
    """``(dx, dweight)`` (None where not asked) from ``dn``, the plain-order gradient of the
    normalized input ``weight * x * rstd``; ``dx`` includes ``dh`` where given (the gradient
    that reaches ``x`` by its other use, the residual stream)."""
    M, channels = x.shape
    dn = dn.contiguous()
    dh = dh.contiguous() if dh is not None and need_dx else None
    weight = weight.contiguous()
    dx = outputs.new_output((M, channels), x.dtype, x.device) if need_dx else None
    config = _config(M, channels)
    programs = triton.cdiv(M, config.kwargs["BLOCK_M"]) if M else 0
    partial = (torch.empty((programs, channels), dtype=intermediate_dtype(x.dtype),
                           device=x.device) if need_dw else None)
    if M and (need_dx or need_dw):
        _launch("rms_norm_bwd", _rms_norm_bwd_kernel, M, channels, dict(
            dn_ptr=dn, dh_ptr=dh if dh is not None else dn, x_ptr=x, w_ptr=weight,
            rstd_ptr=rstd, dx_ptr=dx if dx is not None else dn,
            dw_partial_ptr=partial if need_dw else rstd,
            M=M, s_dnm=dn.stride(0), s_dhm=dh.stride(0) if dh is not None else 0,
            s_xm=x.stride(0), s_xc=x.stride(1), CHANNELS=channels, HAS_DH=dh is not None,
            NEED_DX=need_dx, NEED_DW=need_dw, COMPUTE=accumulator_dtype(x.dtype)), x.device)
    dw = None
    if need_dw:
        dw = (partial.sum(dim=0) if M else torch.zeros(channels, dtype=partial.dtype,
                                                       device=x.device)).to(weight.dtype)
    return dx, dw


# --------------------------------------------------------------------------------------------
# silu(gate) * up in the block-residue layout, and its backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _silu_mul_layout_kernel(
    gu_ptr, t_ptr, M, s_gm, s_gc,
    PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, RUN: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    WIDTH: tl.constexpr = GROUPS * GROUPS * RUN
    CHANNELS: tl.constexpr = GROUPS * PER_GROUP
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c, is_channel = channel_of_slot(col, PER_GROUP, GROUPS, RUN)
    mask_m = rows < M
    load_mask = mask_m[:, None] & (is_channel & (col < WIDTH))[None, :]
    src = gu_ptr + rows[:, None] * s_gm + c.to(tl.int64)[None, :] * s_gc
    gate = tl.load(src, mask=load_mask, other=0.0).to(COMPUTE)
    up = tl.load(src + CHANNELS * s_gc, mask=load_mask, other=0.0).to(COMPUTE)
    h = silu_mul(gate, up)  # padding: silu(0) * 0
    tl.store(t_ptr + rows[:, None] * WIDTH + col[None, :], h.to(t_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (col < WIDTH)[None, :])


@triton.jit
def _silu_mul_layout_bwd_kernel(
    dt_ptr, gu_ptr, dgu_ptr, M, s_gm, s_gc, s_dtm,
    PER_GROUP: tl.constexpr, GROUPS: tl.constexpr, RUN: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    CHANNELS: tl.constexpr = GROUPS * PER_GROUP
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (c < CHANNELS)[None, :]
    src = gu_ptr + rows[:, None] * s_gm + c.to(tl.int64)[None, :] * s_gc
    gate = tl.load(src, mask=mask, other=0.0).to(COMPUTE)
    up = tl.load(src + CHANNELS * s_gc, mask=mask, other=0.0).to(COMPUTE)
    slot = slot_of_channel(c, PER_GROUP, GROUPS, RUN)
    dh = tl.load(dt_ptr + rows[:, None] * s_dtm + slot[None, :], mask=mask, other=0.0).to(COMPUTE)
    dgate, dup = silu_mul_grads(dh, gate, up)
    dst = dgu_ptr + rows[:, None] * (2 * CHANNELS) + c[None, :]
    tl.store(dst, dgate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + CHANNELS, dup.to(dgu_ptr.dtype.element_ty), mask=mask)


def _elementwise_config(M: int, width: int) -> triton.Config:
    # About 4K elements per program, 128 columns (256 bytes of bf16) per row segment, at most
    # 32 elements per thread on 4 warps.
    block_c = max(16, min(128, triton.next_power_of_2(width)))
    block_m = max(1, min(64, 4096 // block_c, triton.next_power_of_2(max(M, 1))))
    return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=4)


def _elementwise_launch(name, kernel, M, width, args, device):
    config = _elementwise_config(M, width)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_C"]))

    launch(KernelLaunch(name=name, kernel=kernel, grid=grid, args=args, configs=[config],
                        interpreter_config=config, device=device))


def silu_mul_layout_fwd(gu: torch.Tensor, groups: int, run: int) -> torch.Tensor:
    """``to_residue_layout(up * silu(gate), groups, pad)`` of ``gu = [gate | up]``, one pass."""
    M, two_i = gu.shape
    channels = two_i // 2
    per_group = channels // groups
    width = groups * groups * run
    t = outputs.new_output((M, width), gu.dtype, gu.device)
    if M == 0 or width == 0:
        return t
    _elementwise_launch("silu_mul_layout", _silu_mul_layout_kernel, M, width, dict(
        gu_ptr=gu, t_ptr=t, M=M, s_gm=gu.stride(0), s_gc=gu.stride(1),
        PER_GROUP=per_group, GROUPS=groups, RUN=run,
        COMPUTE=accumulator_dtype(gu.dtype)), gu.device)
    return t


def silu_mul_layout_bwd(dt: torch.Tensor, gu: torch.Tensor, groups: int) -> torch.Tensor:
    """``dgu = [dgate | dup]`` from the layout's gradient ``dt`` (its padding is never read)."""
    M, two_i = gu.shape
    channels = two_i // 2
    per_group = channels // groups
    run = dt.shape[1] // (groups * groups)
    dt = dt.contiguous()
    dgu = outputs.new_output((M, two_i), gu.dtype, gu.device)
    if M == 0 or channels == 0:
        return dgu
    _elementwise_launch("silu_mul_layout_bwd", _silu_mul_layout_bwd_kernel, M, channels, dict(
        dt_ptr=dt, gu_ptr=gu, dgu_ptr=dgu, M=M, s_gm=gu.stride(0), s_gc=gu.stride(1),
        s_dtm=dt.stride(0), PER_GROUP=per_group, GROUPS=groups, RUN=run,
        COMPUTE=accumulator_dtype(gu.dtype)), dt.device)
    return dgu
