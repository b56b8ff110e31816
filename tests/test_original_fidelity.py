"""``SignedSquareRoot1`` and ``InterleaveChannels`` against the original KPhi-3 code
(``src/modeling_kphi3.py`` of github.com/joaopauloschuler/less-parameters-llm), transcribed below
as the original has it: values (special values included), gradients, both backends, non-contiguous
inputs, and blocks built with ``activation=SignedSquareRoot1``."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import kphi3_kernels
from kphi3_kernels import (GroupedPointwiseConvolutionBlock, GroupedPointwiseConvolutionBlockIO,
                           InterleaveChannels, InterleaveChannelsFast, SignedSquareRoot1)
from kphi3_kernels import reference as R

from _utils import DEVICE, FP32_TOL, rel_error

BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------------------
# The original, transcribed (src/modeling_kphi3.py)
# --------------------------------------------------------------------------------------------


def original_signed_square_root1(x):
    """
    Custom activation function that implements:
    f(x) = sqrt(x)     for x > 1
    f(x) = sqrt(-x)    for x < -1
    f(x) = x           for -1 ≤ x ≤ 1
    """
    return torch.where(x > 1,
      torch.sqrt(x),
      torch.where(x < -1, torch.sqrt(-x), x)
    )


class OriginalInterleaveChannels(nn.Module):
    """
    This layer interleaves channels stepping according to the number passed as parameter.
    This layer assumes "channel last".
    """
    def __init__(self, step_size=2, last_dim=3):
        super().__init__()
        self.step_size = step_size if step_size >= 2 else 1
        self.last_dim = last_dim

    def forward(self, x):
      if (self.last_dim==3):
        return torch.cat([x[:, :, :, shift_pos::self.step_size] for shift_pos in range(self.step_size)], dim=3)
      else:
        if (self.last_dim==2):
          return torch.cat([x[:, :, shift_pos::self.step_size] for shift_pos in range(self.step_size)], dim=2)


def sliced_interleave_last_dim(x, step):
    """The original's slicing, on the last dimension of an input of any rank."""
    return torch.cat([x[..., k::step] for k in range(step)], dim=-1)


# --------------------------------------------------------------------------------------------
# SignedSquareRoot1: values
# --------------------------------------------------------------------------------------------

INF, NAN = math.inf, math.nan
SPECIAL = [2.25, -4.0, -2.25, 1.0, -1.0, 0.0, -0.0, 0.5, -0.5, 0.999, -0.999, 1.001, -1.001,
           16.0, -16.0, 1e30, -1e30, 1e-30, -1e-30, INF, -INF, NAN, -NAN]


def _same_values(a, b):
    """Equal bit for bit where it matters: values, NaN positions and the sign of zeros."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    keep = ~torch.isnan(a)
    assert torch.equal(a[keep], b[keep])
    assert torch.equal(torch.signbit(a[keep]), torch.signbit(b[keep]))


def test_signed_square_root1_is_a_plain_function():
    assert not isinstance(SignedSquareRoot1, type)
    assert kphi3_kernels.SignedSquareRoot1 is SignedSquareRoot1
    # The class form of earlier versions is gone: calling it with no argument is a TypeError.
    with pytest.raises(TypeError, match="SignedSquareRoot1"):
        SignedSquareRoot1()


def test_signed_square_root1_named_values():
    x = torch.tensor([2.25, -4.0, 1.0, -1.0, 0.5, -0.5, 9.0, -9.0], dtype=torch.float64)
    expected = torch.tensor([1.5, 2.0, 1.0, -1.0, 0.5, -0.5, 3.0, 3.0], dtype=torch.float64)
    assert torch.equal(SignedSquareRoot1(x), expected)
    y = SignedSquareRoot1(torch.tensor([NAN, -0.0, 0.0, INF, -INF]))
    assert torch.isnan(y[0])
    assert y[1] == 0 and torch.signbit(y[1])       # -0.0 stays -0.0
    assert y[2] == 0 and not torch.signbit(y[2])
    assert y[3] == INF and y[4] == INF            # sqrt(-x) for x < -1 is positive


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_signed_square_root1_equals_the_original(dtype):
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(500) * 4,
                   torch.linspace(-1.01, 1.01, 203)]).to(dtype)
    # The neighbours of +-1 in this dtype: the first inputs of each square-root branch.
    eps = torch.finfo(dtype).eps
    edges = torch.tensor([1 + eps, 1 - eps / 2, -1 - eps, -1 + eps / 2], dtype=torch.float64)
    assert edges.to(dtype).abs().ne(1).all()
    x = torch.cat([x, edges.to(dtype)])
    _same_values(SignedSquareRoot1(x), original_signed_square_root1(x))
    _same_values(R.signed_square_root1(x), original_signed_square_root1(x))


def test_signed_square_root1_any_shape_and_layout():
    base = torch.randn(4, 6, 8) * 3
    for x in (base, base.transpose(0, 2), base[..., ::3], base[:1].expand(5, 6, 8),
              torch.tensor(2.25)):
        _same_values(SignedSquareRoot1(x), original_signed_square_root1(x))


# --------------------------------------------------------------------------------------------
# SignedSquareRoot1: gradients
# --------------------------------------------------------------------------------------------


def _derivative_by_branch(x):
    """d/dx of the original's formula, branch by branch: 1/(2 sqrt(x)), -1/(2 sqrt(-x)), 1."""
    return torch.where(x > 1, 0.5 / torch.sqrt(x.clamp(min=1)),
                       torch.where(x < -1, -0.5 / torch.sqrt((-x).clamp(min=1)),
                                   torch.ones_like(x)))


def test_the_original_formula_has_nan_gradients_everywhere():
    """Why the package does not differentiate the literal expression: the branch not taken still
    takes sqrt of negative numbers, and the zero gradient through that NaN is NaN."""
    x = torch.tensor([2.25, -4.0, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    original_signed_square_root1(x).sum().backward()
    assert torch.isnan(x.grad).all()


def test_signed_square_root1_gradient_is_the_branch_derivative():
    x = torch.tensor([2.25, -4.0, 0.5, -0.5, 0.0, -0.0, 1.0, -1.0, 4.0, -9.0, INF, -INF],
                     dtype=torch.float64, requires_grad=True)
    SignedSquareRoot1(x).sum().backward()
    expected = torch.tensor([1 / 3, -0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25, -1 / 6, 0.0, -0.0],
                            dtype=torch.float64)
    assert torch.equal(x.grad, expected)
    x = (torch.randn(300, dtype=torch.float64) * 4).requires_grad_()
    dy = torch.randn_like(x)
    (g,) = torch.autograd.grad(SignedSquareRoot1(x), x, dy)
    assert torch.allclose(g, dy * _derivative_by_branch(x.detach()), rtol=1e-15, atol=0)


def test_signed_square_root1_gradient_at_nan_input_stays_finite_elsewhere():
    x = torch.tensor([NAN, 2.25, -4.0, 0.5], dtype=torch.float64, requires_grad=True)
    SignedSquareRoot1(x).sum().backward()
    assert torch.equal(x.grad[1:], torch.tensor([1 / 3, -0.25, 1.0], dtype=torch.float64))


def test_signed_square_root1_gradcheck():
    # Inputs in each branch, away from the jump at -1 and the kink at 1 (finite differences).
    torch.manual_seed(0)
    parts = [torch.rand(8) * 0.9 + 1.05, -(torch.rand(8) * 3 + 1.05), torch.rand(8) * 1.8 - 0.9,
             torch.tensor([20.0, -20.0, 0.0])]
    x = torch.cat(parts).double().requires_grad_()
    assert torch.autograd.gradcheck(SignedSquareRoot1, (x,))
    assert torch.autograd.gradgradcheck(SignedSquareRoot1, (x,))


def test_signed_square_root1_compiles_fullgraph():
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(64) * 3])
    torch._dynamo.reset()
    compiled = torch.compile(SignedSquareRoot1, fullgraph=True, backend="eager")
    _same_values(compiled(x), original_signed_square_root1(x))


# --------------------------------------------------------------------------------------------
# Blocks with activation=SignedSquareRoot1
# --------------------------------------------------------------------------------------------

BLOCKS = {
    # name: (constructor(backend), in_features)
    "io-G4": (lambda b: GroupedPointwiseConvolutionBlockIO(12, 16, 3, use_bias=True,
                                                           activation=SignedSquareRoot1, backend=b),
              12),
    "io-G1": (lambda b: GroupedPointwiseConvolutionBlockIO(12, 16, 32, use_bias=True,
                                                           activation=SignedSquareRoot1, backend=b),
              12),
    "block-G4": (lambda b: GroupedPointwiseConvolutionBlock(16, 12, 4, use_bias=True,
                                                            activation=SignedSquareRoot1, backend=b),
                 16),
    "block-in<out": (lambda b: GroupedPointwiseConvolutionBlock(12, 16, 3,
                                                                activation=SignedSquareRoot1,
                                                                backend=b), 12),
}


def _plain_composition(block, x, p, act):
    """The block's function written out with reference.py and ``act`` as its activation."""
    if block.num_groups == 1:
        return act(torch.nn.functional.linear(x, p["first_pointwise_conv.group_layers.0.weight"],
                                              p.get("first_pointwise_conv.group_layers.0.bias")))
    args = (x, p["first_pointwise_conv.weight"], p.get("second_pointwise_conv.weight"),
            p.get("first_pointwise_conv.bias"), p.get("second_pointwise_conv.bias"))
    if isinstance(block, GroupedPointwiseConvolutionBlockIO):
        return R.gpc_io(*args, activation=act)
    return R.gpc_block(*args, activation=act)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_with_signed_square_root1_matches_plain_composition(name, backend):
    make, cin = BLOCKS[name]
    block = make(backend).to(DEVICE)
    assert block.activation is SignedSquareRoot1
    x = (torch.randn(2, 3, cin, device=DEVICE) * 3).requires_grad_()
    params = dict(block.named_parameters())
    y = block(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params.values()], dy)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    # Values: the original's own formula as the activation.
    with torch.no_grad():
        y_original = _plain_composition(block, x64, p64, original_signed_square_root1)
    assert rel_error(y, y_original) < FP32_TOL
    # Gradients: the same composition with the package's function (the original's are NaN).
    y64 = _plain_composition(block, x64, p64, SignedSquareRoot1)
    assert torch.equal(y64, y_original)
    grads64 = torch.autograd.grad(y64, [x64, *p64.values()], dy.double())
    errs = {n: rel_error(g, g64) for n, g, g64 in zip(["x", *params], grads, grads64)}
    assert all(e < FP32_TOL for e in errs.values()), errs
    assert all(torch.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------------
# InterleaveChannels
# --------------------------------------------------------------------------------------------


def test_interleave_channels_constructor_like_the_original():
    for step, expected in [(2, 2), (3, 3), (1, 1), (0, 1), (-1, 1), (-5, 1), (np.int64(4), 4)]:
        ours, original = InterleaveChannels(step, 2), OriginalInterleaveChannels(step, 2)
        assert ours.step_size == original.step_size == expected
        assert type(ours.step_size) is int
    m = InterleaveChannels()
    assert (m.step_size, m.last_dim, m.backend) == (2, 3, None)
    assert repr(InterleaveChannels(3, 2)) == "InterleaveChannels(step_size=3, last_dim=2)"
    assert "InterleaveChannels" in kphi3_kernels.__all__
    assert list(InterleaveChannels(3).parameters()) == []


CASES_3D = [((2, 5, 12), 3), ((2, 5, 12), 2), ((1, 3, 12), 12), ((3, 4, 10), 5), ((2, 2, 7), 7),
            ((2, 2, 6), 1), ((2, 2, 6), 0), ((2, 2, 6), -3)]
CASES_4D = [((2, 3, 4, 30), 5), ((2, 3, 4, 30), 6), ((1, 2, 3, 8), 2), ((1, 2, 3, 8), 1)]


def _check_against(module, original, x):
    """Forward and the input gradient of ``module`` against ``original`` (exact: a permutation)."""
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y_original = module(x1), original(x2)
    assert torch.equal(y, y_original)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_original.backward(dy)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,step", CASES_3D, ids=[f"{s}-step{k}" for s, k in CASES_3D])
def test_interleave_channels_3d_equals_the_original(shape, step, backend):
    x = torch.randn(*shape, device=DEVICE)
    _check_against(InterleaveChannels(step, 2, backend=backend),
                   OriginalInterleaveChannels(step, 2), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,step", CASES_4D, ids=[f"{s}-step{k}" for s, k in CASES_4D])
def test_interleave_channels_4d_equals_the_original(shape, step, backend):
    x = torch.randn(*shape, device=DEVICE)
    _check_against(InterleaveChannels(step, 3, backend=backend),
                   OriginalInterleaveChannels(step, 3), x)


def _non_contiguous(kind):
    base = torch.randn(4, 6, 3, 24, device=DEVICE)
    if kind == "sliced":
        return base[..., ::2]                     # channel stride 2
    if kind == "transposed":
        return base.transpose(0, 2)               # leading dims swapped in memory
    if kind == "channels-outermost":
        return torch.randn(24, 3, 6, 4, device=DEVICE).permute(3, 2, 1, 0)  # channel stride 72
    if kind == "expanded":
        return base[:1, :1].expand(3, 6, 3, 24)   # row stride 0
    raise ValueError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sliced", "transposed", "channels-outermost", "expanded"])
def test_interleave_channels_non_contiguous(kind, backend):
    x = _non_contiguous(kind)
    assert not x.is_contiguous()
    _check_against(InterleaveChannels(4, 3, backend=backend), OriginalInterleaveChannels(4, 3), x)
    _check_against(InterleaveChannels(3, 2, backend=backend), OriginalInterleaveChannels(3, 2),
                   x[:, 0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(12,), (5, 12), (2, 1, 2, 3, 12)])
def test_interleave_channels_other_ranks_act_on_the_last_dimension(shape, backend):
    # The original indexes dimension last_dim (3-D / 4-D inputs only); here any rank's last dim.
    x = torch.randn(*shape, device=DEVICE)
    for last_dim in (2, 3):
        _check_against(InterleaveChannels(3, last_dim, backend=backend),
                       lambda t: sliced_interleave_last_dim(t, 3), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleave_channels_is_interleave_channels_fast_of_c_over_step(backend):
    x = torch.randn(2, 3, 24, device=DEVICE)
    for step in (2, 3, 4, 6, 8):
        ours = InterleaveChannels(step, 2, backend=backend)(x)
        assert torch.equal(ours, InterleaveChannelsFast(24 // step, 2, backend=backend)(x))
        # ... and the inverse permutation of InterleaveChannelsFast(step).
        assert torch.equal(InterleaveChannelsFast(step, 2, backend=backend)(ours), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleave_channels_runs_the_interleave_operator(backend, monkeypatch):
    from _utils import spy_impls

    calls = spy_impls(monkeypatch)
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    InterleaveChannels(3, 2, backend=backend)(x).sum().backward()
    assert calls and {b for b, _ in calls} == {backend}
    assert {n for _, n in calls} == {"interleave_fwd"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleave_channels_gradcheck(backend):
    x = torch.randn(2, 3, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(InterleaveChannels(3, 2, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_interleave_channels_dtypes(dtype, backend):
    x = torch.randn(2, 3, 4, 12, device=DEVICE).to(dtype)
    _check_against(InterleaveChannels(4, 3, backend=backend), OriginalInterleaveChannels(4, 3), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [1, 2, 5])
def test_interleave_channels_zero_channels_and_zero_rows(step, backend):
    x = torch.randn(2, 3, 0, device=DEVICE)
    _check_against(InterleaveChannels(step, 2, backend=backend),
                   OriginalInterleaveChannels(step, 2), x)
    x = torch.randn(0, 3, 10, device=DEVICE)
    _check_against(InterleaveChannels(step, 2, backend=backend),
                   OriginalInterleaveChannels(step, 2), x)


def test_interleave_channels_on_meta_tensors():
    with torch.device("meta"):
        m = InterleaveChannels(3, 2)
    x = torch.empty(2, 5, 12, device="meta", requires_grad=True)
    y = m(x)
    assert y.is_meta and y.shape == x.shape
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleave_channels_compiles_fullgraph(backend):
    m = InterleaveChannels(4, 2, backend=backend).to(DEVICE)
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(y, sliced_interleave_last_dim(x.detach(), 4))
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(g, torch.ones_like(x))


@pytest.mark.parametrize("cls", [GroupedPointwiseConvolutionBlockIO, GroupedPointwiseConvolutionBlock])
def test_a_block_left_dense_by_the_group_rule_warns_and_stays_dense(cls):
    """1283 and 3840 share no divisor in 2..5 (1283 // 256): the original makes the block dense,
    and so do we, with a warning, since the caller asked for groups of 256."""
    with pytest.warns(UserWarning, match=r"\(1283, 3840, min_channels_per_group=256\) is dense"):
        block = cls(1283, 3840, 256)
    assert block.num_groups == 1 and hasattr(block, "first_pointwise_conv")
    assert not hasattr(block, "second_pointwise_conv")


@pytest.mark.parametrize("sizes", [(1280, 3840, 256), (48, 96, 200), (48, 96, -1), (7, 5, 7)])
def test_no_warning_where_the_rule_groups_or_grouping_was_not_asked_for(sizes, recwarn):
    GroupedPointwiseConvolutionBlockIO(*sizes)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
