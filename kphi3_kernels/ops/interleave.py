"""The channel interleave (InterleaveChannelsFast) as a Triton kernel: a batched tile transpose.

``y[m, a*step + b] = x[m, b*L + a]`` with ``L = C / step``: viewing each row of ``x`` as a
``[step, L]`` matrix, ``y`` holds its transpose. Each program loads a ``[BLOCK_M, BLOCK_B,
BLOCK_A]`` tile contiguous along ``a``, permutes it on chip (a layout change through shared
memory) and stores it contiguous along ``b``: whichever of ``step`` and ``L`` is long gets 16-byte
accesses; the short side (G channels, e.g. 5) cannot, since its runs are G elements long.

It is also the bandwidth-bound half of the IO block's split design: the de-interleave pre-pass
``xi = interleave(x, s)`` (group n of ``xi`` is ``x[:, n::G]``) that lets the grouped GEMM read
both of its operands with wide, pipelined loads, and in the backward ``dx = dx1 + interleave(dxi,
G)`` with the addend fused (``addend``).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import outputs
from .launch import KernelLaunch, launch


@triton.jit
def _interleave_kernel(
    x_ptr, r_ptr, y_ptr, M, C, step, L, s_xm, s_xc, s_rm,
    HAS_ADDEND: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_A: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    a = (tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)).to(tl.int64)
    b = (tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    # Source tile [m, b, a]: contiguous along a.
    src = x_ptr + rows[:, None, None] * s_xm + (b[None, :, None] * L + a[None, None, :]) * s_xc
    mask_src = (rows < M)[:, None, None] & (b < step)[None, :, None] & (a < L)[None, None, :]
    tile = tl.load(src, mask=mask_src)
    # Destination tile [m, a, b]: contiguous along b.
    tile = tl.permute(tile, (0, 2, 1))
    dst_col = a[None, :, None] * step + b[None, None, :]
    mask_dst = (rows < M)[:, None, None] & (a < L)[None, :, None] & (b < step)[None, None, :]
    if HAS_ADDEND:
        # Summed in fp32 (float64 for float64) and rounded once, like the GEMM epilogues.
        addend = tl.load(r_ptr + rows[:, None, None] * s_rm + dst_col, mask=mask_dst)
        tile = tile.to(ACC_DTYPE) + addend.to(ACC_DTYPE)
    tl.store(y_ptr + rows[:, None, None] * C + dst_col, tile.to(y_ptr.dtype.element_ty),
             mask=mask_dst)


def _tile(n: int, cap: int) -> int:
    return max(2, min(cap, triton.next_power_of_2(n)))


def interleave_fwd(x: torch.Tensor, step: int, addend: Optional[torch.Tensor] = None,
                   out_dtype: Optional[torch.dtype] = None, name: str = "interleave"
                   ) -> torch.Tensor:
    """Interleave the columns of a 2-D ``x`` (any strides) with ``step``: a new contiguous tensor.

    With ``addend`` (same shape) the result is ``addend + interleave(x)``, summed in fp32
    (float64 for float64) and rounded once to ``out_dtype`` (default: ``x``'s dtype).
    """
    M, C = x.shape
    y = outputs.new_output((M, C), out_dtype or x.dtype, x.device)
    if M == 0 or C == 0:
        return y
    L = C // step
    if addend is not None and addend.stride(1) != 1:
        addend = addend.contiguous()
    # About 8K elements per program: 16 KiB of bf16, enough in flight per SM to approach the
    # copy bandwidth; the long side gets 64 (128 bytes of bf16 per row segment).
    block_a, block_b = _tile(L, 64), _tile(step, 64)
    block_m = max(1, min(64, 8192 // (block_a * block_b)))
    block_m = min(block_m, triton.next_power_of_2(M))
    # At most 32 elements per thread: with 64 (an 8K tile on 4 warps) Triton 3.6 spilled the
    # fused-addend passes on sm_90a (48 B in bf16, 2.6 KB in fp32); 8 warps compile clean on
    # Triton 3.6 and 3.9 with the same 16-byte accesses on the long side.
    num_warps = 8 if block_m * block_a * block_b > 4096 else 4
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_A": block_a, "BLOCK_B": block_b},
                           num_warps=num_warps)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(L, meta["BLOCK_A"]),
                triton.cdiv(step, meta["BLOCK_B"]))

    launch(KernelLaunch(
        name=name, kernel=_interleave_kernel, grid=grid,
        args=dict(x_ptr=x, r_ptr=addend if addend is not None else y, y_ptr=y, M=M, C=C,
                  step=step, L=L, s_xm=x.stride(0), s_xc=x.stride(1),
                  s_rm=addend.stride(0) if addend is not None else 0,
                  HAS_ADDEND=addend is not None,
                  ACC_DTYPE=tl.float64 if torch.float64 in (x.dtype, y.dtype) else tl.float32),
        configs=[config], interpreter_config=config, device=x.device,
    ))
    return y
