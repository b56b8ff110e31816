"""PyTorch launchers with the same signatures as ``triton_impl``: the ``torch`` backend.

Every grouped product is one batched GEMM (``torch.bmm`` / ``baddbmm``) over a strided view of
its operand: group ``n`` of ``x[:, n*s:(n+1)*s]`` is ``x.view(M, G, s).transpose(0, 1)`` (read
in place), and the IO block's interleaved operand ``x[:, n::G]`` is
``x.view(M, s, G).permute(2, 0, 1)`` (copied to ``[M, G, s]``, since BLAS needs a unit stride).
The IO block's second product accumulates onto the first in the same ``[G, M, og]`` buffer; one
elementwise pass then writes that buffer into the ``[M, G*og]`` output (adding the residual, for
the non-IO block). Compared with the plain reference (``reference.py``) this saves one of its two
output copies and its output-sized sum; compared with a Python loop of per-group GEMMs it saves
``2G`` dispatches and threaded BLAS calls per product, which dominate at decode sizes and at
G = 20 and degrade badly when the CPU is shared. From ``M = 4s`` rows on, for groups of at least
``JOINT_MIN_OG`` outputs, where each group's GEMM is large, the IO block's forward is instead one
GEMM of K = 2s per group, on ``[x_n | x[:, n::G]]`` (one buffer) and ``[W1[n]; W2[n]]``
(concatenated per call), which in fp32 / fp64 writes the output in place: no second GEMM
accumulating onto the first, and no copy out of a buffer (see ``_io_joint``). Once its whole-M
temporaries would pass ``WHOLE_BYTES``, the IO block runs in row blocks of ``BLOCK_BYTES`` (see
``_row_block``): they then stay in the heap and in cache instead of being page-faulted in on every
call, which cut its backward at G = 20, M = 2048 by about 40%.

Intermediate precision: one rule for every launcher, every M. Everything is accumulated in the
*accumulation dtype*, float32 for float16 / bfloat16 operands and the operand dtype otherwise
(float32, float64): half-precision operands are upcast first, both products of the IO block, the
biases and the residual are summed in float32, and each returned tensor is rounded to the operand
dtype once, at the end. This is the Triton kernels' rule (an fp32 accumulator, one rounding in the
epilogue), so an intermediate product that would overflow float16 while the final sum does not
gives the finite sum, and never ``inf``. The one intermediate that is itself returned, the
non-IO block's ``h`` (saved for the backward), is rounded once like any output, and the second
GEMM and the residual read the rounded ``h``, as the Triton kernel does. Intermediates that are
not returned stay in the accumulation dtype: the IO block's two input-gradient terms are summed
before rounding, and the non-IO block's gradient with respect to ``first(x)`` (``dy`` plus the
second GEMM's input gradient) is never rounded. Bias gradients are sums in the accumulation dtype
too: float32 sums for float16 / bfloat16, float64 sums for float64.

Every output is allocated through ``outputs.new_output`` (tests poison them with NaN).

The fused decoder's launchers (the end of this file) have the names and signatures of the
Triton ones (``triton_fused.py``) and compose the functions above with ``kphi3_kernels.layout``'s
slots, under the same rule: the activation, the norms and the block's input gradient in the
accumulation dtype, each returned tensor rounded once. One exception keeps Phi-3's module: the
RMSNorm's forward rounds the normalized input to its input's dtype before the weight scales it
(``weight * xhat.to(dtype)``), as ``KPhi3RMSNorm`` does, so the torch backend's fused norms give
the op-level model's values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import outputs
from ..layout import residue_slots

__all__ = [
    "grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd",
    "gpc_block_fwd", "gpc_block_bwd", "interleave_fwd",
    # the fused decoder's launchers (``fused_ops.py``), as ``triton_fused.py`` names them
    "silu_mul_layout_fwd", "silu_mul_layout_bwd", "gpc_io_layout_fwd", "gpc_io_layout_bwd",
    "mlp_tail_fwd", "mlp_tail_bwd", "rms_norm_fwd", "rms_norm_bwd", "norm_io_fwd",
    "norm_io_split_fwd", "norm_io_bwd", "norm_io_split_bwd", "bias_grad",
]

Grads = Tuple[Optional[torch.Tensor], ...]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32 for float16 / bfloat16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _acc(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _new(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    return outputs.new_output(shape, dtype, like.device)


def _finish(work: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``work`` (accumulation dtype) as a fresh ``dtype`` output: rounded once, or ``work`` itself."""
    if work.dtype == dtype:
        return work
    out = _new(work.shape, dtype, work)
    out.copy_(work)
    return out


def interleave_fwd(x: torch.Tensor, step: int) -> torch.Tensor:
    M, C = x.shape
    y = _new((M, C), x.dtype, x)
    y.view(M, C // step, step).copy_(x.view(M, step, C // step).transpose(1, 2))
    return y


# ------------------------------------------------------------------------------------------------
# Group views. ``t`` is 2-D ``[M, G*w]`` with any strides; views are ``[G, M, w]``.
# ------------------------------------------------------------------------------------------------


def _groups(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Group n is ``t[:, n*w:(n+1)*w]`` (a view)."""
    M, C = t.shape
    return t.view(M, groups, C // groups).transpose(0, 1)


def _products(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
              a2: Optional[torch.Tensor] = None, w2: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    """``a[n] @ w[n] (+ a2[n] @ w2[n]) (+ bias[n])`` for every group, as ``[G, M, og]``."""
    if bias is None:
        out = torch.bmm(a, w)
    else:
        out = torch.baddbmm(bias.unsqueeze(1), a, w)
    if a2 is not None:
        out.baddbmm_(a2, w2)
    return out


def _weight_grads(a: torch.Tensor, dy_groups: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a[n]^T @ dy_n`` for every group, as a fresh ``[G, s, og]`` output in ``dtype``."""
    G, M, s = a.shape
    og = dy_groups.shape[2]
    work = _new((G, s, og), a.dtype, a)
    _weight_grads_into(work, a, dy_groups, accumulate=False)
    return _finish(work, dtype)


def _weight_grads_into(work: torch.Tensor, a: torch.Tensor, dy_groups: torch.Tensor,
                       accumulate: bool) -> None:
    """``work (+)= a[n]^T @ dy_n``. One row is an outer product: a broadcast multiply writes it in
    about half the time of BLAS's batched GEMM with K = 1 (decode steps of training)."""
    at = a.transpose(1, 2)
    if a.shape[1] == 1:
        if accumulate:
            work.addcmul_(at, dy_groups)
        else:
            torch.mul(at, dy_groups, out=work)
    elif accumulate:
        work.baddbmm_(at, dy_groups)
    else:
        torch.bmm(at, dy_groups, out=work)


# Row blocks. Whole-M temporaries (an upcast or de-interleaved copy of x, a [G, M, w] product
# before its permute into the output) are tens of MB at M = 2048; glibc serves blocks of 32 MB
# and more with fresh mmaps, so every call page-faults them in, and they fall out of the
# last-level cache between passes. Past WHOLE_BYTES of temporaries the IO block runs in row
# blocks of BLOCK_BYTES, which are reused from the heap and stay in cache; below it one block
# (blocking a few MB only adds calls). Reductions over M (weight gradients) are chunked no finer
# than 4*og rows, so that re-reading the [G, s, og] accumulator costs at most about a quarter of
# the operand traffic.
WHOLE_BYTES = 24 << 20
BLOCK_BYTES = 8 << 20


def _row_block(M: int, row_bytes: int, at_least: int = 1) -> int:
    if M * row_bytes <= WHOLE_BYTES:
        return max(1, M)
    return max(1, min(M, max(at_least, BLOCK_BYTES // max(1, row_bytes))))


def _rows(t: torch.Tensor, start: int, count: int, dim: int = 0) -> torch.Tensor:
    """``count`` rows of ``t`` from ``start`` (``t`` itself when that is all of it): ``narrow``,
    several times cheaper per call than slicing, which matters at decode sizes."""
    if start == 0 and t.shape[dim] == count:
        return t
    return t.narrow(dim, start, count)


def _strided_groups_into(buf: torch.Tensor, t: torch.Tensor, groups: int) -> torch.Tensor:
    """Group n of ``t[:, n::groups]`` as ``[G, M, w]`` views of ``buf`` (``[>= M, G, w]``),
    cast to ``buf``'s dtype on the way."""
    M, C = t.shape
    out = _rows(buf, 0, M)
    out.copy_(t.view(M, C // groups, groups).transpose(1, 2))
    return out.transpose(0, 1)


def bias_grad(dy: torch.Tensor, groups: int) -> torch.Tensor:
    """``dy`` summed over rows as ``[G, og]``, accumulated in ``acc_dtype`` (both backends use
    this): float32 sums for float16 / bfloat16, float64 sums for float64."""
    db = _new((dy.shape[1],), dy.dtype, dy)
    db.copy_(dy.sum(0, dtype=acc_dtype(dy.dtype)))
    return db.view(groups, -1)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def grouped_linear_fwd(x, weight, bias=None):
    G, s, og = weight.shape
    M = x.shape[0]
    acc = acc_dtype(x.dtype)
    prod = _products(_groups(_acc(x, acc), G), _acc(weight, acc), _acc(bias, acc))
    y = _new((M, G * og), x.dtype, x)
    y.view(M, G, og).copy_(prod.transpose(0, 1))  # rounds once for half dtypes
    return y


def _input_grad(dy_groups: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy_n @ weight[n]^T`` for every group, as ``[G, M, s]``."""
    return torch.bmm(dy_groups, weight.transpose(1, 2))


def grouped_linear_bwd(dy, x, weight, need_dx=True, need_dw=True, need_db=False) -> Grads:
    return _linear_bwd_acc(_acc(dy, acc_dtype(dy.dtype)), x, weight, dy.dtype, need_dx, need_dw,
                           need_db)


# The IO block's forward as one GEMM of K = 2s: group n's operand is [x_n | x[:, n::G]] (one
# [rows, G, 2s] buffer) and its weight [W1[n]; W2[n]], concatenated per call. In fp32 / fp64 the
# GEMM then writes y in place (out= its strided [G, m, og] view), saving the output-sized copy
# out of a [G, m, og] buffer and the second GEMM's output-sized accumulate. It costs the concat
# (G*2s*og elements per call) and turns the batched GEMM into one threaded GEMM per group, so it
# runs only where both are small next to the copy: from M = 4s rows on (the copy, M*G*og, is
# then at least twice the concat) and for groups of at least JOINT_MIN_OG outputs (with fewer, G
# small GEMMs per row block cost more than the copy). Elsewhere, the two products are two batched
# GEMMs into the buffer (the decode path). Half dtypes follow the same rule; their products
# always go through the fp32 buffer, so that y is rounded once. The backward keeps two GEMMs per
# product: there the K = 2s form measured no faster.
JOINT_MIN_OG = 256


def _io_joint(M: int, s: int, og: int) -> bool:
    return M >= 4 * s and og >= JOINT_MIN_OG


def _joint_weights(weight1: torch.Tensor, weight2: torch.Tensor,
                   dtype: torch.dtype) -> torch.Tensor:
    """``[W1; W2]`` along dim 1, as one ``[G, 2s, og]`` tensor in ``dtype``."""
    G, s, og = weight1.shape
    w = weight1.new_empty((G, 2 * s, og), dtype=dtype)
    w[:, :s].copy_(weight1)
    w[:, s:].copy_(weight2)
    return w


def _joint_operand_into(buf: torch.Tensor, x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[x_n | x[:, n::G]]`` for every group as a ``[G, M, 2s]`` view of ``buf`` (``[>= M, G,
    2s]``), cast to ``buf``'s dtype on the way."""
    M, C = x.shape
    s = C // groups
    out = _rows(buf, 0, M)
    out[:, :, :s].copy_(x.view(M, groups, s))
    out[:, :, s:].copy_(x.view(M, s, groups).transpose(1, 2))
    return out.transpose(0, 1)


def io_saves_xi(save_xi: bool) -> bool:
    """Whether ``gpc_io_fwd(..., save_xi)`` returns the de-interleaved input: never here. Kept,
    it is one more activation the size of x, written to fresh memory by the forward, to spare
    the backward a de-interleave into a reused row-block buffer: forward plus backward measured
    no faster at G = 5 and about 20% slower at G = 20 (M = 2048, fp32)."""
    return False


def gpc_io_fwd(x, weight1, weight2, bias1=None, bias2=None, save_xi=False):
    """Returns ``(y, xi)`` like the Triton launcher; ``xi`` is always empty (``io_saves_xi``)."""
    G, s, og = weight1.shape
    M = x.shape[0]
    dtype = x.dtype
    acc = acc_dtype(dtype)
    half = acc != dtype
    joint = _io_joint(M, s, og)
    direct = joint and not half  # the GEMM writes y itself
    bias = _acc(bias1, acc)
    if bias2 is not None:
        bias = _acc(bias2, acc) if bias is None else bias + _acc(bias2, acc)
    bias = None if bias is None else bias.unsqueeze(1)
    y = _new((M, G * og), dtype, x)
    rows = _row_block(M, acc.itemsize * G * (2 * s + (0 if direct else og)))
    prod = None if direct else x.new_empty((G, rows, og), dtype=acc)
    if joint:
        w = _joint_weights(weight1, weight2, acc)
        buf = x.new_empty((rows, G, 2 * s), dtype=acc)
    else:
        w1, w2 = _acc(weight1, acc), _acc(weight2, acc)
        xa = x.new_empty((rows, G * s), dtype=acc) if half else None
        xi = x.new_empty((rows, G, s), dtype=acc)
    for r in range(0, M, rows):
        m = min(rows, M - r)
        xc = _rows(x, r, m)
        yc = _rows(y, r, m).view(m, G, og)
        p = yc.transpose(0, 1) if direct else _rows(prod, 0, m, dim=1)
        if joint:
            a, wa = _joint_operand_into(buf, xc, G), w
        else:
            if half:
                xc = _rows(xa, 0, m).copy_(xc)
            a, wa = _groups(xc, G), w1
        if bias is None:
            torch.bmm(a, wa, out=p)
        else:
            torch.baddbmm(bias, a, wa, out=p)
        if not joint:
            p.baddbmm_(_strided_groups_into(xi, xc, G), w2)
        if not direct:
            yc.copy_(p.transpose(0, 1))  # rounds once for half dtypes
    return y, x.new_empty(0)


def gpc_io_bwd(dy, x, xi, weight1, weight2, need_dx=True, need_dw1=True, need_dw2=True,
               need_db1=False, need_db2=False) -> Grads:
    """``xi``, when given (non-empty), is read for dW2 instead of re-making ``x[:, n::G]``."""
    G, s, og = weight1.shape
    M = x.shape[0]
    dtype = dy.dtype
    acc = acc_dtype(dtype)
    elem = acc.itemsize
    half = acc != dtype
    xi = xi if xi.numel() else None
    dx = dw1 = dw2 = db = None
    if need_dx:
        dx = _new((M, G * s), dtype, dy)
        w1t, w2t = _acc(weight1, acc).transpose(1, 2), _acc(weight2, acc).transpose(1, 2)
        rows = _row_block(M, elem * G * (og + 2 * s))
        dya = dy.new_empty((rows, G * og), dtype=acc) if half else None
        term = dy.new_empty((G, rows, s), dtype=acc)
        work = dy.new_empty((rows, G * s), dtype=acc) if half else None
        for r in range(0, M, rows):
            m = min(rows, M - r)
            dyc = _rows(dy, r, m)
            if half:
                dyc = _rows(dya, 0, m).copy_(dyc)
            out = _rows(work, 0, m) if half else _rows(dx, r, m)
            t = _rows(term, 0, m, dim=1)
            torch.bmm(_groups(dyc, G), w1t, out=t)
            out.view(m, G, s).copy_(t.transpose(0, 1))
            # the interleaved term: group n of the second GEMM reads x[:, n::G]; both terms are
            # summed in the accumulation dtype and rounded once, by this add
            torch.bmm(_groups(dyc, G), w2t, out=t)
            torch.add(out.view(m, s, G), t.permute(1, 2, 0), out=_rows(dx, r, m).view(m, s, G))
    if need_dw1 or need_dw2:
        rows = _row_block(M, elem * G * (2 * s + og), at_least=4 * og)
        g1 = _new((G, s, og), acc, dy) if need_dw1 else None
        g2 = _new((G, s, og), acc, dy) if need_dw2 else None
        xa = x.new_empty((rows, G * s), dtype=acc) if half and need_dw1 else None
        dya = dy.new_empty((rows, G * og), dtype=acc) if half else None
        xib = (x.new_empty((rows, G * s), dtype=acc)
               if need_dw2 and (xi is None or half) else None)
        for i, r in enumerate(range(0, max(M, 1), rows)):
            m = min(rows, M - r)
            xc, dyc = _rows(x, r, m), _rows(dy, r, m)
            if half:
                dyc = _rows(dya, 0, m).copy_(dyc)
            dy_groups = _groups(dyc, G)
            if need_dw1:
                a = _groups(_rows(xa, 0, m).copy_(xc) if half else xc, G)
                _weight_grads_into(g1, a, dy_groups, accumulate=i > 0)
            if need_dw2:
                if xi is None:
                    a = _strided_groups_into(_rows(xib, 0, m).view(m, G, s), xc, G)
                else:
                    xic = _rows(xi, r, m)
                    a = _groups(_rows(xib, 0, m).copy_(xic) if half else xic, G)
                _weight_grads_into(g2, a, dy_groups, accumulate=i > 0)
        dw1 = None if g1 is None else _finish(g1, weight1.dtype)
        dw2 = None if g2 is None else _finish(g2, weight2.dtype)
    if need_db1 or need_db2:
        db = bias_grad(dy, G)
    return dx, dw1, dw2, db if need_db1 else None, db if need_db2 else None


def gpc_block_fwd(x, weight1, weight2=None, bias1=None, bias2=None):
    G, s, og = weight1.shape
    M = x.shape[0]
    C = G * og
    dtype = x.dtype
    acc = acc_dtype(dtype)
    first = _products(_groups(_acc(x, acc), G), _acc(weight1, acc), _acc(bias1, acc))
    # h = interleave(first(x), og), from first(x) in natural column order
    natural = first.transpose(0, 1).reshape(M, C)
    h = _new((M, C), dtype, x)
    h.view(M, G, og).copy_(natural.view(M, og, G).transpose(1, 2))  # rounds once for half dtypes
    if weight2 is None:
        return h, h
    residual = first.transpose(0, 1)  # first(x) as [M, G, og]
    ha = h
    if dtype != acc:  # the second GEMM and the residual read the rounded h, like the kernel
        ha = h.to(acc)
        residual = interleave_fwd(ha, G).view(M, G, og)
    second = _products(_groups(ha, G), _acc(weight2, acc), _acc(bias2, acc))
    y = _new((M, C), dtype, x)
    # y = second(h) + first(x) (the residual, back in natural order): one pass, one rounding
    torch.add(second.transpose(0, 1), residual, out=y.view(M, G, og))
    return y, h


def gpc_block_bwd(dy, x, h, weight1, weight2=None, need_dx=True, need_dw1=True, need_dw2=True,
                  need_db1=False, need_db2=False) -> Grads:
    G, s, og = weight1.shape
    M = x.shape[0]
    C = G * og
    dtype = dy.dtype
    acc = acc_dtype(dtype)
    dya = _acc(dy, acc)
    dw2 = db2 = None
    if weight2 is None:
        # y = interleave(first(x), og); its inverse is the interleave with step G
        dh = interleave_fwd(dya, G)
    else:
        dy_groups = _groups(dya, G)
        if need_dw2:
            dw2 = _weight_grads(_groups(_acc(h, acc), G), dy_groups, weight2.dtype)
        if need_db2:
            db2 = bias_grad(dy, G)
        # d first(x) = dy + interleave(dy @ W2^T, G), kept in the accumulation dtype
        # (dy @ W2^T) is [G, M, og] in h's order; interleave(., G) of it, viewed as [M, og, G],
        # is its permute(1, 2, 0)
        d_h = _input_grad(dy_groups, _acc(weight2, acc))
        dh = _new((M, C), acc, dy)
        torch.add(d_h.permute(1, 2, 0), dya.view(M, og, G), out=dh.view(M, og, G))
    dx, dw1, db1 = _linear_bwd_acc(dh, x, weight1, dtype, need_dx, need_dw1, need_db1)
    return dx, dw1, dw2, db1, db2


def _linear_bwd_acc(dh, x, weight1, dtype, need_dx, need_dw1, need_db1) -> Grads:
    """``grouped_linear_bwd`` for an upstream gradient ``dh`` already in the accumulation dtype
    (the non-IO block's d first(x) arrives so); the gradients are rounded to ``dtype`` once."""
    G, s, og = weight1.shape
    M = x.shape[0]
    acc = dh.dtype
    dh_groups = _groups(dh, G)
    dx = dw1 = db1 = None
    if need_dx:
        dx = _new((M, G * s), dtype, dh)
        dx.view(M, G, s).copy_(_input_grad(dh_groups, _acc(weight1, acc)).transpose(0, 1))
    if need_dw1:
        dw1 = _weight_grads(_groups(_acc(x, acc), G), dh_groups, weight1.dtype)
    if need_db1:
        db1 = _new((G * og,), dtype, dh)
        db1.copy_(dh.sum(0))
        db1 = db1.view(G, og)
    return dx, dw1, db1


# ------------------------------------------------------------------------------------------------
# The fused decoder's launchers (``ops/fused_ops.py``): the Triton launchers' names and signatures
# ------------------------------------------------------------------------------------------------


def _slots(channels: int, groups: int, run: int, device) -> torch.Tensor:
    # pad = run gives R = run for every run >= ceil(s / G), the only runs a layout has
    return residue_slots(channels, groups, run, device=device)


def _to_layout(x: torch.Tensor, groups: int, run: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` ``[M, C]`` in the block-residue layout ``[M, G*G*R]`` (padding zero), in ``dtype``."""
    M, C = x.shape
    t = _new((M, groups * groups * run), dtype, x)
    t.zero_()
    t.index_copy_(1, _slots(C, groups, run, x.device), x.to(dtype))
    return t


def _from_layout(t: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """The channels of a layout ``[M, G*G*R]`` (the padding is never read)."""
    run = t.shape[1] // (groups * groups)
    return t.index_select(1, _slots(channels, groups, run, t.device))


def _io_input_grad(dy: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor) -> torch.Tensor:
    """The IO block's input gradient in channel order, in the accumulation dtype (not rounded):
    ``dy_b W1[b]^T`` at block ``b``'s channels plus ``dy_n W2[n]^T`` at channels ``n::G``."""
    G, s, og = weight1.shape
    M = dy.shape[0]
    acc = acc_dtype(dy.dtype)
    dy_groups = _groups(_acc(dy, acc), G)
    dx = _input_grad(dy_groups, _acc(weight1, acc)).transpose(0, 1).reshape(M, G * s)
    dx.view(M, s, G).add_(_input_grad(dy_groups, _acc(weight2, acc)).permute(1, 2, 0))
    return dx


def silu_mul_layout_fwd(gu: torch.Tensor, groups: int, run: int) -> torch.Tensor:
    """``up * silu(gate)`` of ``gu = [gate | up]`` in the layout, computed in the accumulation
    dtype in torch's order (``silu`` first, then the product) and rounded once."""
    acc = acc_dtype(gu.dtype)
    gate, up = _acc(gu, acc).chunk(2, dim=1)
    return _to_layout(up * torch.nn.functional.silu(gate), groups, run, gu.dtype)


def _silu_mul_grads(dh: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    """``[d gate | d up]`` (rounded once to gu's dtype) from ``dh`` in the accumulation dtype,
    as autograd forms them: ``d up = dh * silu(gate)``, ``d gate = silu'(gate) of (dh * up)``."""
    acc = dh.dtype
    gate, up = _acc(gu, acc).chunk(2, dim=1)
    M, C = dh.shape
    dgu = _new((M, 2 * C), gu.dtype, gu)
    dgu[:, :C].copy_(torch.ops.aten.silu_backward(dh * up, gate))
    dgu[:, C:].copy_(dh * torch.nn.functional.silu(gate))
    return dgu


def silu_mul_layout_bwd(dt: torch.Tensor, gu: torch.Tensor, groups: int) -> torch.Tensor:
    """``dgu = [dgate | dup]`` from the layout's gradient ``dt`` (its padding is never read)."""
    dh = _acc(_from_layout(dt, groups, gu.shape[1] // 2), acc_dtype(gu.dtype))
    return _silu_mul_grads(dh, gu)


def _io_layout_acc(t, weight1, weight2, bias1, bias2) -> torch.Tensor:
    """The IO block of a layout, ``[M, G*og]`` in the accumulation dtype (not rounded)."""
    G, s, _ = weight1.shape
    acc = acc_dtype(t.dtype)
    x = _acc(_from_layout(t, G, G * s), acc)
    y, _ = gpc_io_fwd(x, _acc(weight1, acc), _acc(weight2, acc), _acc(bias1, acc),
                      _acc(bias2, acc))
    return y


def gpc_io_layout_fwd(t, weight1, weight2, bias1=None, bias2=None, residual=None
                      ) -> torch.Tensor:
    """``y`` ``[M, G*og]`` of the IO block from its input ``t`` in the layout, plus ``residual``
    where given (added before the one rounding; ``y`` then in the promoted dtype of the two)."""
    out_dtype = t.dtype if residual is None else torch.promote_types(t.dtype, residual.dtype)
    y = _io_layout_acc(t, weight1, weight2, bias1, bias2)
    if residual is not None:
        y = y + residual  # in the accumulation dtype (or the residual's, if wider)
    return _finish(y, out_dtype)


def gpc_io_layout_bwd(dy, t, weight1, weight2, need_dt=True, need_dw1=True, need_dw2=True):
    """``(dt, dW1, dW2)`` (None where not asked): ``dt`` in the layout (padding zero), in dy's
    dtype, both of its terms summed before the one rounding."""
    G, s, _ = weight1.shape
    dt = dw1 = dw2 = None
    if need_dt:
        dt = _to_layout(_io_input_grad(dy, weight1, weight2), G, t.shape[1] // (G * G), dy.dtype)
    if need_dw1 or need_dw2:
        x = _from_layout(t, G, G * s)
        _, dw1, dw2, _, _ = gpc_io_bwd(dy, x, x.new_empty(0), weight1, weight2, False, need_dw1,
                                       need_dw2)
    return dt, dw1, dw2


def mlp_tail_fwd(gate_up, weight1, weight2, bias1=None, bias2=None, run: int = 8,
                 residual=None, t=None):
    """``(y, t)``: down_proj's output (plus ``residual`` where given) and its input
    ``up * silu(gate)`` in the layout (``t`` given: that one)."""
    if t is None:
        t = silu_mul_layout_fwd(gate_up, weight1.shape[0], run)
    return gpc_io_layout_fwd(t, weight1, weight2, bias1, bias2, residual), t


def mlp_tail_bwd(dy, gate_up, t, weight1, weight2, need_dgu=True, need_dw1=True, need_dw2=True):
    """``(d gate_up, dW1, dW2)``, None where not asked: the block's input gradient stays in the
    accumulation dtype into the activation's backward (never rounded)."""
    dgu = _silu_mul_grads(_io_input_grad(dy, weight1, weight2), gate_up) if need_dgu else None
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dgu, dw1, dw2


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: Optional[torch.Tensor] = None, *, split_groups: int = 0,
                 layout: Optional[Tuple[int, int]] = None, out_dtype=None):
    """``(h, n, rstd, extra)`` as ``rowwise.rms_norm_fwd``: ``h = residual + x`` as ``+``
    rounds it (None without a residual), ``n = weight * (x * rstd).to(dtype)`` (Phi-3's
    RMSNorm of ``h`` or ``x``, then in ``out_dtype``; None where ``layout`` is given), ``rstd``
    ``[M]`` in fp32 (float64 for float64), ``extra`` the de-interleaved copy of ``n``
    (``split_groups``) or ``n`` in the block-residue layout (``layout = (G, R)``)."""
    M, channels = x.shape
    h = None
    if residual is not None:
        h = _new((M, channels), torch.promote_types(residual.dtype, x.dtype), x)
        torch.add(residual, x, out=h)
    source = h if h is not None else x
    stat = torch.float64 if source.dtype == torch.float64 else torch.float32
    s32 = source.to(stat)
    rstd = _new((M,), stat, x)
    torch.rsqrt(s32.pow(2).mean(-1) + eps, out=rstd)
    normal = weight * (s32 * rstd.unsqueeze(1)).to(source.dtype)
    out_dtype = out_dtype or normal.dtype
    n = extra = None
    if layout is not None:
        extra = _to_layout(normal, layout[0], layout[1], out_dtype)
    else:
        n = _finish(normal, out_dtype)
        if split_groups:
            extra = interleave_fwd(n, channels // split_groups)
    return h, n, rstd, extra


def rms_norm_bwd(dn: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                 need_dx: bool = True, need_dw: bool = True, dh: Optional[torch.Tensor] = None):
    """``(dx, dweight)`` (None where not asked) from ``dn``, the gradient of the normalized
    input, in the accumulation dtype of ``x``: ``dx = rstd * (g - xhat * mean(g * xhat)) (+ dh)``
    with ``g = dn * weight``, ``dweight = sum over rows of dn * xhat``; each rounded once."""
    acc = acc_dtype(x.dtype)
    xhat = _acc(x, acc) * _acc(rstd, acc).unsqueeze(1)
    dna = _acc(dn, acc)
    dx = dw = None
    if need_dx:
        g = dna * _acc(weight, acc)
        work = _acc(rstd, acc).unsqueeze(1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        if dh is not None:
            work = work + _acc(dh, acc)
        dx = _finish(work, x.dtype)
    if need_dw:
        dw = _finish((dna * xhat).sum(0), weight.dtype)
    return dx, dw


def _activation_of(y, act):
    """``up * silu(gate)`` of ``y = [gate | up]`` in the layout ``act = (groups, run)``, or None."""
    return silu_mul_layout_fwd(y, *act) if act is not None else None


def norm_io_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                run: int = 8, residual=None, act=None):
    """``(y, h, t, rstd, a)``: the IO block of the norm, the norm written in the layout, and
    for ``act = (groups, run)`` the activation of ``y`` in that layout."""
    h, _, rstd, t = rms_norm_fwd(x, norm_weight, eps, residual, layout=(weight1.shape[0], run),
                                 out_dtype=weight1.dtype)
    y = gpc_io_layout_fwd(t, weight1, weight2, bias1, bias2)
    return y, h, t, rstd, _activation_of(y, act)


def norm_io_split_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                      residual=None, act=None):
    """``(y, h, n, xi, rstd, a)``: the IO block of the norm ``n`` and its de-interleaved copy
    (and the activation, as ``norm_io_fwd``)."""
    h, n, rstd, xi = rms_norm_fwd(x, norm_weight, eps, residual, split_groups=weight1.shape[0],
                                  out_dtype=weight1.dtype)
    y, _ = gpc_io_fwd(n, weight1, weight2, bias1, bias2)
    return y, h, n, xi, rstd, _activation_of(y, act)


def _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh):
    if not (need_dx or need_dnorm):
        return None, None
    return rms_norm_bwd(_io_input_grad(dy, weight1, weight2), x, norm_weight, rstd, need_dx,
                        need_dnorm, dh)


def norm_io_bwd(dy, x, norm_weight, rstd, t, weight1, weight2, need_dx=True, need_dnorm=True,
                need_dw1=True, need_dw2=True, dh=None):
    """``(dx, d norm_weight, dW1, dW2)``, None where not asked; ``x`` is the norm's input."""
    dx, dnorm = _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh)
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2


def norm_io_split_bwd(dy, x, norm_weight, rstd, n, xi, weight1, weight2, need_dx=True,
                      need_dnorm=True, need_dw1=True, need_dw2=True, dh=None):
    """``norm_io_bwd`` of the split head: the weight gradients from ``n`` and ``xi``."""
    dx, dnorm = _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh)
    _, dw1, dw2, _, _ = gpc_io_bwd(dy, n, xi, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2
