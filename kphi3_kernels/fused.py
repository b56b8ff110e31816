"""Functional entry points of the fused decoder: a producer that writes a grouped block's input
in the block-residue layout (``kphi3_kernels.layout``), and the IO block that reads it.

In a KPhi-3 MLP, ``silu(gate) * up`` is the input of ``down_proj``'s IO block. Run unfused, the
activation writes it in channel order and the block's Triton forward lays it out again (the
de-interleave pass) so that both of its GEMMs get 16-byte loads; its backward gathers the
interleaved half of the input gradient back. Fused, the activation writes the layout both GEMMs
read, and the layout's gradient returns to the activation's backward: no pass in between.

    t = silu_mul_to_layout(gate_up, groups)                 # [..., G*G*R]
    y = gpc_io_from_layout(t, weight1, weight2)             # == gpc_io(up * silu(gate), ...)
    y = silu_mul_gpc_io(gate_up, weight1, weight2)          # the same, as one operator

    y = rms_norm_gpc_io(x, norm_weight, eps, weight1, weight2)  # IO block of RMSNorm(x)

    n = rms_norm(x, norm_weight, eps)                       # Phi-3's RMSNorm, one launch
    h, n = add_rms_norm(residual, x, norm_weight, eps)      # h = residual + x, n = RMSNorm(h)
    y = silu_mul_gpc_io(gate_up, weight1, weight2, residual=h)  # h + down_proj(...)

    # gate_up_proj's head writing down_proj's input from its own launch (no activation pass):
    gate_up, act = rms_norm_gpc_io(x, norm_weight, eps, wg1, wg2, activation_groups=G)
    y = silu_mul_gpc_io(gate_up, weight1, weight2, activation=act)

``silu_mul_gpc_io`` is what a KPhi-3 MLP runs with ``fused_decoder=True``: one operator whose backward
never writes the layout's gradient. It computes ``h``'s gradient in plain channel order (the IO
block's input gradient, its interleaved half gathered in the epilogue) and turns it into those
of gate and up in the same epilogue, so the activation has no backward pass of its own; the
layout it saved serves the weight gradients. ``rms_norm_gpc_io`` is qkv_proj and gate_up_proj
with the RMSNorm before them: the norm writes the layout, the IO block reads it, and the
backward returns the input gradient in channel order to the norm's backward.

The residual stream is fused the same way: ``add_rms_norm`` is the residual add after the
attention and the RMSNorm after it in one launch, whose backward adds the stream's own gradient
to the norm's in the same pass (the sum at the branch point), and ``silu_mul_gpc_io(...,
residual=h)`` adds the stream in down_proj's epilogue.

All take ``backend=`` like the op-level functions, and each validates its arguments
(``_checks.py``, the op-level functions' checks) and then calls one operator of
``ops/fused_ops.py`` on the resolved backend: ``"triton"`` runs the fused kernels, ``"torch"``
the same operators composed in PyTorch (``ops/torch_impl.py``), with the same autograd
formulas. Checks run before anything launches.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from . import layout
from .ops import fused_ops
from .reference import as_int

__all__ = ["silu_mul_to_layout", "gpc_io_from_layout", "silu_mul_gpc_io", "rms_norm_gpc_io",
           "rms_norm", "add_rms_norm", "layout_padding"]


def silu_mul_to_layout(gate_up: torch.Tensor, groups: int, pad: int = 8, *,
                       backend: Optional[str] = None) -> torch.Tensor:
    """``to_residue_layout(up * silu(gate), groups, pad)`` for ``gate_up = [gate | up]``.

    ``gate_up`` is ``[..., 2C]`` (the gate is the first half, as Phi-3's ``gate_up_proj`` writes
    it), ``C`` divisible by ``groups``. Returns ``[..., G*G*R]`` in ``gate_up``'s dtype, padding
    zero; the product is computed in fp32 (float64 for float64) and rounded once.
    Differentiable: the gradient reaching the layout's padding is ignored.
    """
    op = "silu_mul_to_layout"
    C.check_floating(gate_up, "gate_up", op)
    groups = as_int(groups, f"{op}: groups")
    pad = as_int(pad, f"{op}: pad")
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(
            f"{op}: gate_up's last dimension ({width}) must be even: the gate and up halves")
    if groups < 1 or pad < 1:
        raise ValueError(f"{op}: groups and pad must be positive, got {groups} and {pad}")
    channels = width // 2
    if channels == 0 or channels % groups:
        raise ValueError(
            f"{op}: the {channels} channels of each half must be a positive multiple of groups "
            f"({groups})")
    run = layout.residue_run_length(channels, groups, pad)
    name = C.backend_for(gate_up, backend, op)
    t = fused_ops.silu_mul_layout(C.flatten(gate_up), groups, run, backend=name)
    return t.reshape(*gate_up.shape[:-1], t.shape[-1])


def gpc_io_from_layout(t: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                       bias1: Optional[torch.Tensor] = None, bias2: Optional[torch.Tensor] = None,
                       *, backend: Optional[str] = None) -> torch.Tensor:
    """The IO block ``gpc_io(x, ...)`` from ``t``, its input ``x`` in the block-residue layout.

    ``t`` is ``[..., G*G*R]`` with ``R >= ceil(s / G)`` (what ``to_residue_layout`` or
    ``silu_mul_to_layout`` write, for any pad), its padding finite (those functions write zeros):
    padding meets zero weight rows. The weights are the block's own ``[G, s, og]`` parameters
    (nothing re-indexed is stored), the biases ``[G, og]``. Returns ``[..., G*og]``; gradients
    reach ``t`` (in the layout, padding zero), the weights and the biases.
    """
    op = "gpc_io_from_layout"
    G, s, og = C.check_io_weights(weight1, weight2, op)
    C.check_floating(t, "t", op)
    width = t.shape[-1]
    shortest = -(-s // G)
    if width % (G * G) or width // (G * G) < shortest:
        raise ValueError(
            f"{op}: t's last dimension is {width}, but a block-residue layout of {G * s} channels "
            f"in {G} groups is G*G*R = {G * G}*R with R >= ceil(s/G) = {shortest} (e.g. "
            f"{layout.residue_layout_channels(G * s, G)} for pad 8)")
    C.check_bias(bias1, G, og, op, "bias1")
    C.check_bias(bias2, G, og, op, "bias2")
    name = C.backend_for(t, backend, op)
    t, (weight1, weight2, bias1, bias2) = C.cast_params(t, (weight1, weight2, bias1, bias2), op)
    y = fused_ops.gpc_io_layout(C.flatten(t), weight1, weight2, bias1, bias2, backend=name)
    return y.reshape(*t.shape[:-1], G * og)


def silu_mul_gpc_io(gate_up: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
                    bias1: Optional[torch.Tensor] = None, bias2: Optional[torch.Tensor] = None,
                    pad: int = 8, *, residual: Optional[torch.Tensor] = None,
                    activation: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """``gpc_io(up * silu(gate), weight1, weight2, bias1, bias2)`` for ``gate_up = [gate | up]``:
    a KPhi-3 MLP's activation and down_proj as one fused operator (see the module docstring).

    ``gate_up`` ``[..., 2*G*s]``, weights ``[G, s, og]`` (G > 1 or 1), biases ``[G, og]``;
    returns ``[..., G*og]``. ``residual`` (``[..., G*og]``, like the result): returns
    ``residual + gpc_io(...)``, added to the fp32 accumulator in the epilogue, in the promoted
    dtype of the two (the decoder's residual add after the MLP). ``"torch"`` runs the same
    operator in PyTorch (one rounding of the sum too).

    ``activation``: ``silu_mul_to_layout(gate_up, G, pad)`` where it is already written (what
    ``rms_norm_gpc_io(..., activation_groups=G)`` returns beside ``gate_up``, from the same
    launch): the activation pass is skipped. It is read as it is (it must be that function's
    value of this ``gate_up``; its shape and dtype are checked) and gets no gradient: the
    backward's gradient of ``gate_up`` includes the path through it.
    """
    op = "silu_mul_gpc_io"
    G, s, og = C.check_io_weights(weight1, weight2, op)
    C.check_floating(gate_up, "gate_up", op)
    if gate_up.shape[-1] != 2 * G * s:
        raise ValueError(
            f"{op}: gate_up's last dimension is {gate_up.shape[-1]}, but the weights "
            f"{tuple(weight1.shape)} take {G * s} channels: gate_up must be [..., 2*{G * s}]")
    C.check_bias(bias1, G, og, op, "bias1")
    C.check_bias(bias2, G, og, op, "bias2")
    pad = as_int(pad, f"{op}: pad")
    if pad < 1:
        raise ValueError(f"{op}: pad must be positive, got {pad}")
    C.check_residual(residual, gate_up, op, result_shape=(*gate_up.shape[:-1], G * og))
    name = C.backend_for(gate_up, backend, op)
    gate_up, (weight1, weight2, bias1, bias2) = C.cast_params(
        gate_up, (weight1, weight2, bias1, bias2), op)
    run = _run_length(G, s, pad)
    given = _check_activation(activation, gate_up, G * G * run, op)
    y = fused_ops.mlp_tail(C.flatten(gate_up), weight1, weight2, bias1, bias2, run,
                           C.flatten(residual) if residual is not None else None, given,
                           backend=name)
    return y.reshape(*gate_up.shape[:-1], G * og)


def _check_activation(t: Optional[torch.Tensor], gate_up: torch.Tensor, width: int,
                      op: str) -> Optional[torch.Tensor]:
    """``t`` flattened to ``[M, width]`` after checking it is ``gate_up``'s activation layout
    in shape, dtype and device (None stays None)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: activation must be a tensor or None, got {type(t).__name__}")
    want = (*gate_up.shape[:-1], width)
    if tuple(t.shape) != want or t.dtype != gate_up.dtype or t.device != gate_up.device:
        raise ValueError(
            f"{op}: activation is {tuple(t.shape)} {t.dtype} on {t.device}, but gate_up's "
            f"activation layout is {want} {gate_up.dtype} on {gate_up.device} "
            "(silu_mul_to_layout(gate_up, G, pad))")
    if t.requires_grad:
        raise ValueError(f"{op}: activation requires grad, but it gets none (gate_up's "
                         "gradient covers it): pass the one a norm head returned, or detach it")
    return C.flatten(t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """Phi-3's RMSNorm of ``x`` ``[..., C]`` with ``weight`` ``[C]``: fp32 statistics (float64 for
    float64), the normalized input scaled by the weight, in their promoted dtype.

    ``"torch"`` computes Phi-3's module's values exactly (the normalized input rounded to x's
    dtype before the scale); ``"triton"`` is one launch that rounds once, and whose backward is
    one launch too (``docs/numerics.md``). Both backends share the backward's formula, computed
    in fp32 and rounded once.
    """
    op = "rms_norm"
    C.check_norm_args(x, weight, eps, op)
    name = C.backend_for(x, backend, op)
    n = fused_ops.rms_norm(C.flatten(x), weight, float(eps), backend=name)
    return n.reshape(x.shape)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                 backend: Optional[str] = None):
    """``(h, n)``: ``h = residual + x`` (in their promoted dtype, as ``+`` rounds it) and
    ``n = rms_norm(h, weight, eps)``, a decoder's residual add and the RMSNorm after it.

    ``"triton"`` runs both in one launch; its backward, given the gradients of both ``h`` (the
    residual stream, used again later) and ``n``, computes the input gradient, the sum of the
    two at the branch point, in one launch. ``"torch"`` computes ``+`` and ``rms_norm``'s values
    in the same operator.
    """
    op = "add_rms_norm"
    C.check_norm_args(x, weight, eps, op)
    C.check_residual(residual, x, op, required=True)
    name = C.backend_for(x, backend, op)
    h, n = fused_ops.add_rms_norm(C.flatten(residual), C.flatten(x), weight, float(eps),
                                  backend=name)
    return h.reshape(x.shape), n.reshape(x.shape)


NORM_HEAD_LAYOUTS = ("auto", "block-residue", "split")


def rms_norm_gpc_io(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    weight1: torch.Tensor, weight2: torch.Tensor,
                    bias1: Optional[torch.Tensor] = None, bias2: Optional[torch.Tensor] = None,
                    pad: int = 8, *, residual: Optional[torch.Tensor] = None,
                    layout: str = "auto", activation_groups: Optional[int] = None,
                    backend: Optional[str] = None):
    """``gpc_io(RMSNorm(x), weight1, weight2, bias1, bias2)``: a KPhi-3 layer's RMSNorm and the
    IO block after it (qkv_proj, gate_up_proj) as one fused operator (module docstring).

    ``x`` ``[..., G*s]``, ``norm_weight`` ``[G*s]``, weights ``[G, s, og]``. Under autocast the
    norm reads ``x`` and its weight as they are (fp32) and the block runs in the autocast dtype,
    as RMSNorm followed by an autocast projection does, on both backends.

    ``residual`` (``x``'s shape): the norm is of ``h = residual + x`` (the attention's residual
    add before post_attention_layernorm), and the result is ``(h, y)``; the backward takes the
    gradients of both and sums them at the branch point in the norm's pass.

    ``layout``: how the norm writes the block's input. ``"block-residue"``: the padded layout
    both GEMMs read (``layout_padding``); ``"split"``: channel order plus its de-interleaved
    copy, no padding; ``"auto"``: the layout where it adds no channel, else split.

    ``activation_groups`` (gate_up_proj's head, with ``y = [gate | up]``): the result also
    ends with ``silu_mul_to_layout(y, activation_groups, pad)``, the input of the MLP's
    down_proj (``activation_groups`` groups), written by the block's own launch where the
    tile fits (else by the activation pass after it); pass it to ``silu_mul_gpc_io``'s
    ``activation``. It carries no gradient of its own.
    """
    op = "rms_norm_gpc_io"
    G, s, og = C.check_io_weights(weight1, weight2, op)
    C.check_floating(x, "x", op)
    if x.shape[-1] != G * s:
        raise ValueError(f"{op}: x's last dimension is {x.shape[-1]}, but the weights "
                         f"{tuple(weight1.shape)} take {G * s} channels")
    C.check_norm_args(x, norm_weight, eps, op)
    C.check_bias(bias1, G, og, op, "bias1")
    C.check_bias(bias2, G, og, op, "bias2")
    C.check_residual(residual, x, op)
    C.check_head_params(x, residual, (norm_weight, weight1, weight2, bias1, bias2), op)
    if layout not in NORM_HEAD_LAYOUTS:
        raise ValueError(f"{op}: layout must be one of {', '.join(NORM_HEAD_LAYOUTS)}, got "
                         f"{layout!r}")
    pad = as_int(pad, f"{op}: pad")
    if pad < 1:
        raise ValueError(f"{op}: pad must be positive, got {pad}")
    name = C.backend_for(x, backend, op)
    # Under autocast the block's operands take the autocast dtype; the norm's (x, the residual
    # and the norm weight) stay as they are. Without it, one dtype for all (checked above).
    block_dtype = C.head_autocast_dtype(x, residual)
    if block_dtype is not None:
        weight1, weight2, bias1, bias2 = (None if p is None else p.to(block_dtype)
                                          for p in (weight1, weight2, bias1, bias2))
    if layout == "auto":
        layout = "block-residue" if layout_padding(G, s, pad) == 0 else "split"
    act = _activation_geometry(activation_groups, G * og, pad, op)
    flat_residual = C.flatten(residual) if residual is not None else None
    if layout == "split":
        y, h, a = fused_ops.norm_io_split(C.flatten(x), norm_weight, float(eps), weight1,
                                          weight2, bias1, bias2, flat_residual, act, backend=name)
    else:
        y, h, a = fused_ops.norm_io(C.flatten(x), norm_weight, float(eps), weight1, weight2,
                                    bias1, bias2, _run_length(G, s, pad), flat_residual, act,
                                    backend=name)
    rows = x.shape[:-1]
    result = (() if h is None else (h.reshape(x.shape),)) + (y.reshape(*rows, G * og),) \
        + (() if a is None else (a.reshape(*rows, a.shape[-1]),))
    return result if len(result) > 1 else result[0]


def _activation_geometry(groups, width: int, pad: int, op: str):
    """``(groups, run)`` of the activation layout a norm head writes, after checking that its
    ``width`` output channels are a ``[gate | up]`` pair divisible into ``groups`` (None: none)."""
    if groups is None:
        return None
    groups = as_int(groups, f"{op}: activation_groups")
    channels, odd = divmod(width, 2)
    if groups < 1 or odd or channels % groups:
        raise ValueError(
            f"{op}: activation_groups={groups} needs the block's {width} output channels to be "
            f"[gate | up] halves of a multiple of {groups} channels each")
    return groups, _run_length(groups, channels // groups, pad)


def _run_length(groups: int, per_group: int, pad: int) -> int:
    # Module level: rms_norm_gpc_io's ``layout`` argument hides the module there.
    return layout.residue_run_length(groups * per_group, groups, pad)


def layout_padding(groups: int, per_group: int, pad: int = 8) -> int:
    """How many channels per group the block-residue layout adds: ``G*R - s``.

    Both GEMMs of an IO block on the layout reduce over ``G*R`` instead of ``s`` channels per
    group (the padding meets zero weight rows), so the layout costs ``(G*R - s) / s`` more matrix
    work than the plain-order block, and saves the de-interleave pass over the input. At the
    released KPhi-3 widths (s = 256 in G = 5 groups: R = 56, G*R = 280, one more 64-wide K tile
    than 256) that trade loses where the block is compute-bound (qkv_proj and gate_up_proj at
    training sizes) and wins where it is bandwidth-bound (down_proj, og = 64). A KPhi-3 model
    with ``fused_decoder=True`` fuses a norm into the block after it only where this is 0.
    """
    run = layout.residue_run_length(groups * per_group, groups, pad)
    return groups * run - per_group
