"""reference.py (the oracle of the whole suite) against the definitions of docs/layers.md, written out directly."""
import itertools
import math

import pytest
import torch

from kphi3_kernels import reference as R
from kphi3_kernels import get_max_acceptable_common_divisor, group_count

from _utils import rel_error

D = torch.float64


def _group_count_by_definition(cin, cout, m):
    upper = max(1, min(cin, cout, cin // m))
    return max(d for d in range(1, upper + 1) if cin % d == 0 and cout % d == 0)


# --------------------------------------------------------------------------------------------
# group_count / get_max_acceptable_common_divisor
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cin,cout,expected", [
    (1280, 3840, 5),    # qkv_proj
    (1280, 1280, 5),    # o_proj
    (1280, 10240, 5),   # gate_up_proj
    (5120, 1280, 20),   # down_proj
])
def test_group_count_released_shapes(cin, cout, expected):
    assert group_count(cin, cout, 256) == expected


def test_group_count_matches_definition_exhaustively():
    for cin, cout in itertools.product(range(1, 41), range(1, 41)):
        for m in (1, 2, 3, 4, 7, 16, 32, 50):
            assert group_count(cin, cout, m) == _group_count_by_definition(cin, cout, m), (cin, cout, m)


@pytest.mark.parametrize("m", [-1, -32, -256])
def test_group_count_negative_min_gives_one(m):
    for cin, cout in [(1280, 3840), (3072, 3072), (64, 96), (7, 7)]:
        assert group_count(cin, cout, m) == 1


def test_group_count_zero_min_raises():
    with pytest.raises(ValueError, match="min_channels_per_group"):
        group_count(1280, 1280, 0)


def test_get_max_acceptable_common_divisor_matches_definition():
    for a, b in itertools.product(range(1, 31), range(1, 31)):
        for m in (-5, 0, 1, 2, 3, 5, 8, 13, 30, 100):
            upper = max(1, min(a, b, m))
            expected = max(d for d in range(1, upper + 1) if a % d == 0 and b % d == 0)
            assert get_max_acceptable_common_divisor(a, b, m) == expected, (a, b, m)
    assert get_max_acceptable_common_divisor(1280, 3840) == 1280  # default: no cap that matters
    assert get_max_acceptable_common_divisor(12, 18) == math.gcd(12, 18)


# --------------------------------------------------------------------------------------------
# interleave
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C,step,lead", [(12, 3, (2,)), (12, 4, (2, 3)), (35, 7, (2, 1, 3)),
                                         (8, 1, (3,)), (8, 8, (3,)), (240, 48, (1,))])
def test_interleave_formula_elementwise(C, step, lead):
    x = torch.randn(*lead, C, dtype=D)
    y = R.interleave(x, step)
    assert y.shape == x.shape
    per = C // step
    for a in range(per):
        for b in range(step):
            assert torch.equal(y[..., a * step + b], x[..., b * per + a])


@pytest.mark.parametrize("C,step", [(12, 3), (35, 5), (240, 48), (6, 6), (6, 1)])
def test_interleave_inverse(C, step):
    x = torch.randn(4, 3, C, dtype=D)
    assert torch.equal(R.interleave(R.interleave(x, step), C // step), x)
    assert torch.equal(R.interleave(R.interleave(x, C // step), step), x)


# --------------------------------------------------------------------------------------------
# grouped_linear / GroupedLinear
# --------------------------------------------------------------------------------------------


def _grouped_linear_loops(x, w, b):
    G, s, og = w.shape
    y = torch.zeros(*x.shape[:-1], G * og, dtype=x.dtype)
    for n in range(G):
        y[..., n * og:(n + 1) * og] = x[..., n * s:(n + 1) * s] @ w[n]
        if b is not None:
            y[..., n * og:(n + 1) * og] += b[n]
    return y


@pytest.mark.parametrize("G,s,og,lead,bias", [(1, 4, 6, (3,), True), (3, 5, 2, (2, 3), False),
                                              (5, 4, 7, (2, 2, 3), True)])
def test_grouped_linear_definition(G, s, og, lead, bias):
    x = torch.randn(*lead, G * s, dtype=D)
    w = torch.randn(G, s, og, dtype=D)
    b = torch.randn(G, og, dtype=D) if bias else None
    y = R.grouped_linear(x, w, b)
    # docs/layers.md: y[..., n*og + j] = sum_i x[..., n*s + i] * weight[n, i, j] + bias[n, j]
    n, j = G - 1, og - 1
    direct = sum(x[..., n * s + i] * w[n, i, j] for i in range(s)) + (b[n, j] if bias else 0)
    assert torch.allclose(y[..., n * og + j], direct, rtol=1e-12, atol=1e-12)
    assert rel_error(y, _grouped_linear_loops(x, w, b)) < 1e-13


@pytest.mark.parametrize("G,bias", [(1, True), (4, False), (3, True)])
def test_grouped_linear_modules_equals_fast(G, bias):
    s, og = 5, 3
    x = torch.randn(2, 7, G * s, dtype=D)
    ws = [torch.randn(og, s, dtype=D) for _ in range(G)]
    bs = [torch.randn(og, dtype=D) if bias else None for _ in range(G)]
    slow = R.grouped_linear_modules(x, ws, bs)
    fast = R.grouped_linear(x, torch.stack([w.t() for w in ws]),
                            torch.stack(bs) if bias else None)
    assert rel_error(fast, slow) < 1e-13


# --------------------------------------------------------------------------------------------
# gpc_io
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G,s,og,lead,bias", [(2, 3, 4, (5,), False), (5, 4, 3, (2, 3), True),
                                              (3, 6, 1, (2, 1, 2), True), (4, 1, 2, (3,), False)])
def test_gpc_io_per_group_formula(G, s, og, lead, bias):
    x = torch.randn(*lead, G * s, dtype=D)
    w1, w2 = torch.randn(G, s, og, dtype=D), torch.randn(G, s, og, dtype=D)
    b1 = torch.randn(G, og, dtype=D) if bias else None
    b2 = torch.randn(G, og, dtype=D) if bias else None
    y = R.gpc_io(x, w1, w2, b1, b2)
    for n in range(G):
        yn = x[..., n * s:(n + 1) * s] @ w1[n] + x[..., n::G] @ w2[n]
        if bias:
            yn = yn + b1[n] + b2[n]
        assert rel_error(y[..., n * og:(n + 1) * og], yn) < 1e-13, n
    # ... which is the block's definition: first(x) + second(interleave(x, step=s))
    composed = R.grouped_linear(x, w1, b1) + R.grouped_linear(R.interleave(x, s), w2, b2)
    assert rel_error(y, composed) < 1e-13


def test_gpc_io_activation():
    x = torch.randn(3, 12, dtype=D)
    w1, w2 = torch.randn(3, 4, 2, dtype=D), torch.randn(3, 4, 2, dtype=D)
    y = R.gpc_io(x, w1, w2, activation=R.signed_square_root1)
    assert rel_error(y, R.signed_square_root1(R.gpc_io(x, w1, w2))) < 1e-14


def test_signed_square_root1_definition():
    # docs/layers.md: sqrt(x) for x > 1, sqrt(-x) (positive) for x < -1, x in between.
    x = torch.tensor([-9.0, -4.0, -2.25, -1.0, -0.5, 0.0, 0.5, 1.0, 2.25, 3.0, 16.0], dtype=D)
    expected = torch.tensor([3.0, 2.0, 1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, math.sqrt(3), 4.0],
                            dtype=D)
    assert torch.equal(R.signed_square_root1(x), expected)


# --------------------------------------------------------------------------------------------
# gpc_block
# --------------------------------------------------------------------------------------------


def _gpc_block_by_spec(x, w1, w2, b1, b2, act):
    G, s, og = w1.shape
    act = act or (lambda t: t)
    h = act(_grouped_linear_loops(x, w1, b1))
    c = h
    if og > 1:
        # interleave with step og, written out: out[a*og + b] = in[b*G + a]
        per = (G * og) // og
        h = torch.stack([h[..., b * per + a] for a in range(per) for b in range(og)], dim=-1)
    if w2 is not None:
        h = act(_grouped_linear_loops(h, w2, b2)) + c
    return h


@pytest.mark.parametrize("G,s,og,second,bias,act", [
    (3, 4, 4, True, False, None),     # in == out: second present
    (2, 6, 3, True, True, None),      # in > out
    (4, 2, 5, False, False, None),    # in < out: no second
    (5, 2, 1, True, True, None),      # og == 1: no interleave
    (3, 1, 4, False, True, R.signed_square_root1),
    (2, 5, 3, True, False, R.signed_square_root1),
])
def test_gpc_block_definition(G, s, og, second, bias, act):
    x = torch.randn(2, 3, G * s, dtype=D)
    w1 = torch.randn(G, s, og, dtype=D)
    w2 = torch.randn(G, og, og, dtype=D) if second else None
    b1 = torch.randn(G, og, dtype=D) if bias else None
    b2 = torch.randn(G, og, dtype=D) if bias and second else None
    y = R.gpc_block(x, w1, w2, b1, b2, activation=act)
    assert y.shape == (2, 3, G * og)
    assert rel_error(y, _gpc_block_by_spec(x, w1, w2, b1, b2, act)) < 1e-13
