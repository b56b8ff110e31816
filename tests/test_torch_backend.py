"""The torch backend (``ops/torch_impl.py``): its intermediate-precision rule, bias-gradient sums,
and parity with the float64 oracle at every M, group count, layout and rank.

Outputs are NaN-poisoned by conftest (``outputs.POISON``), so an element a launcher forgets to
write fails parity.
"""
import math

import pytest
import torch

import kphi3_kernels
from kphi3_kernels import reference as R
from kphi3_kernels.ops import torch_impl

from _utils import (Case, assert_meets_contract, check_op, make_input, make_operands,
                    make_weight, rel_error, run_package, run_reference)

OPS = ["grouped_linear", "gpc_io", "gpc_block"]
FP64_TOL = 1e-12


# --------------------------------------------------------------------------------------------
# Parity with the float64 oracle
# --------------------------------------------------------------------------------------------


def _check_fp64(op: str, case: Case) -> None:
    """Output and every gradient of the torch backend in float64 against the reference in float64."""
    ops = make_operands(op, case, torch.float64)
    out_shape = run_reference(op, ops, torch.float64, None)[0].shape
    dy = torch.randn(out_shape, dtype=torch.float64)
    y, grads = run_package(op, ops, "torch", dy)
    y64, grads64 = run_reference(op, ops, torch.float64, dy)
    names = ["out"] + [n for n, _ in ops.grad_targets()]
    errs = {n: rel_error(a, b) for n, a, b in zip(names, [y] + grads, [y64] + grads64)}
    assert all(e < FP64_TOL for e in errs.values()), errs


@pytest.mark.parametrize("G", [1, 2, 3, 5, 20])
@pytest.mark.parametrize("op", OPS)
def test_group_counts(op, G):
    """3-D inputs through the functional API, fp32 and float64, every group count the shapes use."""
    second = not (op == "gpc_block" and G == 3)
    case = Case(G, 6, 4 if op != "gpc_block" else 6, (2, 3), "contig", True, second=second)
    check_op(op, make_operands(op, case, torch.float32), "torch", torch.float32)
    _check_fp64(op, case)


# M across the old regime boundary (256) and around powers of two; every layout the API accepts.
@pytest.mark.parametrize("M", [1, 2, 16, 255, 256, 257, 300])
@pytest.mark.parametrize("op", OPS)
def test_rows(op, M):
    for case in (Case(5, 7, 9, (M,), "sliced", True),
                 Case(3, 5, 4, (M,), "transposed", False, weight_t=True),
                 Case(20, 3, 2, (M,), "expanded", True)):
        check_op(op, make_operands(op, case, torch.float32), "torch", torch.float32)


@pytest.mark.parametrize("layout", ["contig", "sliced", "transposed", "expanded"])
@pytest.mark.parametrize("op", OPS)
def test_float64_oracle(op, layout):
    """float64 stays float64 all the way (products, biases, bias gradients)."""
    _check_fp64(op, Case(5, 4, 3, (3, 7), layout, True, weight_t=layout == "transposed"))
    if op == "gpc_block":
        _check_fp64(op, Case(5, 4, 6, (2, 9), layout, True, second=False))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", [3, 300])
@pytest.mark.parametrize("op", OPS)
def test_half_dtypes(op, M, dtype):
    for case in (Case(5, 8, 6, (M,), "sliced", True), Case(2, 4, 4, (1, M), "transposed", True)):
        check_op(op, make_operands(op, case, dtype), "torch", dtype)


# --------------------------------------------------------------------------------------------
# The IO block's forward paths: one GEMM of K = 2s on [x_n | x[:, n::G]] (writing y in place in
# fp32 / fp64, into an fp32 buffer in half dtypes) past the shape rule, two GEMMs of K = s below
# --------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


@pytest.fixture(params=["joint", "two"])
def io_path(request, monkeypatch):
    """Forces the forward's path at every shape."""
    joint = request.param == "joint"
    monkeypatch.setattr(torch_impl, "_io_joint", lambda M, s, og: joint)
    return request.param


def _check_io(case: Case, dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        _check_fp64("gpc_io", case)
    else:
        check_op("gpc_io", make_operands("gpc_io", case, dtype), "torch", dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("G,s,og", [(1, 6, 5), (2, 3, 7), (3, 5, 4), (5, 7, 9), (20, 3, 2)])
def test_io_paths(io_path, dtype, G, s, og):
    """Forward and every gradient of both paths, through the API, every dtype, odd sizes,
    non-contiguous inputs and weights, no rows and one row, with and without biases."""
    for M, layout, bias, weight_t in ((0, "contig", True, False), (1, "sliced", True, False),
                                      (1, "contig", False, True), (37, "transposed", False, False),
                                      (37, "expanded", True, True)):
        _check_io(Case(G, s, og, (M,), layout, bias, weight_t=weight_t), dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_io_shape_rule(monkeypatch, dtype):
    """The joint GEMM from M = 4s rows on, for groups of at least JOINT_MIN_OG outputs: both
    sides of each bound, in every dtype, against the oracle."""
    calls = []
    concat = torch_impl._joint_weights
    monkeypatch.setattr(torch_impl, "_joint_weights", lambda *a: calls.append(1) or concat(*a))
    G, s, wide = 2, 5, torch_impl.JOINT_MIN_OG
    for M, og in ((1, wide), (4 * s - 1, wide), (4 * s, wide), (4 * s, wide - 1)):
        calls.clear()
        _check_io(Case(G, s, og, (M,), "sliced", True), dtype)
        joint = M >= 4 * s and og >= wide
        assert torch_impl._io_joint(M, s, og) == joint
        assert len(calls) == (1 if joint else 0), (M, og, calls)  # one concat, in the forward


def _io_operands(G, s, og, M, dtype):
    x = make_input((M,), G * s, dtype, "sliced").detach()
    w1, w2 = (make_weight(G, s, og, dtype).detach() for _ in range(2))
    b1, b2 = (torch.randn(G, og).to(dtype) for _ in range(2))
    return x, w1, w2, b1, b2


def _io_errors(got, want, needs=(True,) * 5):
    """Errors by gradient index of the results that were asked for."""
    return {n: rel_error(g, w) for n, (g, w, need) in enumerate(zip(got, want, needs)) if need}


def _assert_io_contract(what, errs, plain_errs, dtype):
    """float64 under FP64_TOL; fp32 / fp16 / bf16 the contract, against the plain path."""
    if dtype == torch.float64:
        assert all(e < FP64_TOL for e in errs.values()), (what, errs)
    else:
        assert_meets_contract(what, errs, dtype, plain_errs)


def _storages(ts):
    return [t.untyped_storage().data_ptr() for t in ts if t is not None and t.numel()]


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("M", [0, 1, 37])
@pytest.mark.parametrize("G,s,og", [(1, 6, 5), (5, 7, 9), (20, 3, 2)])
def test_io_launchers_with_and_without_xi(io_path, dtype, M, G, s, og):
    """The launchers themselves: the forward's xi follows io_saves_xi (empty, or the
    de-interleaved input, contiguous, in x's dtype); the backward gives every subset of the
    gradients from an empty xi and from a given one; no output aliases an input or another."""
    x, w1, w2, b1, b2 = _io_operands(G, s, og, M, dtype)
    dy = torch.randn(M, G * og).to(dtype)
    x64, w164, w264, b164, b264 = (t.to(torch.float64, copy=True).requires_grad_()
                                   for t in (x, w1, w2, b1, b2))
    y64 = R.gpc_io(x64, w164, w264, b164, b264)
    want = torch.autograd.grad(y64, [x64, w164, w264, b164, b264], dy.double())
    # The plain PyTorch path: reference.py in the same dtype.
    plain = [t.detach().requires_grad_() for t in (x, w1, w2, b1, b2)]
    y_plain = R.gpc_io(*plain)
    plain_y_err = {"y": rel_error(y_plain, y64)}
    plain_errs = _io_errors(torch.autograd.grad(y_plain, plain, dy), want)
    deinterleaved = R.interleave(x, s).contiguous()
    for save_xi in (False, True):
        y, xi = torch_impl.gpc_io_fwd(x, w1, w2, b1, b2, save_xi)
        assert y.dtype == dtype
        _assert_io_contract("forward", {"y": rel_error(y, y64)}, plain_y_err, dtype)
        if torch_impl.io_saves_xi(save_xi):
            assert xi.shape == x.shape and xi.dtype == dtype and xi.is_contiguous()
            assert torch.equal(xi, deinterleaved)
        else:
            assert xi.numel() == 0
        assert not set(_storages([y, xi])) & set(_storages([x, w1, w2, b1, b2]))
    for xi in (x.new_empty(0), deinterleaved):
        for needs in ((True, True, True, True, True), (True, False, False, False, False),
                      (False, True, False, False, False), (False, False, True, False, False),
                      (False, True, True, False, True), (True, False, True, True, False)):
            got = torch_impl.gpc_io_bwd(dy, x, xi, w1, w2, *needs)
            for n, (g, w, need) in enumerate(zip(got, want, needs)):
                if not need:
                    assert g is None, n
                    continue
                assert g.dtype == dtype and g.shape == w.shape, n
            _assert_io_contract(f"backward {needs}", _io_errors(got, want, needs), plain_errs,
                                dtype)
            outs = [g for g in got[:3] if g is not None]
            ptrs = _storages(outs)
            assert len(set(ptrs)) == len(ptrs)
            assert not set(ptrs) & set(_storages([dy, x, xi, w1, w2]))


@pytest.mark.parametrize("block_bytes", [1, 2000])
@pytest.mark.parametrize("M", [1, 37, 75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_io_row_blocks(monkeypatch, io_path, block_bytes, M, dtype):
    """The IO block in many row blocks, the last one partial: with og = 9 the weight gradients
    accumulate over blocks of 36 rows (M = 37 ends on a one-row block, the outer-product path),
    the forward and the input gradient over blocks of 1 or 4 rows."""
    monkeypatch.setattr(torch_impl, "WHOLE_BYTES", 0)
    monkeypatch.setattr(torch_impl, "BLOCK_BYTES", block_bytes)
    case = Case(5, 7, 9, (M,), "sliced", True)
    check_op("gpc_io", make_operands("gpc_io", case, dtype), "torch", dtype)
    if dtype == torch.float32:
        _check_fp64("gpc_io", case)


def test_block_without_second_weight_float64():
    _check_fp64("gpc_block", Case(3, 2, 5, (4, 2), "sliced", True, second=False))


# --------------------------------------------------------------------------------------------
# Bias gradients: summed in the accumulation dtype
# --------------------------------------------------------------------------------------------


def _exact_column_sums(dy: torch.Tensor) -> torch.Tensor:
    return torch.tensor([math.fsum(col) for col in dy.t().tolist()], dtype=torch.float64)


def test_bias_grad_float64_sums_in_float64():
    dy = torch.randn(4099, 6, dtype=torch.float64) * 1e3 + 1.0
    db = torch_impl.bias_grad(dy, 3)
    assert db.dtype == torch.float64 and db.shape == (3, 2)
    assert rel_error(db.reshape(-1), _exact_column_sums(dy)) < FP64_TOL


@pytest.mark.parametrize("op", OPS)
def test_bias_grads_float64_through_the_api(op):
    G, s, og, M = 2, 3, 4, 4099
    x = torch.randn(M, G * s, dtype=torch.float64)
    w1 = torch.randn(G, s, og, dtype=torch.float64)
    w2 = torch.randn(G, og if op == "gpc_block" else s, og, dtype=torch.float64)
    b1 = torch.randn(G, og, dtype=torch.float64)
    b2 = torch.randn(G, og, dtype=torch.float64)
    args = {"grouped_linear": [w1, b1], "gpc_io": [w1, w2, b1, b2], "gpc_block": [w1, w2, b1, b2]}[op]
    biases = [1] if op == "grouped_linear" else [2, 3]
    dy = torch.randn(M, G * og, dtype=torch.float64) * 1e3 + 1.0
    grads = []
    for fn in (getattr(kphi3_kernels, op), getattr(R, op)):
        leaves = [a.clone().requires_grad_(i in biases) for i, a in enumerate(args)]
        kwargs = {"backend": "torch"} if fn is getattr(kphi3_kernels, op) else {}
        y = fn(x, *leaves, **kwargs)
        grads.append(torch.autograd.grad(y, [leaves[i] for i in biases], dy))
    for g, ref in zip(*grads):
        assert g.dtype == torch.float64
        assert rel_error(g, ref) < FP64_TOL


def test_bias_grad_half_accumulates_in_fp32():
    """Partial sums beyond fp16's range: an fp16 accumulator would give inf - inf = nan."""
    dy = torch.tensor([[60000.0, 1.0]] * 2 + [[-60000.0, 1.0]] * 2, dtype=torch.float16)
    db = torch_impl.bias_grad(dy, 1)
    assert db.dtype == torch.float16
    assert db.tolist() == [[0.0, 4.0]]


# --------------------------------------------------------------------------------------------
# fp16: one rounding at the end, at every M
# --------------------------------------------------------------------------------------------

H = torch.float16
ROWS = [1, 4, 255, 256, 300]  # both sides of the old 256-row regime boundary


def _full(shape, value, requires_grad=False):
    return torch.full(shape, float(value), dtype=H, requires_grad=requires_grad)


def _oracle(fn, *args):
    """``fn`` on float64 copies of fp16 operands, rounded once to fp16."""
    return fn(*[None if a is None else a.detach().double() for a in args]).to(H)


def _dense(w1, w2=None):
    """The IO block as one dense ``[out, in]`` weight (for F.linear)."""
    G, s, og = w1.shape
    dense = torch.zeros(G * og, G * s, dtype=torch.float64)
    for n in range(G):
        dense[n * og:(n + 1) * og, n * s:(n + 1) * s] += w1[n].double().t()
        if w2 is not None:
            dense[n * og:(n + 1) * og, n::G] += w2[n].double().t()
    return dense.to(H)


@pytest.mark.parametrize("M", ROWS)
def test_fp16_io_products_overflow_sum_does_not(M):
    """first(x) = 70000 and second(x) = -60000 each overflow fp16; their sum, 10000, does not."""
    G, s, og = 2, 2, 2
    x = _full((M, G * s), 250)
    w1, w2 = _full((G, s, og), 140), _full((G, s, og), -120)
    y = kphi3_kernels.gpc_io(x, w1, w2, backend="torch")
    assert torch.equal(y, torch.full_like(y, 10000))
    assert torch.equal(y, _oracle(R.gpc_io, x, w1, w2))
    assert torch.equal(y, torch.nn.functional.linear(x, _dense(w1, w2)))


@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io"])
@pytest.mark.parametrize("M", ROWS)
def test_fp16_product_overflows_bias_brings_it_back(op, M):
    """x @ W1 = 70000 overflows fp16; with the bias -10000 the result, 60000, does not."""
    G, s, og = 2, 2, 2
    x = _full((M, G * s), 250)
    w1, b1 = _full((G, s, og), 140), _full((G, og), -10000)
    if op == "grouped_linear":
        y = kphi3_kernels.grouped_linear(x, w1, b1, backend="torch")
        expected = _oracle(R.grouped_linear, x, w1, b1)
    else:
        w2, b2 = _full((G, s, og), 0), _full((G, og), 0)
        y = kphi3_kernels.gpc_io(x, w1, w2, b1, b2, backend="torch")
        expected = _oracle(R.gpc_io, x, w1, w2, b1, b2)
    assert torch.equal(y, torch.full_like(y, 60000))
    assert torch.equal(y, expected)


@pytest.mark.parametrize("M", ROWS)
def test_fp16_block_second_product_overflows_bias_and_residual_do_not(M):
    """h = first(x) = 20000; h @ W2 = 80000 overflows, + b2 (-49152) + the residual (20000) does not."""
    G, s, og = 2, 2, 2
    x = _full((M, G * s), 100)
    w1, w2 = _full((G, s, og), 100), _full((G, og, og), 2)
    b2 = _full((G, og), -49152)
    y = kphi3_kernels.gpc_block(x, w1, w2, None, b2, backend="torch")
    assert torch.isfinite(y).all()
    assert torch.equal(y, torch.full_like(y, 80000 - 49152 + 20000))
    assert torch.equal(y, _oracle(R.gpc_block, x, w1, w2, None, b2))


@pytest.mark.parametrize("op", ["gpc_io", "gpc_block"])
@pytest.mark.parametrize("M", ROWS)
def test_fp16_final_overflow_is_inf(op, M):
    """The other way round: terms that fit (40000 each) whose sum (80000) does not give +inf, like
    the float64 result rounded to fp16."""
    G, s, og = 2, 2, 2
    if op == "gpc_io":
        x = _full((M, G * s), 200)
        w1 = w2 = _full((G, s, og), 100)
        y = kphi3_kernels.gpc_io(x, w1, w2, backend="torch")
        expected = _oracle(R.gpc_io, x, w1, w2)
    else:  # h = 40000, h @ W2 = 40000, + residual 40000
        x = _full((M, G * s), 200)
        w1, w2 = _full((G, s, og), 100), _full((G, og, og), 0.5)
        y = kphi3_kernels.gpc_block(x, w1, w2, backend="torch")
        expected = _oracle(R.gpc_block, x, w1, w2)
    assert torch.isposinf(y).all()
    assert torch.equal(y, expected)


@pytest.mark.parametrize("M", ROWS)
def test_fp16_io_input_grad_terms_overflow_sum_does_not(M):
    """dx = dy @ W1^T (70000) + interleave(dy @ W2^T) (-60000): one rounding, 10000."""
    G, s, og = 2, 2, 2
    x = _full((M, G * s), 1, requires_grad=True)
    w1, w2 = _full((G, s, og), 140), _full((G, s, og), -120)
    y = kphi3_kernels.gpc_io(x, w1, w2, backend="torch")
    (dx,) = torch.autograd.grad(y, [x], _full(y.shape, 250))
    assert torch.equal(dx, torch.full_like(dx, 10000))


@pytest.mark.parametrize("M", ROWS)
def test_fp16_block_input_grad_intermediate_stays_fp32(M):
    """d first(x) = dy + interleave(dy @ W2^T) = 250 + 70000 overflows fp16 but is not returned;
    dx = d first(x) @ W1^T = 35125 is, rounded once (to 35136)."""
    G, s, og = 2, 2, 2
    x = _full((M, G * s), 1, requires_grad=True)
    w1, w2 = _full((G, s, og), 0.25), _full((G, og, og), 140)
    y = kphi3_kernels.gpc_block(x, w1, w2, backend="torch")
    (dx,) = torch.autograd.grad(y, [x], _full(y.shape, 250))
    assert torch.equal(dx, torch.full_like(dx, 35125.0))  # 35125 rounds to 35136 in fp16
    assert dx[0, 0].item() == 35136.0


def test_acc_dtype():
    assert torch_impl.acc_dtype(torch.float16) == torch.float32
    assert torch_impl.acc_dtype(torch.bfloat16) == torch.float32
    assert torch_impl.acc_dtype(torch.float32) == torch.float32
    assert torch_impl.acc_dtype(torch.float64) == torch.float64


# --------------------------------------------------------------------------------------------
# The fused decoder's launchers (their parity with the float64 oracle is in
# test_fused_decoder.py, test_residual_norm.py and test_fused_fuzz.py, on both backends)
# --------------------------------------------------------------------------------------------


def test_fused_launchers_have_the_triton_launchers_names_and_signatures():
    """``fused_ops.py``'s bodies call one launcher module per backend by name: the torch one
    must offer every name the Triton one does, with the same parameters."""
    import inspect

    from kphi3_kernels.ops import triton_fused

    for name in triton_fused.__all__:
        assert name in torch_impl.__all__, name
        want = inspect.signature(getattr(triton_fused, name)).parameters
        got = inspect.signature(getattr(torch_impl, name)).parameters
        assert [(p.name, p.kind, p.default) for p in got.values()] == \
            [(p.name, p.kind, p.default) for p in want.values()], name


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mlp_tail_input_grad_stays_fp32_into_the_activation(dtype):
    """The block's input gradient ``dh`` (both terms) is not rounded before the activation's
    backward: with terms of 40000 each, ``dh = 80000`` overflows fp16, but ``d(gate) = dh * up *
    silu'(0) = 80000 * 0.5 * 0.5 = 20000`` does not, and is what comes back (rounded once)."""
    G, s, og = 2, 2, 1
    gate = torch.zeros(3, G * s, dtype=dtype)
    up = torch.full((3, G * s), 0.5, dtype=dtype)
    gu = torch.cat([gate, up], 1)
    w = torch.full((G, s, og), 200.0, dtype=dtype)
    dy = torch.full((3, G * og), 200.0, dtype=dtype)
    t = torch_impl.silu_mul_layout_fwd(gu, G, 8)
    dgu, _, _ = torch_impl.mlp_tail_bwd(dy, gu, t, w, w, True, False, False)
    assert dgu.dtype == dtype
    assert torch.equal(dgu[:, :G * s], torch.full((3, G * s), 20000.0, dtype=dtype))
    assert torch.equal(dgu[:, G * s:], torch.zeros(3, G * s, dtype=dtype))  # silu(0) = 0
