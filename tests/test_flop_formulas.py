"""``torch.utils.flop_counter`` counts the kphi3 operators: each op's grouped GEMMs, forward and
every gradient, on both backends' operators, on real and on meta tensors."""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import kphi3_kernels as K
from kphi3_kernels.ops import custom_ops, flops

M, G, S, OG = 7, 4, 10, 6
GEMM = 2 * M * G * S * OG  # one [G, s, og] grouped GEMM over M rows


def count(fn, *tensors):
    with FlopCounterMode(display=False) as counter:
        fn(*tensors).sum().backward()
    return counter.get_total_flops()


def params(*shapes, device="cpu", grad=(True,)):
    grads = list(grad) + [grad[-1]] * (len(shapes) - len(grad))
    return [torch.randn(shape, device=device).requires_grad_(g) for shape, g in zip(shapes, grads)]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_gpc_io_forward_and_every_gradient(device):
    x, w1, w2 = params((M, G * S), (G, S, OG), (G, S, OG), device=device)
    # forward 2 GEMMs; backward dx 2, dW1 1, dW2 1
    assert count(lambda *t: K.gpc_io(*t, backend="torch"), x, w1, w2) == 6 * GEMM


def test_gradients_not_asked_for_are_not_counted():
    x, w1, w2 = params((M, G * S), (G, S, OG), (G, S, OG), grad=(False, False, True))
    assert count(lambda *t: K.gpc_io(*t, backend="torch"), x, w1, w2) == 3 * GEMM
    x, w = params((M, G * S), (G, S, OG), grad=(True, False))
    assert count(lambda *t: K.grouped_linear(*t, backend="torch"), x, w) == 2 * GEMM


def test_gpc_block_with_and_without_the_second_gemm():
    # in >= out: og = s, so W2 is [G, og, og]; its GEMMs count like the first's
    x, w1, w2 = params((M, G * OG), (G, OG, OG), (G, OG, OG))
    gemm = 2 * M * G * OG * OG
    # forward 2; backward dy @ W2^T, dW2, dx, dW1
    assert count(lambda *t: K.gpc_block(*t, backend="torch"), x, w1, w2) == 6 * gemm
    x, w1 = params((M, G * S), (G, S, OG))
    assert count(lambda *t: K.gpc_block(*t, backend="torch"), x, w1) == 3 * GEMM


def test_interleave_counts_no_flops():
    (x,) = params((M, 12))
    assert count(lambda t: K.interleave(t, 3, backend="torch"), x) == 0


def test_every_operator_of_every_backend_has_a_formula():
    registry = torch.utils.flop_counter.flop_registry
    for name in flops.FORMULAS:
        for backend in custom_ops.BACKENDS:
            assert custom_ops.op(name, backend) in registry, (name, backend)


needs_triton = pytest.mark.skipif(
    not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
# Every fused function on both backends: each is one operator whose formula counts it (the
# torch backend's operators are opaque to the counter, as the op-level ones).
FUSED_CASES = [
    pytest.param(call, backend, id=f"{call}-{backend}",
                 marks=[needs_triton] if backend == "triton" else [])
    for call in ("silu_mul_gpc_io", "rms_norm_gpc_io-split", "rms_norm_gpc_io-block-residue",
                 "gpc_io_from_layout")
    for backend in ("torch", "triton")]


@pytest.mark.parametrize("call,backend", FUSED_CASES)
def test_the_fused_operators_count_the_io_blocks_gemms(call, backend):
    """The fused decoder's operators count what the op-level IO block counts, forward and every
    gradient (the layout's padding and the elementwise norm and activation add none), on the
    Triton operators as on the torch composition."""
    from kphi3_kernels import fused

    x, nw, w1, w2 = params((M, G * S), (G * S,), (G, S, OG), (G, S, OG))
    gu = torch.randn(M, 2 * G * S).requires_grad_(True)
    t = fused.silu_mul_to_layout(gu.detach(), G, backend="torch").requires_grad_(True)
    fns = {
        "silu_mul_gpc_io": lambda: fused.silu_mul_gpc_io(gu, w1, w2, backend=backend),
        "rms_norm_gpc_io-split": lambda: fused.rms_norm_gpc_io(
            x, nw, 1e-5, w1, w2, layout="split", backend=backend),
        "rms_norm_gpc_io-block-residue": lambda: fused.rms_norm_gpc_io(
            x, nw, 1e-5, w1, w2, layout="block-residue", backend=backend),
        "gpc_io_from_layout": lambda: fused.gpc_io_from_layout(t, w1, w2, backend=backend),
    }
    # forward 2 GEMMs; backward the input gradient 2, dW1 1, dW2 1
    assert count(fns[call]) == 6 * GEMM


def test_every_fused_operator_has_a_formula():
    from kphi3_kernels.ops import registry

    fused = {n for n, spec in registry.OPERATORS.items() if spec.family == "fused"}
    assert set(flops.FUSED_FORMULAS) == fused
    registry_ = torch.utils.flop_counter.flop_registry
    for name in fused:
        for backend in registry.BACKENDS:
            assert registry.op(name, backend) in registry_, (name, backend)
