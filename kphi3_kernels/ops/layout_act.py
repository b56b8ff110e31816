"""The MLP activation ``silu(gate) * up`` fused with the block-residue layout of down_proj's input.

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

import torch
import triton
import triton.language as tl

from . import outputs
from .activation import silu_mul, silu_mul_grads
from .grouped_gemm import accumulator_dtype
from .launch import KernelLaunch, launch
from .slots import channel_of_slot, slot_of_channel


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


def _config(M: int, width: int) -> triton.Config:
    # About 4K elements per program, 128 columns (256 bytes of bf16) per row segment, at most
    # 32 elements per thread on 4 warps.
    block_c = max(16, min(128, triton.next_power_of_2(width)))
    block_m = max(1, min(64, 4096 // block_c, triton.next_power_of_2(max(M, 1))))
    return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=4)


def _launch(name, kernel, M, width, args, device):
    config = _config(M, width)

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
    _launch("silu_mul_layout", _silu_mul_layout_kernel, M, width, dict(
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
    _launch("silu_mul_layout_bwd", _silu_mul_layout_bwd_kernel, M, channels, dict(
        dt_ptr=dt, gu_ptr=gu, dgu_ptr=dgu, M=M, s_gm=gu.stride(0), s_gc=gu.stride(1),
        s_dtm=dt.stride(0), PER_GROUP=per_group, GROUPS=groups, RUN=run,
        COMPUTE=accumulator_dtype(gu.dtype)), dt.device)
    return dgu
