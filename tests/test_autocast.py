"""Autocast: like nn.Linear, the grouped layers compute in the autocast dtype, return it, and send
fp32 gradients to fp32 parameters. Outside autocast a dtype mismatch is a TypeError.

CPU: the torch backend under bf16 autocast; the Triton path (interpreter) under fp16 autocast
(the interpreter's bf16 ``tl.dot`` is wrong, docs/numerics.md). CUDA: the Triton path under bf16.
"""
import pytest
import torch

import kphi3_kernels as K
from kphi3_kernels import (GroupedLinear, GroupedLinearFast, GroupedPointwiseConvolutionBlock,
                           GroupedPointwiseConvolutionBlockIO, InterleaveChannelsFast,
                           SignedSquareRoot1)

from _utils import (DEVICE, INTERPRETING, assert_meets_contract, module_reference, rel_error,
                    rounded_intermediate_bound)

MODULES = {
    "fast": lambda b: GroupedLinearFast(15, 21, 3, backend=b),
    "slow": lambda b: GroupedLinear(15, 21, 3, backend=b),
    "io": lambda b: GroupedPointwiseConvolutionBlockIO(240, 400, 48, use_bias=True, backend=b),
    "io-G1": lambda b: GroupedPointwiseConvolutionBlockIO(20, 30, 32, use_bias=True, backend=b),
    "block": lambda b: GroupedPointwiseConvolutionBlock(240, 240, 48, use_bias=True, backend=b),
    "block-in<out": lambda b: GroupedPointwiseConvolutionBlock(15, 21, 5, backend=b),
    # With an activation the non-IO block is composed from the single ops.
    "block-act": lambda b: GroupedPointwiseConvolutionBlock(400, 240, 48, use_bias=True,
                                                            activation=torch.nn.SiLU(), backend=b),
    # The original's SignedSquareRoot1: the identity on [-1, 1] and a square root outside, so
    # nothing cancels in bf16. It jumps at -1 (f(-1) = -1, f(-1 - e) ~ +1): an output whose bf16
    # and float64 pre-activations fell on either side of -1 would differ by ~2; at this scale
    # none do (measured: error 0.9x the plain PyTorch path's).
    "block-ssr1": lambda b: GroupedPointwiseConvolutionBlock(400, 240, 48, use_bias=True,
                                                             activation=SignedSquareRoot1,
                                                             backend=b),
}


def _check_autocast(module, device_type, amp_dtype, lead=(3, 5)):
    module = module.to(device_type)
    params = dict(module.named_parameters())
    x = torch.randn(*lead, module.in_features, device=device_type, requires_grad=True)
    with torch.autocast(device_type, dtype=amp_dtype):
        y = module(x)
        ref_linear = torch.nn.Linear(4, 4).to(device_type)(torch.randn(2, 4, device=device_type))
    assert y.dtype == amp_dtype == ref_linear.dtype  # like nn.Linear under autocast
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params.values()], dy)
    assert x.grad is None
    for (name, p), g in zip([("x", x), *params.items()], grads):
        assert g.dtype == torch.float32 == p.dtype, name  # fp32 gradients for fp32 leaves
        assert torch.isfinite(g).all(), name

    # Oracle: the same function in float64 on the values autocast rounded to amp_dtype.
    x64 = x.detach().to(amp_dtype).double().requires_grad_()
    p64 = {k: v.detach().to(amp_dtype).double().requires_grad_() for k, v in params.items()}
    y64 = module_reference(module, x64, p64)
    grads64 = torch.autograd.grad(y64, [x64, *p64.values()], dy.double())
    # Baseline: the plain PyTorch function computed in amp_dtype.
    xb = x.detach().to(amp_dtype).requires_grad_()
    pb = {k: v.detach().to(amp_dtype).requires_grad_() for k, v in params.items()}
    yb = module_reference(module, xb, pb)
    gradsb = torch.autograd.grad(yb, [xb, *pb.values()], dy)
    names = ["out", "x", *params]
    errs = {n: rel_error(a, r) for n, a, r in zip(names, [y, *grads], [y64, *grads64])}
    base = {n: rel_error(b, r) for n, b, r in zip(names, [yb, *gradsb], [y64, *grads64])}
    rounding = {}
    if _rounds_dxi(module):
        rounding["x"] = rounded_intermediate_bound(amp_dtype, grads64[0],
                                                   _io_second_term(module, x64, p64, dy))
    assert_meets_contract(type(module).__name__, errs, amp_dtype, base, rounding)


def _rounds_dxi(module) -> bool:
    """The grouped IO block on Triton rounds dxi, the input gradient through W2, to the compute
    dtype before adding it (docs/numerics.md, "Rounded intermediates")."""
    return (isinstance(module, GroupedPointwiseConvolutionBlockIO) and module.num_groups > 1
            and module.backend == "triton")


def _io_second_term(module, x64, p64, dy):
    """The IO block's input gradient through W2 alone, in float64."""
    x = x64.detach().requires_grad_()
    p = dict(p64, **{"first_pointwise_conv.weight":
                     torch.zeros_like(p64["first_pointwise_conv.weight"])})
    (dxi,) = torch.autograd.grad(module_reference(module, x, p), [x], dy.double())
    return dxi


@pytest.mark.parametrize("name", list(MODULES))
def test_torch_backend_cpu_bf16_autocast(name):
    _check_autocast(MODULES[name]("torch"), "cpu", torch.bfloat16)


@pytest.mark.skipif(not INTERPRETING, reason="the CPU Triton path needs the interpreter")
@pytest.mark.parametrize("name", ["fast", "io", "block", "block-in<out", "block-act"])
def test_triton_backend_cpu_fp16_autocast(name):
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            pass
    except (RuntimeError, ValueError) as err:  # pragma: no cover - depends on the torch build
        pytest.skip(f"CPU autocast does not accept float16 here: {err}")
    _check_autocast(MODULES[name]("triton"), "cpu", torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fast", "io", "io-G1", "block", "block-act"])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_backend_cuda_autocast(name, amp_dtype):
    _check_autocast(MODULES[name]("triton"), "cuda", amp_dtype)


def test_functional_ops_under_autocast_mixed_input_dtypes():
    """Under autocast the input and the weights may differ in dtype: all go to the autocast dtype."""
    x = torch.randn(4, 15, dtype=torch.float16)
    w = torch.randn(3, 5, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for y in (K.grouped_linear(x, w, backend="torch"), K.gpc_io(x, w, w, backend="torch"),
                  K.gpc_block(x, w, backend="torch"),
                  torch.nn.functional.linear(x, torch.randn(7, 15))):
            assert y.dtype == torch.bfloat16


def test_interleave_keeps_dtype_under_autocast():
    x = torch.randn(3, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = InterleaveChannelsFast(3, 2, backend="torch")(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, x.reshape(3, 3, 4).transpose(1, 2).reshape(3, 12))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dtype_mismatch_outside_autocast_is_type_error(backend):
    module = GroupedPointwiseConvolutionBlockIO(240, 400, 48, backend=backend).to(DEVICE)
    x = torch.randn(2, 240, dtype=torch.float16, device=DEVICE)
    with pytest.raises(TypeError, match="float16 does not match"):
        module(x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=False):
        with pytest.raises(TypeError, match="autocast"):
            module(x)
