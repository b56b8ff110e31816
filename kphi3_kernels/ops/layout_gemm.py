"""The IO block's GEMMs on an input in the block-residue layout (``kphi3_kernels.layout``): launches
of the one grouped GEMM (``grouped_gemm.py``) through its layout views.

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
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import outputs
from .grouped_gemm import VIEW_K, VIEW_P, VIEW_Q, LayoutView, Operand, grouped_gemm


def _geometry(t: torch.Tensor, weight1: torch.Tensor) -> Tuple[int, int, int, int]:
    """``(G, s, og, R)`` of a layout input and its block's weights."""
    G, s, og = weight1.shape
    return G, s, og, t.shape[1] // (G * G)


def _weight(w: torch.Tensor) -> Operand:
    return Operand(w, *w.stride())


def _channels_of(t: torch.Tensor, G: int, og: int) -> Operand:
    """``t[:, g*og + q]`` as group ``g``'s ``[M, og]`` operand."""
    return Operand(t, og * t.stride(1), t.stride(0), t.stride(1))


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
    # Both products read t (no group stride: the view's slot names the group) in one K loop.
    layout = Operand(t, 0, t.stride(0), 1)
    grouped_gemm(G, M, og, layout, _weight(weight1), G * R, _channels_of(y, G, og),
                 a2=layout, b2=_weight(weight2), K2=G * R, bias=bias1, bias2=bias2,
                 residual=_channels_of(residual, G, og) if residual is not None else None,
                 view=LayoutView(VIEW_K, G, R, s), name="gpc_io_layout_fwd")
    return y


def _dt_launch(dy, weight, dt, R: int, second: bool, name: str) -> None:
    M = dy.shape[0]
    G, s, og = weight.shape
    # B = W^T: its rows run over og (W's column stride), its columns over the weight rows.
    w_t = Operand(weight, weight.stride(0), weight.stride(2), weight.stride(1))
    out = Operand(dt, 0, dt.stride(0), 1)
    grouped_gemm(G, M, G * R, _channels_of(dy, G, og), w_t, og, out,
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
            rows_of_dy = _channels_of(dy, G, og)
            first = _weight(dw1 if dw1 is not None else dw2)
            both = dw1 is not None and dw2 is not None
            grouped_gemm(G, G * R, og, t_cols, rows_of_dy, M, first,
                         a2=t_cols if both else None, b2=rows_of_dy if both else None,
                         K2=M if both else 0, c2=_weight(dw2) if both else None,
                         view=LayoutView(VIEW_P, G, R, s, second=dw1 is None),
                         weight_grad=True, name="gpc_io_layout_bwd_dw")
    return dt, dw1, dw2
