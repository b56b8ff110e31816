"""The autograd contract of the grouped ops, on both backends (Triton through its interpreter on
CPU): gradients of any order keep a graph and match the float64 reference (a gradient penalty
trains like the reference), the IO block's two bias gradients are two tensors, and the non-IO
block without a second weight hands out an output that may be modified in place."""
import pytest
import torch

import kphi3_kernels as K
from kphi3_kernels import (GroupedLinearFast, GroupedPointwiseConvolutionBlock,
                           GroupedPointwiseConvolutionBlockIO)
from kphi3_kernels import reference as R

from _utils import (DEVICE, FP32_TOL, Case, call_package, call_reference, interleave_case,
                    make_operands, module_reference, reference_operands, rel_error)

BACKENDS = ["torch", "triton"]
FP64_TOL = 1e-12  # float64 against the float64 reference: rounding only
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]

# Tiny shapes: the interpreter runs every program in Python.
CASES = [
    ("grouped_linear", Case(3, 4, 5, (5,))),
    ("grouped_linear", Case(1, 6, 4, (2, 3), layout="sliced", bias=False)),
    ("gpc_io", Case(3, 4, 5, (5,))),
    ("gpc_io", Case(4, 3, 2, (2, 3), layout="transposed", bias=False)),
    ("gpc_block", Case(3, 4, 5, (5,))),                  # with the second weight
    ("gpc_block", Case(4, 3, 5, (5,), second=False)),    # in < out: no second weight
    ("interleave", interleave_case(12, 3, (5,))),
]


def _tol(dtype):
    return FP32_TOL if dtype == torch.float32 else FP64_TOL


def _penalty_grads(y_of, targets, dy, directions):
    """d/d(targets) of sum_i <g_i, r_i> + |g_i|^2, with g the gradients of <y, dy> (graphs kept).

    Also returns which first-order gradients have a graph."""
    y = y_of()
    grads = torch.autograd.grad(y, targets, dy, create_graph=True, allow_unused=True)
    penalty = 0
    for g, r in zip(grads, directions):
        if g is not None:
            penalty = penalty + (g * r).sum() + (g * g).sum()
    has_graph = [g is not None and g.grad_fn is not None for g in grads]
    if not any(has_graph):  # a linear map (interleave): the gradient is constant
        return [None] * len(targets), has_graph
    return torch.autograd.grad(penalty, targets, allow_unused=True), has_graph


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,case", [pytest.param(o, c, id=f"{o}-{c.id}") for o, c in CASES])
def test_double_backward_matches_float64_reference(op, case, dtype, backend):
    ops = make_operands(op, case, dtype)
    targets = [t for _, t in ops.grad_targets()]
    y_shape = call_reference(op, ops, ops.x.detach(), {k: None if v is None else v.detach()
                                                       for k, v in ops.params.items()}).shape
    dy = torch.randn(y_shape, device=DEVICE, dtype=dtype)
    directions = [torch.randn_like(t) for t in targets]

    second, graphs = _penalty_grads(
        lambda: call_package(op, ops, ops.x, ops.params, backend), targets, dy, directions)
    x64, p64, t64 = reference_operands(ops, torch.float64)
    second64, graphs64 = _penalty_grads(lambda: call_reference(op, ops, x64, p64), t64,
                                        dy.double(), [r.double() for r in directions])
    # Never a graph-less gradient where the gradient depends on an input that requires grad.
    assert all(ours or not ref for ours, ref in zip(graphs, graphs64)), (graphs, graphs64)
    names = [n for n, _ in ops.grad_targets()]
    for name, g, g64, t in zip(names, second, second64, targets):
        g = torch.zeros_like(t) if g is None else g
        g64 = torch.zeros_like(t, dtype=torch.float64) if g64 is None else g64
        assert g.dtype == dtype and g.shape == t.shape, name
        assert rel_error(g, g64) < _tol(dtype), (name, rel_error(g, g64))


def test_grouped_linear_input_gradient_has_a_graph():
    """The issue's example: gx with create_graph is differentiable, on both backends."""
    for backend in BACKENDS:
        x = torch.randn(5, 12, device=DEVICE, requires_grad=True)
        w = torch.randn(3, 4, 2, device=DEVICE, requires_grad=True)
        (gx,) = torch.autograd.grad(K.grouped_linear(x, w, backend=backend).sum(), x,
                                    create_graph=True)
        assert gx.grad_fn is not None
        (gw,) = torch.autograd.grad(gx.square().sum(), w)
        w64 = w.detach().double().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        (gx64,) = torch.autograd.grad(R.grouped_linear(x64, w64).sum(), x64, create_graph=True)
        (gw64,) = torch.autograd.grad(gx64.square().sum(), w64)
        assert rel_error(gw, gw64) < FP32_TOL, backend


TRAIN_MODULES = {
    "fast": lambda b: GroupedLinearFast(12, 15, 3, bias=True, backend=b),
    "io": lambda b: GroupedPointwiseConvolutionBlockIO(12, 15, 4, use_bias=True, backend=b),
    "block": lambda b: GroupedPointwiseConvolutionBlock(12, 12, 4, use_bias=True, backend=b),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(TRAIN_MODULES))
def test_gradient_penalty_trains_like_the_reference(kind, backend):
    """Three SGD steps on ``|y - t|^2 + |d loss/dx|^2``; the parameters follow the float64 oracle."""
    module = TRAIN_MODULES[kind](backend).to(DEVICE)
    ref = {k: v.detach().double().clone().requires_grad_() for k, v in module.named_parameters()}
    x = torch.randn(6, 12, device=DEVICE)
    target = torch.randn(6, module.out_features, device=DEVICE)
    params = dict(module.named_parameters())
    lr = 0.05

    def loss_of(y_of, x):
        x = x.detach().requires_grad_()
        fit = (y_of(x) - target.to(x.dtype)).square().sum()
        (gx,) = torch.autograd.grad(fit, x, create_graph=True)
        return fit + gx.square().sum()

    for _ in range(3):
        loss = loss_of(module, x)
        grads = torch.autograd.grad(loss, list(params.values()))
        loss64 = loss_of(lambda x: module_reference(module, x, ref), x.double())
        grads64 = torch.autograd.grad(loss64, list(ref.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= lr * g
            for p, g in zip(ref.values(), grads64):
                p -= lr * g
    for name, p in params.items():
        assert rel_error(p, ref[name]) < FP32_TOL, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpc_io_bias_gradients_are_two_tensors(backend):
    x = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    w1, w2 = (torch.randn(3, 4, 2, device=DEVICE, requires_grad=True) for _ in range(2))
    b1, b2 = (torch.randn(3, 2, device=DEVICE, requires_grad=True) for _ in range(2))
    K.gpc_io(x, w1, w2, b1, b2, backend=backend).sum().backward()
    assert b1.grad is not b2.grad
    assert b1.grad.data_ptr() != b2.grad.data_ptr()
    assert torch.equal(b1.grad, b2.grad)
    b1.grad.zero_()  # an optimizer updating one in place leaves the other alone
    assert torch.equal(b2.grad, torch.full_like(b2.grad, 5.0))
    gb1, gb2 = torch.autograd.grad(K.gpc_io(x, w1, w2, b1, b2, backend=backend).sum(), [b1, b2])
    assert not torch._C._is_alias_of(gb1, gb2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpc_block_without_second_weight_output_can_be_modified_in_place(backend):
    x = torch.randn(5, 12, device=DEVICE, requires_grad=True)
    w1 = torch.randn(3, 4, 5, device=DEVICE, requires_grad=True)
    b1 = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    y = K.gpc_block(x, w1, None, b1, backend=backend)
    y.relu_()
    y.sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w1, b1))
    y64 = R.gpc_block(x64, w64, None, b64)
    y64.relu_()
    y64.sum().backward()
    assert rel_error(y, y64) < FP32_TOL
    for t, t64 in ((x, x64), (w1, w64), (b1, b64)):
        assert rel_error(t.grad, t64.grad) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_without_second_weight_relu_inplace(backend):
    block = GroupedPointwiseConvolutionBlock(12, 15, 4, use_bias=True, backend=backend).to(DEVICE)
    assert not hasattr(block, "second_pointwise_conv")
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    y = block(x)
    y.relu_()
    y.sum().backward()
    p64 = {k: v.detach().double() for k, v in block.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    module_reference(block, x64, p64).relu().sum().backward()
    assert rel_error(x.grad, x64.grad) < FP32_TOL
