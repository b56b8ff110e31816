"""The one Triton kernel behind every grouped GEMM: strided, grouped, with a fused epilogue.

For each group ``g`` (grid axis 1) it computes

    C[g] = A[g] @ B[g]  (+ A2[g] @ B2[g])  (+ bias[g] + bias2[g])  (+ R[g])

with every operand addressed through explicit (group, row, column) strides, so no launcher ever
copies an operand into a grouped layout:

* grouped linear forward:  A = x viewed ``[G, M, s]`` (group stride ``s``), B = weight.
* IO block forward:        the second pair is the de-interleaved input ``xi`` (written once by the
  bandwidth-bound pre-pass of ``interleave.py``) and ``W2``. A and A2 share their strides, so the
  kernel runs ONE pipelined K loop over ``K + K2`` that switches base pointers at ``k = K``: every
  operand is loaded with 16-byte cp.async / wgmma-ready accesses.
* input gradients:         B = weight with its two inner strides swapped (W^T).
* weight gradients:        A = x^T (row stride 1, reduction stride = the row stride of x), K = M.
* residual:                R is read with the same (unit) column stride as C, e.g. the non-IO
  block's ``first(x)`` added to ``second(interleave(first(x)))``.
* activation gradient:     the fused MLP tail's input gradient (``triton_fused.py``): the result is
  the gradient of ``up * silu(gate)``, turned into those of gate and up in the epilogue.
* activation layout:       gate_up_proj's forward (``ActivationLayout``): each program computes a
  gate tile and the up tile of the same channels (a second K loop, another group) and stores
  ``up * silu(gate)`` of both at the slots of down_proj's block-residue layout.
* layout views:            the IO block's GEMMs on the block-residue layout (``VIEW_K`` / ``Q`` /
  ``P``: forward, input gradient, weight gradient), and ``VIEW_D``, which sums both products'
  input gradient per slot and stores it at the slot's channel (the MLP tail's d(gate_up)).

The "fused" IO variant (``SHARED_STRIDES=False``) instead reads the interleaved operand
``x[..., n::G]`` in place with K stride G, in a second K loop. It saves the pre-pass but its
strided operand can only be fetched with 2-byte loads (a stride of G elements has no contiguity),
so it is not the default; ``triton_impl.IO_FORWARD`` selects it for comparison.

All offsets are computed in int64, so ``M * channels`` may pass 2**31.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreting
from . import outputs
from .activation import silu_mul, silu_mul_grads
from .launch import KernelLaunch, launch
from .slots import operand_slot, operand_weight_row, slot_of_channel

# Tile configs, chosen for an H200 (measured there: ~790 TFLOP/s bf16 dense, ~4.3 TB/s copy). The
# released shapes have K = s = 256 per operand (K = 512 for the IO block) and og = out/G in
# {64, 256, 768, 2048}, so: 128x128 / 128x256 tiles with BLOCK_K 64 and 3-4 stages keep the wgmma
# pipeline fed at training sizes (M >= 2048); 128x64 / 64x64 cover og = 64 (down_proj, G = 20)
# without masking half a tile; at decode sizes (M <= 16) the op is bound by weight bytes, and
# the narrow 64x32 / 64x64 tiles with BLOCK_K 128 spread the weight read over many programs.
# No tile is under 64 rows: a wgmma instruction covers 64 rows per warpgroup, and the 16- and
# 32-row tiles compiled to HMMA (and spilled at 32x128x128). ``configs_for`` prunes, per launch,
# the tiles wider than the problem and those whose pipeline buffers do not fit the device's
# shared memory for the operand dtype, before the autotuner tries them. Autotuning is keyed on
# the power-of-two bucket of M (``p_bucket`` / ``k_bucket``) so that varying batch sizes do not
# re-tune on every call.
CUDA_CONFIGS = (
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 128, "BLOCK_Q": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_P": 64, "BLOCK_Q": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
)

# Shared memory per block on Hopper (H100/H200): 227 KiB. Ampere (A100): 163 KiB.
SMEM_LIMIT_BYTES = {9: 232448, 8: 166912}


def smem_bytes(config: triton.Config, itemsize: int) -> int:
    """Shared memory of the software pipeline: ``num_stages`` buffers of an A and a B tile."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_P"] + kw["BLOCK_Q"]) * kw["BLOCK_K"] * itemsize


def configs_for(P: int, Q: int, dtype: torch.dtype, smem_limit: int = SMEM_LIMIT_BYTES[9]):
    """The configs the autotuner may pick for a ``P x Q`` output in ``dtype``, best guess first.

    Drops tiles wider than the (power-of-two rounded) output in P or Q (below the 64 rows and
    64 columns every problem may use), where a smaller tile covers the same work with fewer
    masked lanes, and tiles whose pipeline does not fit in shared memory. At least the smallest
    config always stays.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    p_cap, q_cap = triton.next_power_of_2(max(P, 16)), triton.next_power_of_2(max(Q, 16))
    kept = [c for c in CUDA_CONFIGS
            if c.kwargs["BLOCK_P"] <= max(p_cap, 64) and c.kwargs["BLOCK_Q"] <= max(q_cap, 64)
            and smem_bytes(c, itemsize) <= smem_limit]
    return tuple(kept) or (CUDA_CONFIGS[-1],)


def _smem_limit(device: torch.device) -> int:
    """The shared memory one block may use on ``device`` (Hopper's when it cannot be asked)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        limit = getattr(props, "shared_memory_per_block_optin", None)
        if limit:
            return int(limit)
        return SMEM_LIMIT_BYTES.get(props.major, SMEM_LIMIT_BYTES[8])
    return SMEM_LIMIT_BYTES[9]


@triton.jit
def tile_ids(pid, P, Q, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, GROUP_P: tl.constexpr):
    """Program ``pid``'s output tile ``(pid_p, pid_q)``: GROUP_P row tiles share each column
    tile, so the column operand stays hot in L2."""
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    tiles_per_band = GROUP_P * num_q
    first_p = (pid // tiles_per_band) * GROUP_P
    band_p = min(num_p - first_p, GROUP_P)
    pid_p = first_p + (pid % tiles_per_band) % band_p
    pid_q = (pid % tiles_per_band) // band_p
    return pid_p, pid_q


# Operand views: which index of the problem walks the block-residue layout
# (``kphi3_kernels.layout``), so that the IO block's GEMMs read and write it in place.
VIEW_NONE = 0  # plain strided operands
VIEW_K = 1     # forward from the layout: A's columns are slots, B's rows weight rows (masked)
VIEW_Q = 2     # input gradient into the layout: B's columns weight rows (masked), C's slots
VIEW_P = 3     # weight gradient from the layout: A's rows (t^T) are slots, C's weight rows
VIEW_D = 4     # input gradient of both products per block: Q walks block g's slots, C's channels
# The same, as the kernels see them (a jitted function reads only constexpr globals).
_VIEW_K, _VIEW_Q, _VIEW_P = tl.constexpr(VIEW_K), tl.constexpr(VIEW_Q), tl.constexpr(VIEW_P)
_VIEW_D = tl.constexpr(VIEW_D)


def view_d_parts(block_q: int, groups: int, run: int) -> float:
    """The products one program of a ``VIEW_D`` launch sums, on average over its column tiles:
    the block's (W1) and one per residue its ``block_q`` slots meet (W2, masked to that
    residue's slots). The kernel loops over them; the ledger charges them."""
    width = groups * run
    starts = range(0, width, block_q)
    return sum(2 + (min(q0 + block_q, width) - 1) // run - q0 // run for q0 in starts) / len(starts)


@triton.jit
def _layout_index(i, g, second, mask, per_group, ACTIVE: tl.constexpr, GROUPS: tl.constexpr,
                  RUN: tl.constexpr):
    """``(slot, weight row, mask)`` of indices ``i`` of one problem dimension: where the view is
    ``ACTIVE`` on it, the layout column that index ``i`` of group ``g``'s operand names, the
    weight row it meets and ``mask`` narrowed to the slots that hold a channel (int32: a slot is
    under G*G*R, a row under s); elsewhere ``i`` itself (int64) for both, and ``mask``."""
    # One return: a jitted function's returns must agree in type across its branches.
    if ACTIVE:
        row, is_channel = operand_weight_row(i, g, per_group, GROUPS, RUN, second)
        slot = operand_slot(i, g, GROUPS, RUN, second)
        narrowed = mask & is_channel
    else:
        slot = i.to(tl.int64)
        row = slot
        narrowed = mask
    return slot, row, narrowed


@triton.jit
def _gathered_residual(r_ptr, pid_p, mask_p, offs_q, mask_q, g, Q, s_rp, s_rq, r_groups, r_width,
                       ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr):
    """The interleaved addend as the accumulator's start: output channel ``c = g*Q + q`` takes
    R's column ``(c % r_groups) * r_width + c // r_groups`` (the IO block's dx: dxi interleaved
    with step G). Offsets within the tile are int32 (the tile's first row is added in int64)."""
    chan = (g * Q + offs_q).to(tl.int32)
    r_cols = (chan % r_groups) * r_width + chan // r_groups
    r_rows = tl.arange(0, BLOCK_P) * s_rp
    r_tile = r_ptr + (pid_p * BLOCK_P).to(tl.int64) * s_rp
    return tl.load(r_tile + (r_rows[:, None] + r_cols[None, :] * s_rq),
                   mask=mask_p[:, None] & mask_q[None, :], other=0.0).to(ACC_DTYPE)


@triton.jit
def _plus_residual(acc, residual, out_ty: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``acc + residual``: in the accumulator, or in float64 for a float64 output."""
    if out_ty == tl.float64:
        total = acc.to(tl.float64) + residual.to(tl.float64)
    else:
        total = acc + residual.to(ACC_DTYPE)
    return total


@triton.jit
def _act_grad_epilogue(acc, act_ptr, c, mask, offs_p, chan, s_actp, s_actq, act_half, s_cq,
                       ACC_DTYPE: tl.constexpr):
    """The accumulator is dh, the gradient of ``h = up * silu(gate)`` at channels ``chan``; the
    saved gate_up [gate | up] (``act_half`` channels each) gives d(gate), returned, and d(up),
    stored at the same channel of C's second half: the activation's backward, fused."""
    act = act_ptr + offs_p[:, None] * s_actp + chan[None, :] * s_actq
    gate = tl.load(act, mask=mask, other=0.0).to(ACC_DTYPE)
    up = tl.load(act + act_half * s_actq, mask=mask, other=0.0).to(ACC_DTYPE)
    dgate, dup = silu_mul_grads(acc, gate, up)
    tl.store(c + act_half * s_cq, dup.to(c.dtype.element_ty), mask=mask)
    return dgate


@triton.jit
def _shared_k_loop(acc, a_base, b_base, a2_base, b2_base, a_rows, b_cols, mask_p, mask_bq, K, K2,
                   s_ak, s_bk, g32, per_group, VIEW: tl.constexpr, GROUPS: tl.constexpr,
                   RUN: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """``acc + A @ B + A2 @ B2`` for pairs that share their strides: one pipelined loop over
    K + K2, step i reading (A, B) for i < steps1, else (A2, B2); only the base pointers and
    the K bound switch. A K view's A columns are slots of t, B's rows the weight rows of
    group ``g32`` (padding masked)."""
    offs_k = tl.arange(0, BLOCK_K)
    steps1 = tl.cdiv(K, BLOCK_K)
    for i in range(0, steps1 + tl.cdiv(K2, BLOCK_K)):
        phase2 = i >= steps1
        k = tl.where(phase2, i - steps1, i) * BLOCK_K + offs_k
        mask_k = k < tl.where(phase2, K2, K)
        a_k, b_k, mask_bk = _layout_index(k, g32, phase2, mask_k, per_group, VIEW == _VIEW_K,
                                          GROUPS, RUN)
        a_src = tl.where(phase2, a2_base, a_base)
        b_src = tl.where(phase2, b2_base, b_base)
        a = tl.load(a_src + a_rows + a_k[None, :] * s_ak,
                    mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_src + b_k[:, None] * s_bk + b_cols,
                    mask=mask_bk[:, None] & mask_bq[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _plus_biases(acc, bias_ptr, bias2_ptr, g, s_biasg, s_bias2g, offs_q, mask_q,
                 HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``acc`` plus group ``g``'s biases at columns ``offs_q`` (those given)."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + g * s_biasg + offs_q, mask=mask_q, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if HAS_BIAS2:
        bias2 = tl.load(bias2_ptr + g * s_bias2g + offs_q, mask=mask_q, other=0.0)
        acc += bias2.to(ACC_DTYPE)[None, :]
    return acc


@triton.jit
def _silu_mul_into_layout(gate, up, t_tile, tile_rows, mask_rows, first_chan, s_tp,
                          act_per_group, ACT_GROUPS: tl.constexpr, ACT_RUN: tl.constexpr,
                          ACT_PAD: tl.constexpr, LAST: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Store ``up * silu(gate)`` (both as the output stores them) of the tile's channels
    ``first_chan + [0, BLOCK_Q)`` at their slots of the layout (``t_tile``: the tile's first
    row; ``ACT_GROUPS`` blocks of ``act_per_group`` channels, runs of ``ACT_RUN``), and zeros
    at the padding slots: every slot of the tile's rows is written by exactly one program."""
    chan = first_chan + tl.arange(0, BLOCK_Q)
    slot = slot_of_channel(chan, act_per_group, ACT_GROUPS, ACT_RUN)
    # Offsets within the tile stay int32 (fewer live registers than int64 pointers' worth).
    tl.store(t_tile + (tile_rows[:, None] * s_tp + slot[None, :]),
             silu_mul(gate, up).to(t_tile.dtype.element_ty), mask=mask_rows[:, None])
    # A run's padding follows its last channel (``i >= s - G`` in its block): the tile writes
    # the padding after the last channels it holds, at most ACT_PAD slots each, per block it
    # meets, on a narrow [rows, LAST] tile of those channels only.
    j = tl.arange(0, LAST)
    zero = tl.zeros((tile_rows.shape[0], LAST), dtype=t_tile.dtype.element_ty)
    for b in range(first_chan // act_per_group, (first_chan + BLOCK_Q - 1) // act_per_group + 1):
        i = act_per_group - ACT_GROUPS + j
        last = b * act_per_group + i
        held = (j < ACT_GROUPS) & (last >= first_chan) & (last < first_chan + BLOCK_Q)
        pad = t_tile + (tile_rows[:, None] * s_tp
                        + slot_of_channel(last, act_per_group, ACT_GROUPS, ACT_RUN)[None, :])
        for d in tl.static_range(1, ACT_PAD + 1):
            tl.store(pad + d, zero,
                     mask=mask_rows[:, None] & (held & (i // ACT_GROUPS + d < ACT_RUN))[None, :])


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, c2_ptr, r_ptr, bias_ptr, bias2_ptr, act_ptr,
    P, Q, K, K2,
    s_ag, s_ap, s_ak,
    s_bg, s_bk, s_bq,
    s_a2g, s_a2p, s_a2k,
    s_b2g, s_b2k, s_b2q,
    s_cg, s_cp, s_cq,
    s_rg, s_rp, s_rq,
    s_biasg, s_bias2g,
    r_groups, r_width,
    s_actp, s_actq, act_half,
    t_ptr, s_tp, act_per_group,  # the activation layout's output (ACT_LAYOUT only)
    per_group,  # the layout's channels per block (views only)
    k_per_split, s_split,  # split K: each split's share of K (a multiple of 128), its C offset
    p_bucket, k_bucket,  # autotune keys only
    HAS_SECOND: tl.constexpr, SHARED_STRIDES: tl.constexpr, PAIRED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BIAS2: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    RESIDUAL_GATHER: tl.constexpr, ACT_GRAD: tl.constexpr, ACT_LAYOUT: tl.constexpr,
    ACT_GROUPS: tl.constexpr, ACT_RUN: tl.constexpr, ACT_PAD: tl.constexpr,
    ACT_LAST: tl.constexpr,
    VIEW: tl.constexpr, GROUPS: tl.constexpr, RUN: tl.constexpr, VIEW_SECOND: tl.constexpr,
    SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_P: tl.constexpr,
):
    pid = tl.program_id(0)
    g32 = tl.program_id(1)
    if ACT_LAYOUT:
        # The programs walk the gate half's column tiles (``act_half`` channels; BLOCK_Q
        # divides it and Q): each computes the gate tile, then the up tile of the same
        # channels (``act_half`` columns on, in another group) and the activation of both.
        gate_tiles = act_half // BLOCK_Q
        gate_col = (pid % gate_tiles) * BLOCK_Q
        g32 = gate_col // Q
    # A view's operand: residue g (``second``) or block g. G and R are constexprs, so a view's
    # extent is one too: the compiler proves its runs contiguous and 16-byte aligned.
    second = VIEW_SECOND
    if PAIRED:
        # Two problems of one shape and one set of strides in one launch: groups G..2G-1 of
        # grid axis 1 compute C2[g] = A2[g] @ B2[g]; only the base pointers switch.
        half = tl.num_programs(1) // 2
        second = g32 >= half
        g32 = tl.where(second, g32 - half, g32)
    g = g32.to(tl.int64)
    if PAIRED:
        a_base = tl.where(second, a2_ptr + g * s_a2g, a_ptr + g * s_ag)
        b_base = tl.where(second, b2_ptr + g * s_b2g, b_ptr + g * s_bg)
        c_base = tl.where(second, c2_ptr + g * s_cg, c_ptr + g * s_cg)
    else:
        a_base = a_ptr + g * s_ag
        b_base = b_ptr + g * s_bg
        c_base = c_ptr + g * s_cg
    # A view's extent and the layout's strides are constexprs (a row of t is G*G*R elements), so
    # the compiler proves each run of R slots contiguous and 16-byte aligned. Indices within a
    # view stay int32 (a slot is under G*G*R, a weight row under s).
    if VIEW == _VIEW_P:
        P = GROUPS * RUN
        s_ap = 1
        s_ak = GROUPS * GROUPS * RUN
    if VIEW == _VIEW_Q:
        Q = GROUPS * RUN
        s_cp = GROUPS * GROUPS * RUN
        s_cq = 1
        s_rp = GROUPS * GROUPS * RUN
        s_rq = 1
    if VIEW == _VIEW_K:
        K = GROUPS * RUN
        K2 = GROUPS * RUN
        s_ap = GROUPS * GROUPS * RUN
        s_ak = 1
    if VIEW == _VIEW_D:
        Q = GROUPS * RUN
    pid_p, pid_q = tile_ids(pid, P, Q, BLOCK_P, BLOCK_Q, GROUP_P)
    if ACT_LAYOUT:
        pid_p = pid // gate_tiles
        pid_q = (gate_col % Q) // BLOCK_Q

    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_k = tl.arange(0, BLOCK_K)
    mask_p = rows < P
    mask_q = cols < Q
    # A P view: A's rows are slots of t^T, C's the weight rows (padding rows not stored).
    a_p, c_p, mask_cp = _layout_index(rows, g32, second, mask_p, per_group, VIEW == _VIEW_P,
                                      GROUPS, RUN)
    # A Q view: B's columns are weight rows (padding masked), C's the slots of the layout.
    # A D view: the same columns, C's the channels they hold.
    c_q, b_q, mask_bq = _layout_index(cols, g32, second, mask_q, per_group,
                                      (VIEW == _VIEW_Q) or (VIEW == _VIEW_D), GROUPS, RUN)
    offs_p = rows.to(tl.int64)
    offs_q = cols.to(tl.int64)
    mask_cq = mask_q
    if VIEW == _VIEW_D:
        chan = g32 * per_group + b_q  # b_q: the slot's index in block g
        c_q = chan.to(tl.int64)
        mask_cq = mask_bq

    # Every tl.dot names the accumulator's dtype: Triton 3.6 defaults out_dtype to fp32 and
    # rejects the float64 accumulator otherwise (3.9 infers it); for fp32/fp16/bf16 it is fp32.
    if HAS_RESIDUAL and RESIDUAL_GATHER:
        # The gather has no unit stride, so it is scalar; loaded into the accumulator before the
        # K loop, while no pipeline buffer is live, it costs no registers of its own (in the
        # epilogue it spilled at 128-row tiles).
        acc = _gathered_residual(r_ptr, pid_p, mask_p, offs_q, mask_q, g, Q, s_rp, s_rq,
                                 r_groups, r_width, ACC_DTYPE, BLOCK_P)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE)
    a_rows = a_p[:, None] * s_ap
    b_cols = b_q[None, :] * s_bq
    if VIEW == _VIEW_D:
        steps1 = tl.cdiv(K, BLOCK_K)
        # Slot j = n*R + r of block g holds channel c = g*s + i: dh[:, c] = dy_g @ W1[g][i]^T
        # + dy_n @ W2[n][c // G]^T. One loop over the products the tile's slots need: the block's
        # (part 0), then one per residue n its slots meet, W2's columns masked to n's slots.
        first_n = (pid_q * BLOCK_Q) // RUN
        last_n = tl.minimum((pid_q * BLOCK_Q + BLOCK_Q - 1) // RUN, GROUPS - 1)
        w2_rows = chan // GROUPS
        slot_n = cols // RUN
        for i in range(0, (last_n - first_n + 2) * steps1):
            part = i // steps1
            n = first_n + part - 1
            k = (i % steps1) * BLOCK_K + offs_k
            mask_k = k < K
            a_group = tl.where(part == 0, g32, n).to(tl.int64)
            a = tl.load(a_ptr + a_group * s_ag + a_rows + k[None, :] * s_ak,
                        mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            b_src = tl.where(part == 0, b_base, b2_ptr + n.to(tl.int64) * s_b2g)
            w_rows = tl.where(part == 0, b_q, w2_rows)
            mask_w = tl.where(part == 0, mask_bq, mask_bq & (slot_n == n))
            b = tl.load(b_src + k[:, None] * s_bk + w_rows[None, :] * s_bq,
                        mask=mask_k[:, None] & mask_w[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
    elif HAS_SECOND and SHARED_STRIDES:
        acc = _shared_k_loop(acc, a_base, b_base, a2_ptr + g * s_a2g, b2_ptr + g * s_b2g, a_rows,
                             b_cols, mask_p, mask_bq, K, K2, s_ak, s_bk, g32, per_group, VIEW,
                             GROUPS, RUN, INPUT_PRECISION, ACC_DTYPE, BLOCK_K)
    else:
        k_lo = 0
        k_hi = K
        if SPLIT_K > 1:
            # Split ``split`` sums K-range [k_lo, k_hi) into its own slice of an fp32 workspace;
            # a second pass (``_split_k_sum_kernel``) adds the slices in a fixed order.
            split = tl.program_id(2)
            k_lo = split * k_per_split
            k_hi = tl.minimum(K, k_lo + k_per_split)
            c_base += split.to(tl.int64) * s_split
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < k_hi
            # A K view: A's columns are slots of t, B's rows the weight rows (padding masked).
            a_k, b_k, mask_bk = _layout_index(k, g32, second, mask_k, per_group, VIEW == _VIEW_K,
                                              GROUPS, RUN)
            a = tl.load(a_base + a_rows + a_k[None, :] * s_ak,
                        mask=mask_p[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_base + b_k[:, None] * s_bk + b_cols,
                        mask=mask_bk[:, None] & mask_bq[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_SECOND:
            # The fused IO variant: A2 has its own strides (x[..., n::G] read in place).
            a2_rows = a2_ptr + g * s_a2g + offs_p[:, None] * s_a2p
            b2_cols = b2_ptr + g * s_b2g + offs_q[None, :] * s_b2q
            for k0 in range(0, K2, BLOCK_K):
                k = (k0 + offs_k).to(tl.int64)
                mask_k = k < K2
                a = tl.load(a2_rows + k[None, :] * s_a2k,
                            mask=mask_p[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b2_cols + k[:, None] * s_b2k,
                            mask=mask_k[:, None] & mask_q[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    # Epilogue: biases and residual in the fp32 accumulator, one rounding at the store.
    acc = _plus_biases(acc, bias_ptr, bias2_ptr, g, s_biasg, s_bias2g, offs_q, mask_q, HAS_BIAS,
                       HAS_BIAS2, ACC_DTYPE)
    mask = mask_cp[:, None] & mask_cq[None, :]
    c = c_base + c_p[:, None] * s_cp + c_q[None, :] * s_cq
    if HAS_RESIDUAL and not RESIDUAL_GATHER:
        residual = tl.load(r_ptr + g * s_rg + c_p[:, None] * s_rp + c_q[None, :] * s_rq,
                           mask=mask, other=0.0)
        acc = _plus_residual(acc, residual, c_ptr.dtype.element_ty, ACC_DTYPE)
    if ACT_GRAD:  # a D view's: c_q holds the channels
        acc = _act_grad_epilogue(acc, act_ptr, c, mask, offs_p, c_q, s_actp, s_actq, act_half,
                                 s_cq, ACC_DTYPE)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if ACT_LAYOUT:
        # The up tile: its own loop on a fresh accumulator. The gate's values wait in gate_up,
        # just stored (read back from L2 after the loop, their registers free for it), rounded
        # as stored: the activation reads what the unfused one would read back.
        up_col = g32 * Q + pid_q * BLOCK_Q + act_half
        g_up32 = up_col // Q
        g_up = g_up32.to(tl.int64)
        # A tile index times BLOCK_Q: the compiler sees the columns 16-byte aligned.
        offs_up = ((up_col % Q) // BLOCK_Q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        acc = _shared_k_loop(tl.zeros((BLOCK_P, BLOCK_Q), dtype=ACC_DTYPE), a_ptr + g_up * s_ag,
                             b_ptr + g_up * s_bg, a2_ptr + g_up * s_a2g, b2_ptr + g_up * s_b2g,
                             a_rows, offs_up[None, :] * s_bq, mask_p, mask_q, K, K2, s_ak, s_bk,
                             g_up32, per_group, VIEW, GROUPS, RUN, INPUT_PRECISION, ACC_DTYPE,
                             BLOCK_K)
        acc = _plus_biases(acc, bias_ptr, bias2_ptr, g_up, s_biasg, s_bias2g, offs_up, mask_q,
                           HAS_BIAS, HAS_BIAS2, ACC_DTYPE)
        up = acc.to(c_ptr.dtype.element_ty)
        # The tile's first row in int64, offsets within it int32 (fewer live registers).
        row0 = (pid_p * BLOCK_P).to(tl.int64)
        tile_rows = tl.arange(0, BLOCK_P)
        tl.store(c_ptr + g_up * s_cg + row0 * s_cp
                 + (tile_rows[:, None] * s_cp + offs_up[None, :] * s_cq), up, mask=mask)
        # Other threads of this program stored some of the gate's elements: the barrier makes
        # their stores visible before the read.
        tl.debug_barrier()
        gate = tl.load(c_ptr + g * s_cg + row0 * s_cp
                       + (tile_rows[:, None] * s_cp + cols[None, :] * s_cq), mask=mask, other=0.0)
        _silu_mul_into_layout(gate.to(ACC_DTYPE), up.to(ACC_DTYPE), t_ptr + row0 * s_tp,
                              tile_rows, mask_p, g32 * Q + pid_q * BLOCK_Q, s_tp, act_per_group,
                              ACT_GROUPS, ACT_RUN, ACT_PAD, ACT_LAST, BLOCK_Q)


@triton.jit
def _split_k_sum_kernel(ws_ptr, out_ptr, out2_ptr, N, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``out[i] = sum over s of ws[o, s, i]`` (o = grid axis 1: ``out``, then ``out2``), the
    splits added in order 0, 1, ... in the workspace's dtype, rounded once: the same result on
    every run, whatever order the GEMM's programs ran in."""
    o = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    src = ws_ptr + (o * SPLITS).to(tl.int64) * N + offs
    acc = tl.load(src, mask=mask, other=0.0)
    for _ in tl.static_range(1, SPLITS):
        src += N
        acc += tl.load(src, mask=mask, other=0.0)
    dst = tl.where(o == 0, out_ptr, out2_ptr)
    tl.store(dst + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Split K (weight gradients): each split keeps at least SPLIT_MIN_K of the reduction (16 steps
# of 64, so the pipeline's prologue stays a small part of it), at most MAX_SPLITS of them, and
# each split's range is a multiple of 128, every BLOCK_K's multiple: a split's sum does not
# depend on the config. The SMs of an H100 / H200 where the device cannot be asked.
SPLIT_MIN_K = 1024
MAX_SPLITS = 16
SPLIT_ALIGN = 128
DEFAULT_SMS = 132
# Tests set this to an int to force that many splits on every weight-gradient launch.
FORCE_SPLITS: Optional[int] = None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return DEFAULT_SMS


def split_plan(P: int, Q: int, K: int, groups: int, config: triton.Config,
               device: torch.device, sms: Optional[int] = None) -> Tuple[int, int]:
    """``(splits, K per split)`` of a weight-gradient launch, by a wave model: the launch takes
    ``ceil(programs * S / SMs)`` waves of ``1/S`` of the work, ``programs`` counted with the
    first-choice tile. The fewest splits within 10% of the best, kept only where they save at
    least a fifth over no split: each split costs an fp32 copy of the output, written by the
    GEMM and read by the sum."""
    if FORCE_SPLITS is not None:
        want = FORCE_SPLITS
    else:
        sms = sms or _sm_count(device)
        programs = groups * triton.cdiv(P, config.kwargs["BLOCK_P"]) \
            * triton.cdiv(Q, config.kwargs["BLOCK_Q"])
        most = min(MAX_SPLITS, K // SPLIT_MIN_K)

        def waves(n):
            return triton.cdiv(programs * n, sms) / n

        counts = range(1, max(most, 1) + 1)
        best = min(waves(n) for n in counts)
        want = next(n for n in counts if waves(n) <= 1.1 * best)
        if waves(want) > 0.8 * waves(1):
            want = 1
    if want <= 1 or K <= SPLIT_ALIGN:
        return 1, K
    per_split = triton.cdiv(triton.cdiv(K, want), SPLIT_ALIGN) * SPLIT_ALIGN
    splits = triton.cdiv(K, per_split)
    return (splits, per_split) if splits > 1 else (1, K)


def _interpreter_config(P: int, Q: int, K: int) -> triton.Config:
    # The interpreter's cost grows with programs x K-steps, so take the largest sensible tiles.
    def fit(n, lo, hi):
        return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))

    return triton.Config({"BLOCK_P": fit(P, 16, 64), "BLOCK_Q": fit(Q, 16, 128),
                          "BLOCK_K": fit(K, 16, 128)}, num_warps=4)


def accumulator_dtype(dtype: torch.dtype):
    """Where the kernels sum: fp32 for fp32 / fp16 / bf16 operands, float64 for float64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of partial results that are summed again (a split's share of a weight
    gradient, a norm's statistics): ``accumulator_dtype``'s, so they are rounded once."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 stays IEEE (relative error far under 1e-5) unless the user opted into TF32 for matmuls.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not triton_interpreting():
        return "tf32"
    return "ieee"


def view_d_order(configs, K: int, groups: int, run: int):
    """A D view's configs, least MMA work per output element first (stable): a tile of
    ``BLOCK_Q`` slots sums ``view_d_parts`` products of ``ceil(K / BLOCK_K)`` steps, each
    ``BLOCK_K`` deep. Wider tiles meet more residues, deeper steps pad a short K (down_proj's
    ``og``): at og = 64, R = 16 a 64-wide tile of 64-deep steps does the least; at og = 96,
    R = 8, a 32-wide one of 128-deep steps (5 products of one step against 9 of two)."""
    def work(config):
        kw = config.kwargs
        return view_d_parts(kw["BLOCK_Q"], groups, run) * triton.cdiv(K, kw["BLOCK_K"]) \
            * kw["BLOCK_K"]

    return tuple(sorted(configs, key=work))


class ActivationLayout(NamedTuple):
    """A forward launch's second output (``ACT_LAYOUT``): ``up * silu(gate)`` of its result
    ``[gate | up]`` (``Q * groups`` channels, gate the first half) in the block-residue layout
    of the block it feeds: ``t`` ``[P, G*G*R]`` with ``groups`` (G) and ``run`` (R)."""

    t: torch.Tensor
    groups: int
    run: int


# The activation-layout launch runs two K loops per program: at 64 accumulator elements per
# thread (128x128 on 8 warps, 128x64 / 64x128 on 4) it compiles clean on sm_90a (Triton 3.6)
# because the gate's values wait in gate_up, not in registers (holding them there spilled
# 24-192 B); 128 per thread (128x256 on 8 warps) is not offered.
_ACT_LAYOUT_ELEMENTS_PER_THREAD = 64


def _act_layout_configs(configs, Q: int, channels: int):
    """The configs whose column tile fits the activation-layout launch: ``BLOCK_Q`` divides the
    group width ``Q`` and the gate half's ``channels`` (a tile's gate and up columns each lie in
    one group), and two accumulators' worth of registers stay in bounds."""
    return tuple(c for c in configs
                 if Q % c.kwargs["BLOCK_Q"] == 0 and channels % c.kwargs["BLOCK_Q"] == 0
                 and c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"]
                 <= _ACT_LAYOUT_ELEMENTS_PER_THREAD * 32 * c.num_warps)


def activation_layout_fits(groups: int, Q: int, act_groups: int, act_run: int) -> bool:
    """Whether a forward launch of ``groups`` groups of ``Q`` columns can write the activation
    layout (``ActivationLayout``) of ``act_groups`` groups in its epilogue: the smallest tile
    (and the interpreter's) fits the column split, and every run of the layout holds a channel
    (``s >= G``), whose last channel writes the run's padding."""
    channels, rem = divmod(groups * Q, 2)
    if rem or channels % act_groups:
        return False
    per_group = channels // act_groups
    return (per_group >= act_groups and act_run * act_groups >= per_group
            and bool(_act_layout_configs(CUDA_CONFIGS, Q, channels)))


class LayoutView(NamedTuple):
    """An operand view of the block-residue layout (``VIEW_K`` / ``VIEW_Q`` / ``VIEW_P``): the
    layout's ``groups`` (G), run length ``run`` (R) and channels per block ``per_group`` (s);
    ``second`` says the launch's one operand is the residue (W2's) side, else the block side
    (a K view takes both sides in its one loop, a paired launch one per problem)."""

    kind: int
    groups: int
    run: int
    per_group: int
    second: bool = False


class Operand:
    """A grouped 2-D operand: ``tensor`` addressed as ``base + g*sg + row*sr + col*sc``."""

    __slots__ = ("tensor", "sg", "sr", "sc")

    def __init__(self, tensor: torch.Tensor, sg: int, sr: int, sc: int):
        self.tensor, self.sg, self.sr, self.sc = tensor, sg, sr, sc

    def strides(self):
        return self.sg, self.sr, self.sc


def grouped_gemm(
    groups: int,
    P: int,
    Q: int,
    a: Operand,
    b: Operand,
    K: int,
    c: Operand,
    a2: Optional[Operand] = None,
    b2: Optional[Operand] = None,
    K2: int = 0,
    bias: Optional[torch.Tensor] = None,
    bias2: Optional[torch.Tensor] = None,
    residual: Optional[Operand] = None,
    residual_gather: Optional[Tuple[int, int]] = None,
    c2: Optional[Operand] = None,
    act_grad: Optional[Tuple[torch.Tensor, int]] = None,
    act_layout: Optional[ActivationLayout] = None,
    view: Optional[LayoutView] = None,
    weight_grad: bool = False,
    name: str = "grouped_gemm",
) -> None:
    """Launch the kernel: ``c[g] = a[g] @ b[g] (+ a2[g] @ b2[g]) (+ biases) (+ residual[g])``.

    ``a[g]`` is ``P x K``, ``b[g]`` is ``K x Q``, ``c[g]`` and ``residual[g]`` are ``P x Q``,
    ``bias`` is ``[groups, Q]``. When ``a2``/``b2`` have the strides of ``a``/``b`` the two
    products run as one K loop of ``K + K2``; otherwise as two loops on one accumulator.

    ``c2`` makes the launch *paired* instead: ``c2[g] = a2[g] @ b2[g]`` is a second, independent
    problem of the same shape and strides (grid axis 1 covers ``2 * groups``), e.g. the IO
    block's two weight gradients, which read one ``dy``.

    ``residual_gather=(r_groups, r_width)`` reads the residual (one ``P x groups*Q`` matrix, no
    group stride) at column ``(c % r_groups) * r_width + c // r_groups`` for output channel
    ``c = g*Q + q``: an interleaved addend, added in the fp32 epilogue.
    ``act_grad=(gate_up, half)`` (a D view's only) fuses the backward of ``h = up * silu(gate)``
    into the epilogue: the accumulator is ``dh`` at the slots' channels ``c``, and the launch
    stores ``d(gate)`` at column ``c`` and ``d(up)`` at column ``c + half`` of ``c``'s tensor
    (``[P, 2*half]``), reading the saved ``gate_up`` (same layout) at those columns.
    ``act_layout`` (a forward with a shared-strides second pair: the split IO block, or a K
    view) also writes ``up * silu(gate)`` of the result ``[gate | up]`` into the block-residue
    layout of the block it feeds (``ActivationLayout``): the programs walk the gate half's
    tiles, each computing the up tile of the same channels too (``activation_layout_fits``
    says where it can).
    ``view`` reads or writes the block-residue layout in place (``LayoutView``), or walks its
    slots: a D view's Q runs over block g's slots and C is stored at the channels they hold
    (``c`` with no group stride); it sums ``a[g] @ b[g]`` and, per residue n its tile meets,
    ``a[n] @ b2[n]`` masked to n's slots (``a2`` is ``a``; the MLP tail's d(gate_up) with
    ``act_grad``). A K view's A is the layout ``t`` (column stride 1, no group stride) and B a
    ``[G, s, og]`` weight, whose rows the layout index maps to; a Q view's B is a weight with
    its inner strides swapped and C the layout; a P view's A is ``t`` transposed (row stride 1)
    and C a ``[G, s, og]`` weight gradient. The view's extent (``G*R``) replaces K, Q or P
    respectively (Q for a D view).
    ``weight_grad`` says the launch is a weight gradient (K is the token count; ``c`` and ``c2``
    contiguous and written whole): where its programs do not fill the GPU, K is split
    (``split_plan``) and the splits are summed by a second, fixed-order pass.
    ``name`` says what the launch is for (reports and tests see it).
    """
    if P == 0 or Q == 0 or groups == 0:
        return
    paired = c2 is not None
    if paired and (a2 is None or b2 is None or K2 not in (0, K) or bias is not None
                   or residual is not None):
        raise ValueError("a paired launch takes a2 and b2 of the first problem's shape, and no "
                         "bias or residual")
    if paired and (a2.strides()[1:] != a.strides()[1:] or b2.strides()[1:] != b.strides()[1:]
                   or c2.strides() != c.strides()):
        raise ValueError("a paired launch's two problems must share their row and column strides")
    if act_grad is not None and (view is None or view.kind != VIEW_D):
        raise ValueError("act_grad needs a D view: its epilogue reads the channels the view's "
                         "slots hold")
    has_second = a2 is not None and not paired
    # Biases are tiny; a contiguous copy keeps the kernel's bias addressing to one stride.
    bias = bias.contiguous() if bias is not None else None
    bias2 = bias2.contiguous() if bias2 is not None else None
    a2 = a2 if a2 is not None else a
    b2 = b2 if b2 is not None else b
    shared = a2.strides()[1:] == a.strides()[1:] and b2.strides()[1:] == b.strides()[1:]
    gate_channels = groups * Q // 2  # an activation layout's channels: the gate half's
    if act_layout is not None and (
            not (has_second and shared) or residual is not None or weight_grad
            or not activation_layout_fits(groups, Q, act_layout.groups, act_layout.run)):
        raise ValueError("act_layout needs a forward launch with a second pair of shared strides, "
                         "no residual, and a shape activation_layout_fits accepts")
    res = residual if residual is not None else c
    dummy = c.tensor
    names = ("s_ag", "s_ap", "s_ak", "s_bg", "s_bk", "s_bq", "s_a2g", "s_a2p", "s_a2k",
             "s_b2g", "s_b2k", "s_b2q", "s_cg", "s_cp", "s_cq", "s_rg", "s_rp", "s_rq")
    strides = (*a.strides(), *b.strides(), *a2.strides(), *b2.strides(), *c.strides(),
               *res.strides())
    args = dict(
        a_ptr=a.tensor, b_ptr=b.tensor, a2_ptr=a2.tensor, b2_ptr=b2.tensor, c_ptr=c.tensor,
        c2_ptr=c2.tensor if paired else c.tensor, r_ptr=res.tensor, bias_ptr=bias if bias is not None else dummy,
        bias2_ptr=bias2 if bias2 is not None else dummy,
        P=P, Q=Q, K=K, K2=K2 if has_second else 0,
        **dict(zip(names, strides)),
        s_biasg=bias.stride(0) if bias is not None else 0,
        s_bias2g=bias2.stride(0) if bias2 is not None else 0,
        r_groups=residual_gather[0] if residual_gather else 1,
        r_width=residual_gather[1] if residual_gather else 1,
        act_ptr=act_grad[0] if act_grad else dummy,
        s_actp=act_grad[0].stride(0) if act_grad else 0,
        s_actq=act_grad[0].stride(1) if act_grad else 0,
        act_half=act_grad[1] if act_grad else (gate_channels if act_layout else 0),
        t_ptr=act_layout.t if act_layout else dummy,
        s_tp=act_layout.t.stride(0) if act_layout else 0,
        act_per_group=gate_channels // act_layout.groups if act_layout else 1,
        ACT_LAYOUT=act_layout is not None,
        ACT_GROUPS=act_layout.groups if act_layout else 1,
        ACT_RUN=act_layout.run if act_layout else 1,
        ACT_PAD=_act_pad(gate_channels, act_layout) if act_layout else 0,
        ACT_LAST=triton.next_power_of_2(act_layout.groups) if act_layout else 1,
        p_bucket=triton.next_power_of_2(P), k_bucket=triton.next_power_of_2(max(K, K2)),
        HAS_SECOND=has_second, SHARED_STRIDES=shared, PAIRED=paired, HAS_BIAS=bias is not None,
        HAS_BIAS2=bias2 is not None, HAS_RESIDUAL=residual is not None,
        RESIDUAL_GATHER=residual_gather is not None, ACT_GRAD=act_grad is not None,
        per_group=view.per_group if view else 1, VIEW=view.kind if view else VIEW_NONE,
        k_per_split=K, s_split=0,
        GROUPS=view.groups if view else 1, RUN=view.run if view else 1,
        VIEW_SECOND=bool(view.second) if view else False,
        INPUT_PRECISION=_input_precision(a.tensor.dtype), GROUP_P=8,
        # fp32 accumulation for fp32/fp16/bf16; float64 operands keep a float64 accumulator.
        ACC_DTYPE=accumulator_dtype(a.tensor.dtype),
    )

    grid_groups = 2 * groups if paired else groups

    def grid(meta):
        if act_layout is not None:  # the gate half's tiles, one program each
            return (triton.cdiv(P, meta["BLOCK_P"]) * (gate_channels // meta["BLOCK_Q"]), 1,
                    meta["SPLIT_K"])
        return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]), grid_groups,
                meta["SPLIT_K"])

    configs = configs_for(P, Q, a.tensor.dtype, _smem_limit(c.tensor.device))
    if residual_gather is not None:
        # The gathered addend is one scalar load per accumulator element: with 128 elements
        # per thread (128x256 on 8 warps, 128x128 on 4) it spilled on sm_90a (Triton 3.6 and
        # 3.9); 64 per thread compile clean.
        configs = tuple(c for c in configs if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"]
                        <= 64 * 32 * c.num_warps) or configs
    if act_grad is not None:
        # The activation's backward adds two loads and two stores per accumulator element: at
        # 64 elements per thread it spilled on sm_90a (Triton 3.6, 8 to 144 B); 32 compile clean.
        configs = tuple(c for c in configs if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"]
                        <= 32 * 32 * c.num_warps) or configs
    interpreter_config = _interpreter_config(P, Q, max(K, K2))
    if act_layout is not None:
        configs = _act_layout_configs(configs, Q, gate_channels) \
            or _act_layout_configs(CUDA_CONFIGS, Q, gate_channels)[-1:]
        interpreter_config = _act_layout_configs([interpreter_config] + [
            triton.Config(dict(interpreter_config.kwargs, BLOCK_Q=bq), num_warps=4)
            for bq in (64, 32)], Q, gate_channels)[0]
    if view is not None and view.kind == VIEW_D:
        # Each step of a D view loads one of several B tiles (W1's, then W2's per residue): a
        # 128x64 one spilled on sm_90a (Triton 3.6, 76-96 B); 64x64 and 128x32 compile clean.
        configs = tuple(c for c in configs if c.kwargs["BLOCK_K"] * c.kwargs["BLOCK_Q"]
                        <= 64 * 64) or configs
        configs = view_d_order(configs, K, view.groups, view.run)
    splits, k_per_split = (split_plan(P, Q, K, grid_groups, configs[0], c.tensor.device)
                           if weight_grad else (1, K))
    outs = (c.tensor, c2.tensor if paired else None)
    if splits > 1:
        if has_second or bias is not None or bias2 is not None or residual is not None \
                or act_grad is not None:
            raise ValueError("split K sums plain products: no second operand, bias, residual "
                             "or activation gradient")
        if not all(t is None or t.is_contiguous() for t in outs) or \
                (paired and c2.tensor.shape != c.tensor.shape):
            raise ValueError("split K writes contiguous outputs of one shape")
        # Each split writes C's elements, at C's strides, into its own fp32 slice (poisoned in
        # tests like an output: an element no split wrote would reach the sum).
        numel = c.tensor.numel()
        ws = outputs.new_output((2 if paired else 1, splits, numel),
                                intermediate_dtype(c.tensor.dtype), c.tensor.device)
        # Every pointer the launch does not use points at the workspace too, so the launch
        # names no tensor it does not touch (the ledger counts the tensors it is given).
        args.update(c_ptr=ws, c2_ptr=ws[-1], r_ptr=ws, act_ptr=ws, t_ptr=ws, bias_ptr=ws,
                    bias2_ptr=ws, s_split=numel)
    args.update(SPLIT_K=splits, k_per_split=k_per_split)
    launch(KernelLaunch(
        name=name, kernel=_grouped_gemm_kernel, grid=grid, args=args,
        configs=configs,
        interpreter_config=interpreter_config,
        tune_key=("p_bucket", "Q", "k_bucket", "K2", "HAS_SECOND", "SHARED_STRIDES", "PAIRED",
                  "HAS_RESIDUAL", "RESIDUAL_GATHER", "ACT_GRAD", "ACT_LAYOUT", "VIEW", "GROUPS",
                  "RUN", "VIEW_SECOND", "SPLIT_K"),
        # An output that is also the residual is accumulated into: restore it between trials.
        restore=("c_ptr",) if residual is not None and residual.tensor is c.tensor else (),
        device=c.tensor.device,
    ))
    if splits > 1:
        _sum_splits(ws, outs, splits, name)


def _act_pad(channels: int, act_layout: ActivationLayout) -> int:
    """The most padding slots that follow a run's last channel: ``R - 1 - (s - G) // G``."""
    G = act_layout.groups
    per_group = channels // G
    return act_layout.run - 1 - (per_group - G) // G


def _sum_splits(ws: torch.Tensor, outs, splits: int, name: str) -> None:
    numel = ws.shape[-1]
    config = triton.Config({"BLOCK_N": 1024}, num_warps=4)
    out, out2 = outs
    launch(KernelLaunch(
        name=f"{name}_sum", kernel=_split_k_sum_kernel,
        grid=lambda meta: (triton.cdiv(numel, meta["BLOCK_N"]), ws.shape[0]),
        args=dict(ws_ptr=ws, out_ptr=out, out2_ptr=out2 if out2 is not None else out, N=numel,
                  SPLITS=splits),
        configs=[config], interpreter_config=config, device=ws.device,
    ))
