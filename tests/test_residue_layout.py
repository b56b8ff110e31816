"""The block-residue layout (kphi3_kernels/layout.py) against its definition in docs/layers.md.

The definition is written out here a second time, by enumeration rather than by formula: block
b's channels are listed in increasing order and split by residue mod G, each one's rank is its
position in that list. Both conversions are a permutation plus zeros, so they are checked for
exact equality in every dtype; the IO block computed on the layout is checked against
``reference.gpc_io`` on the original input.
"""
import math

import pytest
import torch

from kphi3_kernels import reference as R
from kphi3_kernels.layout import (first_weight_in_layout, from_residue_layout, gpc_io_in_layout,
                                  residue_layout_channels, residue_run_length, residue_slots,
                                  second_weight_in_layout, to_residue_layout)

from _utils import DEVICE, FP32_TOL, make_bias, make_input, make_weight, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]

# (C, G): not powers of two, s < G, s not divisible by G, one group, one channel per group.
GEOMETRIES = [(5 * 48, 5), (3 * 7, 3), (20 * 256, 20), (1 * 13, 1), (2 * 1, 2), (20 * 7, 20),
              (12, 3), (8 * 3, 8)]


def _ids(geometries):
    return [f"C{c}-G{g}" for c, g in geometries]


def definition(C, G, pad):
    """``(R, {channel: (b, n, r)})`` from the definition, by enumeration."""
    s = C // G
    longest = math.ceil(s / G) if s else 0
    run = math.ceil(longest / pad) * pad
    where = {}
    for b in range(G):
        block = list(range(b * s, (b + 1) * s))
        for n in range(G):
            members = [c for c in block if c % G == n]
            assert len(members) <= longest
            for r, c in enumerate(members):
                where[c] = (b, n, r)
    assert sorted(where) == list(range(C))
    return run, where


def expected_layout(x, G, pad):
    """The layout of ``x`` built element by element from the definition (padding zero)."""
    C = x.shape[-1]
    run, where = definition(C, G, pad)
    out = torch.zeros(*x.shape[:-1], G, G, run, dtype=x.dtype, device=x.device)
    for c, (b, n, r) in where.items():
        out[..., b, n, r] = x[..., c]
    return out.flatten(-3)


def padding_mask(C, G, pad, device=DEVICE):
    """True at the padding slots of the flat layout."""
    run, where = definition(C, G, pad)
    mask = torch.ones(G, G, run, dtype=torch.bool, device=device)
    for b, n, r in where.values():
        mask[b, n, r] = False
    return mask.flatten()


def _input(lead, C, dtype, layout="contig"):
    """``[*lead, C]`` in the given memory layout (``_utils.make_input``), as a plain tensor."""
    if not lead:
        return torch.randn(C, device=DEVICE).to(dtype)
    return make_input(lead, C, dtype, layout).detach()


# --------------------------------------------------------------------------------------------
# The geometry
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [1, 2, 3, 8])
@pytest.mark.parametrize("C,G", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_slots_follow_the_definition(C, G, pad):
    run, where = definition(C, G, pad)
    assert residue_run_length(C, G, pad) == run
    assert run % pad == 0 and run >= math.ceil((C // G) / G)
    assert residue_layout_channels(C, G, pad) == G * G * run
    slots = residue_slots(C, G, pad)
    assert slots.dtype == torch.long and slots.shape == (C,)
    assert slots.tolist() == [(b * G + n) * run + r for b, n, r in (where[c] for c in range(C))]
    assert len(set(slots.tolist())) == C  # one channel per slot


@pytest.mark.parametrize("G", range(1, 21))
def test_every_group_count(G):
    """G = 1..20, with s below G, equal to it, above it and not a multiple of it."""
    for s in sorted({1, max(1, G - 1), G, G + 1, 2 * G + 3}):
        C = G * s
        x = torch.randn(2, C, device=DEVICE)
        t = to_residue_layout(x, G)
        assert t.shape == (2, residue_layout_channels(C, G))
        assert torch.equal(t, expected_layout(x, G, 8)), (G, s)
        assert torch.equal(from_residue_layout(t, G, C), x), (G, s)


def test_worked_example():
    """docs/layers.md: C = 12, G = 3, s = 4, pad = 2 (R = 2), '-' a padding slot."""
    assert residue_run_length(12, 3, pad=2) == 2
    assert residue_layout_channels(12, 3, pad=2) == 18
    t = to_residue_layout(torch.arange(1, 13, device=DEVICE), 3, pad=2) - 1  # channel c -> c
    table = [0, 3, 1, -1, 2, -1,  # block 0: residues 0, 1, 2
             6, -1, 4, 7, 5, -1,  # block 1
             9, -1, 10, -1, 8, 11]  # block 2
    assert t.tolist() == table
    assert residue_slots(12, 3, pad=2).tolist() == [0, 2, 4, 1, 8, 10, 6, 9, 16, 12, 14, 17]


def test_released_shapes():
    """The inputs of the released projections: 1280 channels in 5 groups, 5120 in 20."""
    assert (residue_run_length(1280, 5), residue_layout_channels(1280, 5)) == (56, 1400)
    assert (residue_run_length(5120, 20), residue_layout_channels(5120, 20)) == (16, 6400)


def test_no_channels():
    x = torch.randn(3, 0, device=DEVICE)
    assert residue_run_length(0, 4) == 0 and residue_slots(0, 4).shape == (0,)
    t = to_residue_layout(x, 4)
    assert t.shape == (3, 0)
    assert from_residue_layout(t, 4, 0).shape == (3, 0)


# --------------------------------------------------------------------------------------------
# Both directions
# --------------------------------------------------------------------------------------------

ROUND_TRIP = [  # (C, G, leading shape, memory layout)
    (5 * 48, 5, (7,), "contig"),
    (3 * 7, 3, (2, 3), "sliced"),
    (20 * 256, 20, (3,), "transposed"),
    (1 * 13, 1, (), "contig"),
    (2 * 1, 2, (2, 1, 3), "transposed"),
    (20 * 7, 20, (0,), "contig"),
    (12, 3, (1,), "sliced"),
    (8 * 3, 8, (4, 0, 2), "contig"),
    (3 * 7, 3, (3, 4), "expanded"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("C,G,lead,layout", ROUND_TRIP,
                         ids=[f"C{c}-G{g}-M{'x'.join(map(str, m))}-{l}"
                              for c, g, m, l in ROUND_TRIP])
def test_both_directions_exact(C, G, lead, layout, dtype):
    x = _input(lead, C, dtype, layout)
    t = to_residue_layout(x, G)
    L = residue_layout_channels(C, G)
    assert t.shape == (*lead, L) and t.dtype == dtype and t.device == x.device
    assert t.is_contiguous()
    assert torch.equal(t, expected_layout(x, G, 8))
    padding = t[..., padding_mask(C, G, 8)]
    assert torch.equal(padding, torch.zeros_like(padding))
    back = from_residue_layout(t, G, C)
    assert back.shape == x.shape and back.dtype == dtype
    assert torch.equal(back, x)
    # from_residue_layout on a non-contiguous layout (every other element of a wider tensor).
    wide = torch.full((*lead, 2 * L), float("nan"), dtype=dtype, device=x.device)
    wide[..., ::2] = t
    assert torch.equal(from_residue_layout(wide[..., ::2], G, C), x)


@pytest.mark.parametrize("pad", [1, 3, 8])
@pytest.mark.parametrize("C,G", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_from_residue_layout_ignores_padding(C, G, pad):
    x = torch.randn(3, C, device=DEVICE)
    t = to_residue_layout(x, G, pad)
    mask = padding_mask(C, G, pad)
    assert int(mask.sum()) == t.shape[-1] - C
    assert (t[..., mask] == 0).all()
    t[..., mask] = float("nan")
    back = from_residue_layout(t, G, C, pad)
    assert not back.isnan().any()
    assert torch.equal(back, x)


@pytest.mark.parametrize("C,G", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_blocks_and_residue_runs(C, G):
    """Block b is one contiguous span holding group b of ``first``; residue n is G contiguous
    runs of R elements which, read in order b = 0..G-1 without their padding, are ``x[..., n::G]``
    in order."""
    s, run = C // G, residue_run_length(C, G)
    x = torch.randn(2, C, device=DEVICE).to(torch.bfloat16)
    t = to_residue_layout(x, G)
    cube = t.unflatten(-1, (G, G, run))
    pad = padding_mask(C, G, 8).view(G, G, run)
    for b in range(G):
        block = cube[:, b, :, :]
        for m in range(2):  # one contiguous span of G*R elements in each row
            assert block[m].is_contiguous()
            assert block[m].storage_offset() == m * t.shape[-1] + b * G * run
        assert torch.equal(block.flatten(-2)[:, ~pad[b].flatten()].sort(-1).values,
                           x[:, b * s:(b + 1) * s].sort(-1).values)
    for n in range(G):
        runs = cube[:, :, n, :]  # [M, G, R]
        assert runs.stride(-1) == 1 and runs.stride(-2) == G * run
        for b in range(G):
            offset = runs[0, b].storage_offset()
            assert offset == (b * G + n) * run
            assert (offset * t.element_size()) % 16 == 0 and (run * t.element_size()) % 16 == 0
            # The real channels of a run come first, then its padding.
            k = int((~pad[b, n]).sum())
            assert not pad[b, n, :k].any() and pad[b, n, k:].all()
        read = torch.cat([runs[:, b, :int((~pad[b, n]).sum())] for b in range(G)], dim=-1)
        assert torch.equal(read, x[:, n::G])


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C,G,pad", [(21, 3, 4), (6, 3, 1), (4, 4, 2)])
def test_gradcheck_conversions(C, G, pad):
    x = torch.randn(2, C, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: to_residue_layout(v, G, pad), (x,))
    L = residue_layout_channels(C, G, pad)
    t = torch.randn(2, L, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: from_residue_layout(v, G, C, pad), (t,))
    # The padding gets no gradient from from_residue_layout.
    (g,) = torch.autograd.grad(from_residue_layout(t, G, C, pad).sum(), t)
    assert (g[..., padding_mask(C, G, pad)] == 0).all()
    assert (g[..., ~padding_mask(C, G, pad)] == 1).all()


def test_gradcheck_weights():
    w = torch.randn(3, 7, 2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: first_weight_in_layout(v, 4), (w,))
    assert torch.autograd.gradcheck(lambda v: second_weight_in_layout(v, 4), (w,))


# --------------------------------------------------------------------------------------------
# The weights and the IO block on the layout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", [1, 8])
@pytest.mark.parametrize("C,G", GEOMETRIES[:6], ids=_ids(GEOMETRIES[:6]))
def test_weights_follow_the_definition(C, G, pad):
    s, og = C // G, 3
    run, where = definition(C, G, pad)
    w1 = torch.randn(G, s, og, device=DEVICE)
    w2 = torch.randn(G, s, og, device=DEVICE)
    w1l, w2l = first_weight_in_layout(w1, pad), second_weight_in_layout(w2, pad)
    assert w1l.shape == w2l.shape == (G, G * run, og)
    e1, e2 = torch.zeros_like(w1l), torch.zeros_like(w2l)
    for c, (b, n, r) in where.items():
        e1[b, n * run + r] = w1[b, c - b * s]  # first: block b, in (n, r) order
        e2[n, b * run + r] = w2[n, c // G]     # second: residue n, in (b, r) order
    assert torch.equal(w1l, e1) and torch.equal(w2l, e2)


IO_CASES = [  # (C, G, og, leading shape)
    (5 * 48, 5, 7, (3, 5)),
    (3 * 7, 3, 5, (4,)),
    (20 * 256, 20, 3, (3,)),
    (1 * 13, 1, 4, (2, 3)),
    (2 * 1, 2, 1, (5,)),
    (20 * 7, 20, 2, (1,)),
    (12, 3, 5, (0,)),
    (8 * 3, 8, 6, ()),
]
IO_IDS = [f"C{c}-G{g}-og{o}-M{'x'.join(map(str, m))}" for c, g, o, m in IO_CASES]


def _io_operands(C, G, og, lead, dtype, bias):
    s = C // G
    x = _input(lead, C, dtype)
    w1, w2 = make_weight(G, s, og, dtype).detach(), make_weight(G, s, og, dtype).detach()
    b1 = make_bias(G, og, dtype).detach() if bias else None
    b2 = make_bias(G, og, dtype).detach() if bias else None
    return x, w1, w2, b1, b2


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("C,G,og,lead", IO_CASES, ids=IO_IDS)
def test_gpc_io_in_layout_float64(C, G, og, lead, bias):
    x, w1, w2, b1, b2 = _io_operands(C, G, og, lead, torch.float64, bias)
    for pad in (1, 8):
        t = to_residue_layout(x, G, pad)
        y = gpc_io_in_layout(t, first_weight_in_layout(w1, pad), second_weight_in_layout(w2, pad),
                             b1, b2)
        ref = R.gpc_io(x, w1, w2, b1, b2)
        assert y.shape == ref.shape == (*lead, G * og)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("C,G,og,lead", IO_CASES, ids=IO_IDS)
def test_gpc_io_in_layout_fp32(C, G, og, lead, bias):
    x, w1, w2, b1, b2 = _io_operands(C, G, og, lead, torch.float32, bias)
    y = gpc_io_in_layout(to_residue_layout(x, G), first_weight_in_layout(w1),
                         second_weight_in_layout(w2), b1, b2)
    assert y.dtype == torch.float32
    f64 = lambda v: None if v is None else v.double()  # noqa: E731
    ref = R.gpc_io(*(f64(v) for v in (x, w1, w2, b1, b2)))
    assert rel_error(y, ref) < FP32_TOL


def test_gpc_io_in_layout_gradients_and_activation():
    """Through the layout, the gradients of x, the weights and the biases are the reference's;
    a non-contiguous layout and an activation work as in ``gpc_io``."""
    C, G, og = 3 * 7, 3, 4
    x, w1, w2, b1, b2 = _io_operands(C, G, og, (2, 3), torch.float64, True)
    leaves = [v.clone().requires_grad_(True) for v in (x, w1, w2, b1, b2)]
    ref_leaves = [v.clone().requires_grad_(True) for v in (x, w1, w2, b1, b2)]
    act = torch.tanh
    t = to_residue_layout(leaves[0], G).transpose(0, 1).contiguous().transpose(0, 1)
    assert not t.is_contiguous()
    y = gpc_io_in_layout(t, first_weight_in_layout(leaves[1]), second_weight_in_layout(leaves[2]),
                         leaves[3], leaves[4], activation=act)
    ref = R.gpc_io(*ref_leaves, activation=act)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ref)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

_W = torch.zeros(3, 5, 2)
_T = torch.zeros(4, residue_layout_channels(15, 3))

BAD = [
    ("not-divisible", lambda: residue_slots(14, 3), ValueError, r"channels \(14\).*groups \(3\)"),
    ("not-divisible-x", lambda: to_residue_layout(torch.zeros(2, 14), 3), ValueError,
     r"channels \(14\).*divisible by groups \(3\)"),
    ("pad-0", lambda: residue_run_length(15, 3, pad=0), ValueError, "pad must be positive"),
    ("pad-negative", lambda: to_residue_layout(torch.zeros(15), 3, pad=-8), ValueError, "pad"),
    ("groups-0", lambda: residue_layout_channels(15, 0), ValueError, "groups must be positive"),
    ("channels-negative", lambda: residue_slots(-3, 3), ValueError, "channels must be non-neg"),
    ("groups-bool", lambda: to_residue_layout(torch.zeros(15), True), TypeError, "groups"),
    ("pad-float", lambda: residue_run_length(15, 3, pad=8.0), TypeError, "pad"),
    ("x-0d", lambda: to_residue_layout(torch.tensor(1.0), 1), ValueError, "0-d"),
    ("x-list", lambda: to_residue_layout([1.0, 2.0], 1), TypeError, "Tensor"),
    ("t-last-dim", lambda: from_residue_layout(torch.zeros(4, 15), 3, 15), ValueError,
     r"last dimension is 15.*3\*3\*8 = 72"),
    ("t-last-dim-pad", lambda: from_residue_layout(_T, 3, 15, pad=2), ValueError,
     r"last dimension is 72.*pad 2"),
    ("t-not-divisible", lambda: from_residue_layout(_T, 3, 16), ValueError, r"\(16\)"),
    ("w1-2d", lambda: first_weight_in_layout(torch.zeros(15, 2)), ValueError, r"3-D \[G, s, og\]"),
    ("w2-list", lambda: second_weight_in_layout([[1.0]]), TypeError, "weight2.*Tensor"),
    ("io-last-dim", lambda: gpc_io_in_layout(torch.zeros(4, 70), first_weight_in_layout(_W),
                                             second_weight_in_layout(_W)), ValueError,
     r"last dimension is 70.*72"),
    ("io-weights-differ", lambda: gpc_io_in_layout(_T, first_weight_in_layout(_W),
                                                   second_weight_in_layout(_W, pad=1)),
     ValueError, "same shape"),
    ("io-rows", lambda: gpc_io_in_layout(_T, torch.zeros(3, 23, 2), torch.zeros(3, 23, 2)),
     ValueError, "not a multiple of G = 3"),
    ("io-bias", lambda: gpc_io_in_layout(_T, first_weight_in_layout(_W),
                                         second_weight_in_layout(_W), torch.zeros(2, 3)),
     ValueError, r"bias1 must have shape \[G, og\] = \[3, 2\]"),
]


@pytest.mark.parametrize("call,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
