"""The block-residue layout of an IO block's input (docs/layers.md, "The block-residue layout").

The IO block reads its input ``x`` (``C = G*s`` channels) twice: ``first`` in contiguous blocks
of ``s`` channels (group ``b`` is channels ``b*s .. b*s+s-1``) and ``second`` by residue mod G
(group ``n`` is channels ``n, n+G, n+2G, ...``). In the plain channel order the second read is a
stride-G gather, so a kernel that wants 16-byte loads for both products must first copy ``x``
into a de-interleaved order. The block-residue layout is one order in which both reads are
contiguous runs:

- channel ``c`` lives at slot ``(b, n, r)`` with ``b = c // s`` (its ``first`` block),
  ``n = c % G`` (its ``second`` group) and ``r = (c % s) // G`` (its rank among the channels of
  block ``b`` with residue ``n``, in increasing order);
- every ``(b, n)`` run is padded to ``R = round_up(ceil(s / G), pad)`` elements, padding zero;
- the layout is a ``[..., G, G, R]`` tensor stored flat as ``[..., G*G*R]``: block ``b`` is
  ``t[..., b, :, :]``, one contiguous span of ``G*R`` elements; residue ``n`` is
  ``t[..., :, n, :]``, G runs of ``R`` contiguous elements that, read in order ``b = 0..G-1`` and
  without their padding, are exactly ``x[..., n::G]``.

Everything here is plain PyTorch (pure indexing, differentiable with autograd), written for
clarity: it is the reference a fused kernel reading this layout is checked against.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .reference import as_int

__all__ = [
    "residue_run_length",
    "residue_layout_channels",
    "residue_slots",
    "to_residue_layout",
    "from_residue_layout",
    "first_weight_in_layout",
    "second_weight_in_layout",
    "gpc_io_in_layout",
]


def _geometry(channels, groups, pad):
    """``(C, G, s, R)`` from validated arguments (ValueError / TypeError naming the problem)."""
    channels = as_int(channels, "channels")
    groups = as_int(groups, "groups")
    pad = as_int(pad, "pad")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    if pad < 1:
        raise ValueError(f"pad must be positive (runs are padded to a multiple of pad), got {pad}")
    if channels < 0:
        raise ValueError(f"channels must be non-negative, got {channels}")
    if channels % groups != 0:
        raise ValueError(
            f"channels ({channels}) must be divisible by groups ({groups}): the layout splits "
            f"them into {groups} blocks of equal size"
        )
    per_group = channels // groups
    longest = -(-per_group // groups)  # ceil(s / G): the most channels a (block, residue) run holds
    run = -(-longest // pad) * pad
    return channels, groups, per_group, run


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 0:
        raise ValueError(
            f"{name} must have at least one dimension (the channels), got a 0-d tensor"
        )


def residue_run_length(channels: int, groups: int, pad: int = 8) -> int:
    """R, the length of every ``(block, residue)`` run: ``round_up(ceil(s / G), pad)``.

    Block ``b`` holds ``s = channels / groups`` channels, of which at most ``ceil(s / G)`` have
    any one residue mod G. Padding every run to the same multiple of ``pad`` makes each run start
    at a multiple of ``pad`` elements, so with ``pad = 8`` every run of a bf16 / fp16 layout is a
    whole number of aligned 16-byte vectors (for fp32, ``pad = 4`` is enough for that).
    """
    return _geometry(channels, groups, pad)[3]


def residue_layout_channels(channels: int, groups: int, pad: int = 8) -> int:
    """``G*G*R``, the last dimension of the layout (``channels`` plus the zero padding)."""
    _, groups, _, run = _geometry(channels, groups, pad)
    return groups * groups * run


def _slots(channels: int, groups: int, per_group: int, run: int, device=None) -> torch.Tensor:
    c = torch.arange(channels, dtype=torch.long, device=device)
    if channels == 0:
        return c
    return ((c // per_group) * groups + c % groups) * run + (c % per_group) // groups


def residue_slots(channels: int, groups: int, pad: int = 8, *, device=None) -> torch.Tensor:
    """The flat slot of each channel: a LongTensor ``[channels]``, ``slots[c] = (b*G + n)*R + r``.

    ``b = c // s``, ``n = c % G``, ``r = (c % s) // G``: within block ``b`` the channels of
    residue ``n`` are ``i = c % s`` congruent to ``n - b*s`` mod G, i.e. ``i0, i0 + G, ...`` with
    ``i0 = i % G``, so the rank of ``i`` is ``i // G``. ``layout[..., slots] = x`` and
    ``x = layout[..., slots]``; the same indices re-order a weight's input rows (see
    ``first_weight_in_layout``) or drive a kernel's loads. Slots not in the result are padding.
    """
    channels, groups, per_group, run = _geometry(channels, groups, pad)
    return _slots(channels, groups, per_group, run, device)


def to_residue_layout(x: torch.Tensor, groups: int, pad: int = 8) -> torch.Tensor:
    """``x`` ``[..., C]`` in the block-residue layout: ``[..., G*G*R]``, padding zero.

    Any leading dimensions (none, or with zero rows) and any strides; the result is a new
    contiguous tensor of ``x``'s dtype and device. Differentiable: the gradient of ``x`` is the
    gradient of the layout read back at the slots of the channels (padding contributes nothing).
    View the result as ``[..., G, G, R]`` with ``t.unflatten(-1, (G, G, R))``.
    """
    _check_tensor(x, "x")
    channels, groups, per_group, run = _geometry(x.shape[-1], groups, pad)
    slots = _slots(channels, groups, per_group, run, x.device)
    out = x.new_zeros(*x.shape[:-1], groups * groups * run)
    return out.index_copy(-1, slots, x)


def from_residue_layout(t: torch.Tensor, groups: int, channels: int, pad: int = 8) -> torch.Tensor:
    """The inverse of ``to_residue_layout``: ``[..., G*G*R]`` back to ``[..., channels]``.

    Reads only the slots of the channels, so whatever the padding holds (zeros, garbage, NaN) is
    ignored, and its gradient is zero. Any leading dimensions and strides; differentiable.
    """
    _check_tensor(t, "t")
    channels, groups, per_group, run = _geometry(channels, groups, pad)
    expected = groups * groups * run
    if t.shape[-1] != expected:
        raise ValueError(
            f"t's last dimension is {t.shape[-1]}, but the block-residue layout of {channels} "
            f"channels in {groups} groups (pad {pad}) has G*G*R = {groups}*{groups}*{run} = "
            f"{expected}"
        )
    return t.index_select(-1, _slots(channels, groups, per_group, run, t.device))


def _check_weight(w, name: str) -> None:
    _check_tensor(w, name)
    if w.dim() != 3:
        raise ValueError(f"{name} must be 3-D [G, s, og], got shape {tuple(w.shape)}")
    if w.shape[0] < 1:
        raise ValueError(f"{name} must have at least one group, got shape {tuple(w.shape)}")


def first_weight_in_layout(weight1: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """``weight1`` ``[G, s, og]`` re-indexed for the layout: ``[G, G*R, og]``.

    Block ``b`` of the layout, ``t[..., b, :, :]`` flattened to ``G*R`` values in ``(n, r)``
    order, holds the ``s`` channels of ``first``'s group ``b`` in a different order plus zeros;
    row ``n*R + r`` of the result is the row of ``weight1[b]`` for the channel at ``(b, n, r)``,
    and a zero row at a padding slot, so that ``t[..., b, :, :].flatten(-2) @ result[b]`` equals
    ``x[..., b*s:(b+1)*s] @ weight1[b]``. Differentiable.
    """
    _check_weight(weight1, "weight1")
    groups, per_group, out_per_group = weight1.shape
    channels, groups, per_group, run = _geometry(groups * per_group, groups, pad)
    # Row b*s + i of the flattened weight is channel c = b*s + i, and its slot (b*G + n)*R + r is
    # row n*R + r of block b in the flattened [G, G*R] result.
    slots = _slots(channels, groups, per_group, run, weight1.device)
    out = weight1.new_zeros(groups * groups * run, out_per_group)
    out = out.index_copy(0, slots, weight1.reshape(channels, out_per_group))
    return out.view(groups, groups * run, out_per_group)


def second_weight_in_layout(weight2: torch.Tensor, pad: int = 8) -> torch.Tensor:
    """``weight2`` ``[G, s, og]`` re-indexed for the layout: ``[G, G*R, og]``.

    Residue ``n`` of the layout, ``t[..., :, n, :]`` flattened to ``G*R`` values in ``(b, r)``
    order, holds ``x[..., n::G]`` (its ``j``-th channel is ``c = n + j*G``) plus zeros; row
    ``b*R + r`` of the result is ``weight2[n, c // G]`` for the channel ``c`` at ``(b, n, r)``,
    and a zero row at a padding slot, so that ``t[..., :, n, :].flatten(-2) @ result[n]`` equals
    ``x[..., n::G] @ weight2[n]``. Differentiable.
    """
    _check_weight(weight2, "weight2")
    groups, per_group, out_per_group = weight2.shape
    channels, groups, per_group, run = _geometry(groups * per_group, groups, pad)
    c = torch.arange(channels, device=weight2.device)
    b, n, r = c // per_group, c % groups, (c % per_group) // groups
    # Destination row of channel c, in the [n, b, r] order of the residue operands.
    dest = (n * groups + b) * run + r
    # Source row: weight2 read as [s, G] rows, row j*G + n = weight2[n, j], is channel n + j*G.
    source = weight2.transpose(0, 1).reshape(channels, out_per_group)
    out = weight2.new_zeros(groups * groups * run, out_per_group).index_copy(0, dest, source)
    return out.view(groups, groups * run, out_per_group)


def gpc_io_in_layout(
    t: torch.Tensor,
    weight1_layout: torch.Tensor,
    weight2_layout: torch.Tensor,
    bias1: Optional[torch.Tensor] = None,
    bias2: Optional[torch.Tensor] = None,
    activation: Optional[Callable] = None,
) -> torch.Tensor:
    """The IO block (``reference.gpc_io``) computed from an input in the block-residue layout.

    ``t`` is ``to_residue_layout(x, G, pad)`` (``[..., G*G*R]``), the weights are
    ``first_weight_in_layout(weight1, pad)`` and ``second_weight_in_layout(weight2, pad)``
    (``[G, G*R, og]``), the biases ``[G, og]`` as in ``gpc_io``. Two batched matmuls over the
    groups, each reading its operand straight from the layout with no gather:

    ``y_n = t[..., n, :, :].flatten(-2) @ W1l[n] + t[..., :, n, :].flatten(-2) @ W2l[n]``

    which is ``x[..., n*s:(n+1)*s] @ W1[n] + x[..., n::G] @ W2[n]``: the padding of ``t`` meets
    the zero rows of the weights, so it contributes nothing as long as it is finite
    (``to_residue_layout`` writes zeros). Returns ``[..., G*og]``.
    """
    _check_tensor(t, "t")
    _check_weight(weight1_layout, "weight1_layout")
    _check_weight(weight2_layout, "weight2_layout")
    if weight1_layout.shape != weight2_layout.shape:
        raise ValueError(
            f"weight1_layout and weight2_layout must have the same shape [G, G*R, og], got "
            f"{tuple(weight1_layout.shape)} and {tuple(weight2_layout.shape)}"
        )
    groups, rows, out_per_group = weight1_layout.shape
    if rows % groups != 0:
        raise ValueError(
            f"weight1_layout has {rows} rows per group, not a multiple of G = {groups} "
            f"(expected G*R rows; build it with first_weight_in_layout)"
        )
    run = rows // groups
    if t.shape[-1] != groups * rows:
        raise ValueError(
            f"t's last dimension is {t.shape[-1]}, but weights of shape "
            f"{tuple(weight1_layout.shape)} need the layout's G*G*R = {groups}*{groups}*{run} = "
            f"{groups * rows}"
        )
    for name, bias in (("bias1", bias1), ("bias2", bias2)):
        if bias is not None and tuple(bias.shape) != (groups, out_per_group):
            raise ValueError(
                f"{name} must have shape [G, og] = [{groups}, {out_per_group}], got "
                f"{tuple(bias.shape)}"
            )
    lead = t.shape[:-1]
    rows_m = math.prod(lead)
    cube = t.reshape(rows_m, groups, groups, run)                                # [M, b, n, r]
    blocks = cube.reshape(rows_m, groups, rows).transpose(0, 1)                  # [b, M, (n, r)]
    residues = cube.transpose(1, 2).reshape(rows_m, groups, rows).transpose(0, 1)  # [n, M, (b, r)]
    y = torch.bmm(blocks, weight1_layout) + torch.bmm(residues, weight2_layout)  # [G, M, og]
    y = y.transpose(0, 1)                                                        # [M, G, og]
    if bias1 is not None:
        y = y + bias1
    if bias2 is not None:
        y = y + bias2
    y = y.reshape(*lead, groups * out_per_group)
    return activation(y) if activation is not None else y
