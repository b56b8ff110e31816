"""The one map between the block-residue layout's slots and the channels (``kphi3_kernels.layout``),
as ``@triton.jit`` helpers: every kernel that reads or writes the layout goes through these.

Channel ``c`` (``s = C / G`` channels per block) lives at slot ``(b, n, r)``, flat column
``(b*G + n)*R + r``, with ``b = c // s``, ``n = c % G``, ``r = (c % s) // G``. Seen from an IO
block's GEMM, layout index ``j`` of group ``g``'s operand names a slot: of ``first``, block
``b = g`` (``j = n*R + r``, one contiguous span); of ``second``, residue ``n = g``
(``j = b*R + r``, G runs ``G*R`` apart).
"""
import triton
import triton.language as tl


@triton.jit
def _index_in_block(b, n, r, per_group, GROUPS: tl.constexpr):
    """``i``: the ``r``-th index of block ``b`` congruent to ``n`` mod G (a channel iff ``i < s``)."""
    return (n + GROUPS - (b * per_group) % GROUPS) % GROUPS + r * GROUPS


@triton.jit
def channel_of_slot(col, per_group, GROUPS: tl.constexpr, RUN: tl.constexpr):
    """The channel at layout column ``col`` and whether ``col`` holds one (else padding)."""
    b = col // (GROUPS * RUN)
    i = _index_in_block(b, (col // RUN) % GROUPS, col % RUN, per_group, GROUPS)
    return b * per_group + i, i < per_group


@triton.jit
def slot_of_channel(c, per_group, GROUPS: tl.constexpr, RUN: tl.constexpr):
    """The layout column of channel ``c``."""
    return ((c // per_group) * GROUPS + c % GROUPS) * RUN + (c % per_group) // GROUPS


@triton.jit
def operand_slot(j, g, GROUPS: tl.constexpr, RUN: tl.constexpr, SECOND):
    """The layout column that holds index ``j`` of group ``g``'s operand (``SECOND``: residue g,
    else block g)."""
    in_block = g * (GROUPS * RUN) + j
    in_residue = (j // RUN) * (GROUPS * RUN) + g * RUN + j % RUN
    return tl.where(SECOND, in_residue, in_block)


@triton.jit
def operand_weight_row(j, g, per_group, GROUPS: tl.constexpr, RUN: tl.constexpr, SECOND):
    """The weight row that index ``j`` of group ``g``'s operand meets, and whether it is a channel.

    The slot's channel is ``c = b*s + i``; ``W1[b]``'s row is ``i``, ``W2[n]``'s row is
    ``c // G`` (c's place in ``x[n::G]``).
    """
    outer = j // RUN
    b = tl.where(SECOND, outer, g)
    n = tl.where(SECOND, g, outer)
    i = _index_in_block(b, n, j % RUN, per_group, GROUPS)
    row = tl.where(SECOND, (b * per_group + i) // GROUPS, i)
    return row, i < per_group
