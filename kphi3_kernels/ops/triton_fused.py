"""The Triton launchers of the fused decoder's operators, under the names ``fused_ops.py``'s bodies
call (``torch_impl.py`` has the same names and signatures in PyTorch), as ``triton_impl.py`` is
for the op-level operators. Every matrix product here is a launch of the one grouped GEMM
(``grouped_gemm.py``), every elementwise producer one of ``rowwise.py``.

**The IO block on the block-residue layout** (``gpc_io_layout_fwd`` / ``gpc_io_layout_bwd``):
launches of the one grouped GEMM through its layout views.

The input ``t`` is ``[M, G*G*R]``: channel ``c`` of ``x`` at slot ``(b, n, r)`` with ``b = c // s``,
``n = c % G``, ``r = (c % s) // G``, every ``(b, n)`` run padded with zeros to ``R`` elements
(``R`` a multiple of 8). Group ``g``'s operand of ``first`` is block ``g``, one span of ``G*R``
elements; of ``second``, residue ``g``, G runs of ``R`` elements ``G*R`` apart. Both are read
with unit-stride 16-byte accesses. The weights stay in their ``[G, s, og]`` parameter layout:
the view maps a layout index ``j`` of group ``g`` to the weight row of its channel
(``slots.operand_weight_row``) and masks the padding slots.

The launches:

* ``gpc_io_layout_fwd`` (K view): ``y_g = t[block g] @ W1[g] + t[residue g] @ W2[g] (+ biases)``,
  one pipelined K loop of ``2*G*R`` steps on one fp32 accumulator; optionally ``+ residual`` in
  the epilogue (the decoder's residual add after down_proj, no pass of its own).
* ``gpc_io_layout_bwd_dt_second`` then ``gpc_io_layout_bwd_dt`` (Q view): the gradient of ``t``,
  in the layout. The first writes every slot of every residue (``dy_n @ W2[n]^T``, zeros at
  padding); the second adds ``dy_b @ W1[b]^T`` to every slot of every block in place. Each slot
  is read and written by one program of each launch, with 16-byte accesses: what the plain-order
  backward does with a gather of the interleaved term is here two contiguous passes of one tensor.
* ``gpc_io_layout_bwd_dw`` (P view): ``dW1[b] = t[block b]^T dy_b`` and ``dW2[n] = t[residue n]^T
  dy_n`` in one paired launch over 2G groups (each reads ``dy`` and ``t`` once), rows stored at
  their channels' weight rows, padding rows skipped.

**The MLP tail** (``mlp_tail_fwd`` / ``mlp_tail_bwd``): ``down_proj(up * silu(gate))`` from
``gate_up``'s output.

Forward, two launches: ``silu_mul_layout`` writes ``h = up * silu(gate)`` in the block-residue
layout of down_proj's IO block (``rowwise.py``), ``gpc_io_layout_fwd`` reads it for both
products and, where given, adds the decoder's residual stream in its epilogue (the residual add
has no launch of its own). ``t`` (the layout) is returned for the backward's weight gradients,
as the op-level IO block returns its de-interleaved input. Given ``t`` (what gate_up_proj's
norm head wrote with ``act``, below), one launch: the activation pass is not run.

Backward, two launches, no pass of the activation of its own:

* ``mlp_tail_bwd_dgate_up`` (D view): a program takes a tile of block b's slots, as the Q view
  does, and sums both products of each slot's channel ``c`` in one fp32 accumulator:
  ``dy_b @ W1[b]^T`` (one product) and ``dy_n @ W2[n]^T`` for each residue n the tile meets
  (about ``BLOCK_Q / R`` of them, W2's columns masked to n's slots: that term's MMA work is
  that many times its FLOPs, small beside the bytes at down_proj's ``og``). Its epilogue turns
  ``dh`` into ``d(gate)`` and ``d(up)`` with the saved ``gate_up``, read and written at the
  slots' channels. Neither ``dh`` nor the W2 term is ever written: the op-level path's ``dxi``
  round trip (written, then read gathered) is gone.
* ``gpc_io_layout_bwd_dw``: ``dW1`` and ``dW2`` from the saved layout, one paired launch.

**The norm heads** (``norm_io_*``): an IO block (qkv_proj, gate_up_proj) of ``RMSNorm(x)``, or
of ``RMSNorm(h)`` with ``h = residual + x`` (the attention's residual add before
post_attention_layernorm), the norm writing the block's input as its GEMMs read it.

Two ways to write it, by the block-residue layout's padding (``kphi3_kernels.fused.layout_padding``):

* **layout** (``norm_io_*``): the norm writes the block-residue layout ``t``, one tensor both
  products read with 16-byte loads (``gpc_io_layout_fwd``). Best where it adds no channel.
* **split** (``norm_io_split_*``): the norm writes ``n`` in channel order and its
  de-interleaved copy ``xi`` (group g is ``n[:, g::G]``), the op-level IO GEMM reads both
  (``triton_impl.gpc_io_fwd_split``): no padding, and no de-interleave pass of the block's own.

Forward, two launches: the norm (``rms_norm_layout`` / ``rms_norm_split``, ``add_`` before the
name with a residual, ``rowwise.py``), then the block. ``h``, the layout (or ``n`` and
``xi``) and the fp32 ``rstd`` are returned for the backward. With ``act = (G, R)``
(gate_up_proj's head, ``y = [gate | up]``), the block's launch (``*_act_layout``) also writes
``up * silu(gate)`` in the layout of down_proj's G groups, runs of R: its programs walk the gate
half's tiles, and each runs a second K loop for the up tile of the same channels (another
group) before storing the activation of the two at the layout's slots (``grouped_gemm``'s
``ActivationLayout``). Where no tile fits that split (``activation_layout_fits``), the
activation pass runs after the block instead.

Backward, four launches (and the torch sum of the norm weight's partial gradients):

* ``norm_io_bwd_dxi``: ``dxi_n = dy_n @ W2[n]^T`` (in dy's dtype), group n contiguous.
* ``norm_io_bwd_dxn``: ``dn = dy_b @ W1[b]^T`` plus ``dxi`` gathered at its interleaved channels
  (the op-level ``gpc_io_bwd_dx``): the gradient of the normalized input, in channel order.
* the weight gradients, one paired launch (``gpc_io_layout_bwd_dw`` from the layout,
  ``gpc_io_bwd_dw`` from ``n`` and ``xi``).
* ``rms_norm_bwd``: ``dx`` and the norm weight's gradient from ``dn``; with a residual, the
  residual stream's own gradient ``dh`` is added in the same pass.

The norm's backward needs a sum over every channel of a row, which no GEMM tile holds, so it
stays a pass of its own (the op-level path has the same pass).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import outputs
from .grouped_gemm import (VIEW_D, VIEW_K, VIEW_P, VIEW_Q, ActivationLayout, LayoutView, Operand,
                           activation_layout_fits, grouped_gemm)
from .rowwise import rms_norm_bwd, rms_norm_fwd, silu_mul_layout_bwd, silu_mul_layout_fwd
from .torch_impl import bias_grad
from .triton_impl import (_groups_of, _weight, _weight_t, gpc_io_bwd, gpc_io_fwd_split,
                          io_input_grad)

__all__ = [
    "silu_mul_layout_fwd", "silu_mul_layout_bwd", "gpc_io_layout_fwd", "gpc_io_layout_bwd",
    "mlp_tail_fwd", "mlp_tail_bwd", "rms_norm_fwd", "rms_norm_bwd", "norm_io_fwd",
    "norm_io_split_fwd", "norm_io_bwd", "norm_io_split_bwd", "bias_grad",
]


# --------------------------------------------------------------------------------------------
# The IO block on the block-residue layout
# --------------------------------------------------------------------------------------------


def _geometry(t: torch.Tensor, weight1: torch.Tensor) -> Tuple[int, int, int, int]:
    """``(G, s, og, R)`` of a layout input and its block's weights."""
    G, s, og = weight1.shape
    return G, s, og, t.shape[1] // (G * G)


def gpc_io_layout_fwd(t, weight1, weight2, bias1=None, bias2=None, residual=None
                      ) -> torch.Tensor:
    """``y`` ``[M, G*og]`` of the IO block from its input ``t`` in the layout (contiguous),
    plus ``residual`` ``[M, G*og]`` where given (added to the fp32 accumulator; ``y`` then in
    the promoted dtype of the two)."""
    return _layout_fwd(t, weight1, weight2, bias1, bias2, residual)


def _layout_fwd(t, weight1, weight2, bias1=None, bias2=None, residual=None, act_layout=None,
                name="gpc_io_layout_fwd") -> torch.Tensor:
    """``gpc_io_layout_fwd``; ``act_layout`` (``grouped_gemm``'s): the epilogue also writes
    ``up * silu(gate)`` of ``y`` into that layout."""
    M = t.shape[0]
    G, s, og, R = _geometry(t, weight1)
    weight1, weight2 = weight1.contiguous(), weight2.contiguous()
    out_dtype = t.dtype if residual is None else torch.promote_types(t.dtype, residual.dtype)
    y = outputs.new_output((M, G * og), out_dtype, t.device)
    # Both products read t (no group stride: the view's slot names the group) in one K loop.
    layout = Operand(t, 0, t.stride(0), 1)
    grouped_gemm(G, M, og, layout, _weight(weight1), G * R, _groups_of(y, og),
                 a2=layout, b2=_weight(weight2), K2=G * R, bias=bias1, bias2=bias2,
                 residual=_groups_of(residual, og) if residual is not None else None,
                 act_layout=act_layout, view=LayoutView(VIEW_K, G, R, s), name=name)
    return y


def _with_activation(block, weight1, M: int, device, act: Optional[Tuple[int, int]]):
    """``(y, t)``: ``y = block(act_layout, name)`` of a forward launcher (``_layout_fwd``,
    ``gpc_io_fwd_split``), and, for ``act = (groups, run)``, ``t = up * silu(gate)`` of
    ``y = [gate | up]`` in the block-residue layout of the block it feeds: written by the
    launch's epilogue (launch ``name`` with ``_act_layout``) where ``activation_layout_fits``,
    else by ``silu_mul_layout`` after it (None without ``act``)."""
    G, _, og = weight1.shape
    if act is None or not activation_layout_fits(G, og, *act):
        y = block(None, "")
        return y, (silu_mul_layout_fwd(y, *act) if act is not None else None)
    groups, run = act
    t = outputs.new_output((M, groups * groups * run), weight1.dtype, device)
    return block(ActivationLayout(t, groups, run), "_act_layout"), t


def _dt_launch(dy, weight, dt, R: int, second: bool, name: str) -> None:
    M = dy.shape[0]
    G, s, og = weight.shape
    out = Operand(dt, 0, dt.stride(0), 1)
    # B = W^T: its rows run over og (W's column stride), its columns over the weight rows.
    grouped_gemm(G, M, G * R, _groups_of(dy, og), _weight_t(weight), og, out,
                 # The second launch adds its term to the first's: an fp32 sum, one rounding.
                 residual=None if second else out,
                 view=LayoutView(VIEW_Q, G, R, s, second), name=name)


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
    if need_dw1 or need_dw2:
        dw1 = outputs.new_output((G, s, og), weight1.dtype, weight1.device) if need_dw1 else None
        dw2 = outputs.new_output((G, s, og), weight2.dtype, weight2.device) if need_dw2 else None
        # Rows of a weight no slot maps to do not exist (each row is one channel), so every
        # row is written; with no rows of input the gradient is zero.
        if M == 0:
            for dw in (dw1, dw2):
                if dw is not None:
                    dw.zero_()
        elif og:
            t_cols = Operand(t, 0, 1, t.stride(0))  # A = t^T: rows are slots, K runs over M
            rows_of_dy = _groups_of(dy, og)
            first = _weight(dw1 if dw1 is not None else dw2)
            both = dw1 is not None and dw2 is not None
            grouped_gemm(G, G * R, og, t_cols, rows_of_dy, M, first,
                         a2=t_cols if both else None, b2=rows_of_dy if both else None,
                         K2=M if both else 0, c2=_weight(dw2) if both else None,
                         view=LayoutView(VIEW_P, G, R, s, second=dw1 is None),
                         weight_grad=True, name="gpc_io_layout_bwd_dw")
    return dt, dw1, dw2


# --------------------------------------------------------------------------------------------
# The MLP tail
# --------------------------------------------------------------------------------------------


def mlp_tail_fwd(gate_up, weight1, weight2, bias1=None, bias2=None, run: int = 8,
                 residual=None, t=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(y, t)``: down_proj's output (plus ``residual`` where given: the decoder's residual
    add, in down_proj's epilogue) and its input ``up * silu(gate)`` in the layout; ``t``
    given (what gate_up_proj's launch wrote, ``norm_io_*_fwd(act=...)``): no activation pass."""
    if t is None:
        t = silu_mul_layout_fwd(gate_up, weight1.shape[0], run)
    return gpc_io_layout_fwd(t, weight1, weight2, bias1, bias2, residual), t


def _dgate_up(dy, gate_up, weight1, weight2, R: int) -> torch.Tensor:
    """``d gate_up`` ``[M, 2*G*s]`` in dy's dtype: one D-view launch over block b's slots sums
    ``dy_b @ W1[b]^T`` and, per residue its tile meets, ``dy_n @ W2[n]^T``, and turns that
    ``dh`` into d(gate) and d(up) at the slots' channels in its epilogue."""
    M = dy.shape[0]
    G, s, og = weight1.shape
    dgu = outputs.new_output((M, 2 * G * s), dy.dtype, dy.device)
    w1_t, w2_t = (_weight_t(w.contiguous()) for w in (weight1, weight2))
    rows_of_dy = _groups_of(dy, og)
    grouped_gemm(G, M, G * R, rows_of_dy, w1_t, og, Operand(dgu, 0, dgu.stride(0), dgu.stride(1)),
                 a2=rows_of_dy, b2=w2_t, act_grad=(gate_up, G * s),
                 view=LayoutView(VIEW_D, G, R, s), name="mlp_tail_bwd_dgate_up")
    return dgu


def mlp_tail_bwd(dy, gate_up, t, weight1, weight2, need_dgu=True, need_dw1=True,
                 need_dw2=True) -> Tuple[Optional[torch.Tensor], ...]:
    """``(d gate_up, dW1, dW2)``, None where not asked."""
    G, s, og, R = _geometry(t, weight1)
    dgu = _dgate_up(dy, gate_up, weight1, weight2, R) if need_dgu else None
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dgu, dw1, dw2


# --------------------------------------------------------------------------------------------
# The norm heads
# --------------------------------------------------------------------------------------------


_DX_NAMES = ("norm_io_bwd_dxi", "norm_io_bwd_dxn")


def norm_io_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                run: int = 8, residual=None, act=None) -> Tuple[torch.Tensor, ...]:
    """``(y, h, t, rstd, a)``: the IO block's output, ``residual + x`` (None without a
    residual), the normalized input in the layout, the norm's saved reciprocal RMS, and for
    ``act = (groups, run)`` (gate_up_proj's head) ``up * silu(gate)`` of ``y`` in the layout
    of down_proj (``_with_activation``; else None). ``x`` (and ``residual``) and
    ``norm_weight`` may be wider than the block's weights (fp32 under autocast): the norm reads
    them as they are and writes ``t`` in the weights' dtype."""
    h, _, rstd, t = rms_norm_fwd(x, norm_weight, eps, residual,
                                 layout=(weight1.shape[0], run), out_dtype=weight1.dtype)
    y, a = _with_activation(
        lambda act_layout, suffix: _layout_fwd(
            t, weight1, weight2, bias1, bias2, act_layout=act_layout,
            name="gpc_io_layout_fwd" + suffix), weight1, t.shape[0], t.device, act)
    return y, h, t, rstd, a


def norm_io_split_fwd(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                      residual=None, act=None) -> Tuple[torch.Tensor, ...]:
    """``(y, h, n, xi, rstd, a)``: as ``norm_io_fwd``, the normalized input as ``n`` (channel
    order) and ``xi`` (de-interleaved) instead of the layout."""
    h, n, rstd, xi = rms_norm_fwd(x, norm_weight, eps, residual, split_groups=weight1.shape[0],
                                  out_dtype=weight1.dtype)
    y, a = _with_activation(
        lambda act_layout, suffix: gpc_io_fwd_split(
            n, xi, weight1, weight2, bias1, bias2, act_layout=act_layout,
            name="gpc_io_fwd" + suffix), weight1, n.shape[0], n.device, act)
    return y, h, n, xi, rstd, a


def norm_io_bwd(dy, x, norm_weight, rstd, t, weight1, weight2, need_dx=True, need_dnorm=True,
                need_dw1=True, need_dw2=True, dh=None) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, d norm_weight, dW1, dW2)``, None where not asked; ``x`` is the norm's input
    (``h`` with a residual, whose gradient ``dh`` is then added to ``dx``)."""
    dx, dnorm = _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh)
    _, dw1, dw2 = gpc_io_layout_bwd(dy, t, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2


def norm_io_split_bwd(dy, x, norm_weight, rstd, n, xi, weight1, weight2, need_dx=True,
                      need_dnorm=True, need_dw1=True, need_dw2=True, dh=None
                      ) -> Tuple[Optional[torch.Tensor], ...]:
    """``norm_io_bwd`` of the split head: the weight gradients from ``n`` and ``xi``."""
    dx, dnorm = _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh)
    _, dw1, dw2, _, _ = gpc_io_bwd(dy, n, xi, weight1, weight2, False, need_dw1, need_dw2)
    return dx, dnorm, dw1, dw2


def _norm_grads(dy, x, norm_weight, rstd, weight1, weight2, need_dx, need_dnorm, dh):
    if not (need_dx or need_dnorm):
        return None, None
    dn = io_input_grad(dy, weight1, weight2, _DX_NAMES)
    return rms_norm_bwd(dn, x, norm_weight, rstd, need_dx, need_dnorm, dh)
