"""Every op, forward and every gradient, on both backends, against the float64 oracle.

Axes (covered pairwise, not as a cartesian product, to keep the interpreter fast):
G in {1, 2, 3, 5, 8, 20}; per-group widths that are not powers of two (48, 80, 112) and tiny ones
(1, 3, 5, 7) that exercise every mask; M odd and M = 1; 1-D to 4-D inputs; contiguous, sliced
(``base[..., ::2]``: row stride > channels, column stride 2), transposed and broadcast (row
stride 0) inputs; transposed weights; with and without bias; fp32 and fp16 (bf16 on CUDA only).
On CPU the ``triton`` backend runs the real kernels in Triton's interpreter.
"""
import pytest
import torch

import kphi3_kernels
from kphi3_kernels import reference as R

from _utils import (DEVICE, FP32_TOL, HALF_SLACK, Case, assert_meets_contract, call_package,
                    call_reference, check_op, force_gemm_config, interleave_case, make_input, make_operands,
                    make_weight, reference_operands, rel_error, requires_interpreter,
                    run_reference)

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16]

LINEAR_CASES = [  # grouped_linear and gpc_io (weights [G, s, og])
    Case(1, 48, 80, (7,), "contig", True),
    Case(2, 3, 5, (1,), "contig", False),
    Case(3, 112, 80, (3, 5), "sliced", True),
    Case(5, 48, 80, (2, 3, 3), "transposed", False),
    Case(8, 7, 3, (9,), "sliced", True, weight_t=True),
    Case(20, 5, 7, (1, 3), "contig", True),
    Case(5, 80, 48, (11,), "transposed", True),
    Case(3, 5, 112, (2, 1, 13), "contig", False, weight_t=True),
    Case(2, 1, 1, (5,), "sliced", True),
    Case(3, 7, 5, (6,), "expanded", True),
]

BLOCK_CASES = [  # gpc_block (weight2 [G, og, og] when ``second``; the module passes it iff in >= out)
    Case(2, 7, 5, (7,), "contig", True),
    Case(3, 112, 80, (3, 5), "sliced", False),
    Case(5, 48, 48, (2, 3, 3), "transposed", True),
    Case(20, 7, 3, (1, 3), "contig", True, weight_t=True),
    Case(8, 5, 1, (9,), "sliced", True),                              # og == 1: no interleave
    Case(1, 48, 48, (5,), "contig", True),                            # one group
    Case(2, 3, 5, (1,), "contig", False, second=False),               # in < out
    Case(5, 48, 80, (2, 3, 3), "transposed", True, second=False),
    Case(3, 5, 112, (13,), "sliced", True, second=False, weight_t=True),
    Case(8, 1, 7, (1, 1, 3), "contig", False, second=False),
    Case(3, 7, 5, (2, 4), "expanded", True),
]

INTERLEAVE_CASES = [  # (C, step, leading shape, layout)
    interleave_case(12, 3, (7,)),
    interleave_case(240, 48, (3, 5), "sliced"),
    interleave_case(35, 7, (2, 3, 3), "transposed"),
    interleave_case(20, 20, (1,)),
    interleave_case(20, 1, (4,), "sliced"),
    interleave_case(400, 80, (2, 17), "transposed"),   # more than one program along both axes
    interleave_case(12, 4, (5,), "expanded"),
]


def _params(cases, extra=()):
    return [pytest.param(c, id=c.id, marks=extra) for c in cases]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _params(LINEAR_CASES))
def test_grouped_linear_parity(case, backend, dtype):
    check_op("grouped_linear", make_operands("grouped_linear", case, dtype), backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _params(LINEAR_CASES))
def test_gpc_io_parity(case, backend, dtype):
    check_op("gpc_io", make_operands("gpc_io", case, dtype), backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _params(BLOCK_CASES))
def test_gpc_block_parity(case, backend, dtype):
    check_op("gpc_block", make_operands("gpc_block", case, dtype), backend, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _params(INTERLEAVE_CASES))
def test_interleave_parity(case, backend, dtype):
    errs = check_op("interleave", make_operands("interleave", case, dtype), backend, dtype)
    assert all(e == 0 for e in errs.values()), errs  # a permutation: exact


# bf16: only on CUDA (the interpreter's bf16 tl.dot is wrong, docs/numerics.md).
@pytest.mark.gpu
@pytest.mark.parametrize("op,case", [("grouped_linear", c) for c in LINEAR_CASES[::2]]
                         + [("gpc_io", c) for c in LINEAR_CASES[1::2]]
                         + [("gpc_block", c) for c in BLOCK_CASES]
                         + [("interleave", c) for c in INTERLEAVE_CASES[:3]],
                         ids=lambda v: v if isinstance(v, str) else v.id)
def test_triton_bf16_parity_cuda(op, case):
    check_op(op, make_operands(op, case, torch.bfloat16, "cuda"), "triton", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_parity_cuda_explicit(op, dtype):
    case = Case(5, 48, 80, (3, 7), "sliced", True, second=False) if op == "gpc_block" else \
        Case(5, 80, 48, (3, 7), "sliced", True)
    check_op(op, make_operands(op, case, dtype, "cuda"), "triton", dtype)


# --------------------------------------------------------------------------------------------
# Upstream gradients with unusual layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block", "interleave"])
def test_expanded_and_strided_upstream_grads(op, backend):
    """``y.sum()`` hands backward a zero-stride gradient; ``y[..., ::2]`` a sparse one."""
    case = (Case(3, 5, 4, (2, 5), "contig", True) if op != "interleave"
            else interleave_case(12, 3, (2, 5)))
    ops = make_operands(op, case, torch.float32)
    targets = [t for _, t in ops.grad_targets()]

    def transposed(y):
        scale = torch.arange(y.shape[0], dtype=y.dtype, device=y.device).view(-1, 1)
        return (y.transpose(0, 1) * scale).sum()

    for reduce in (lambda y: y.sum(), lambda y: (y[..., ::2] * 1.5).sum(), transposed):
        y = call_package(op, ops, ops.x, ops.params, backend)
        grads = torch.autograd.grad(reduce(y), targets)
        x64, p64, targets64 = reference_operands(ops, torch.float64)
        grads64 = torch.autograd.grad(reduce(call_reference(op, ops, x64, p64)), targets64)
        for (n, _), g, g64 in zip(ops.grad_targets(), grads, grads64):
            assert rel_error(g, g64) < FP32_TOL, n


# --------------------------------------------------------------------------------------------
# Empty batch, NaN / Inf
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block", "gpc_block_now2",
                                "interleave"])
@pytest.mark.parametrize("lead", [(0,), (3, 0), (0, 2, 4)], ids=["0", "3x0", "0x2x4"])
def test_empty_batch(op, backend, lead):
    name = "gpc_block" if op.startswith("gpc_block") else op
    case = Case(3, 5, 4, lead, "contig", True, second=op != "gpc_block_now2")
    if op == "interleave":
        case = interleave_case(12, 4, lead)
    ops = make_operands(name, case, torch.float32)
    y = call_package(name, ops, ops.x, ops.params, backend)
    assert y.shape == (*lead, 12)
    targets = [t for _, t in ops.grad_targets()]
    grads = torch.autograd.grad(y, targets, torch.randn_like(y))
    for (n, t), g in zip(ops.grad_targets(), grads):
        assert g.shape == t.shape, n
        if n != "x":  # a sum over no rows: exactly zero (not poisoned memory)
            assert torch.equal(g, torch.zeros_like(g)), n


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block", "gpc_block_now2",
                                "interleave"])
def test_nan_inf_propagate_like_reference(op, backend):
    name = "gpc_block" if op.startswith("gpc_block") else op
    case = Case(3, 5, 4 if op != "gpc_block_now2" else 6, (6,), "contig", True,
                second=op != "gpc_block_now2")
    if op == "interleave":
        case = interleave_case(15, 3, (6,))
    ops = make_operands(name, case, torch.float32)
    x = ops.x.detach().clone()
    x[1, 2] = float("nan")
    x[3, 7] = float("inf")
    x[4, 14] = -float("inf")
    with torch.no_grad():
        y = call_package(name, ops, x, ops.params, backend)
        p64 = {k: None if v is None else v.detach().double() for k, v in ops.params.items()}
        y64 = call_reference(name, ops, x.double(), p64)
    assert torch.equal(torch.isnan(y), torch.isnan(y64))
    assert torch.equal(torch.isinf(y), torch.isinf(y64))
    assert torch.equal(torch.isinf(y) & (y > 0), torch.isinf(y64) & (y64 > 0))
    clean = [0, 2, 5]
    assert torch.isfinite(y[clean]).all()
    assert rel_error(y[clean], y64[clean]) < FP32_TOL


# --------------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    ("grouped_linear", Case(2, 3, 2, (3,), "sliced", True)),
    ("gpc_io", Case(3, 2, 2, (3,), "contig", True)),
    ("gpc_block", Case(2, 3, 2, (3,), "transposed", True)),
    ("gpc_block", Case(2, 2, 3, (3,), "contig", True, second=False)),
    ("interleave", interleave_case(6, 2, (2, 2))),
]


def _gradcheck(op, case, backend):
    ops = make_operands(op, case, torch.float64)
    names = [n for n, _ in ops.grad_targets()]
    leaves = [t.detach().clone().requires_grad_() for _, t in ops.grad_targets()]

    def fn(*args):
        params = dict(zip(names[1:], args[1:]))
        params = {k: params.get(k) for k in ops.params}
        return call_package(op, ops, args[0], params, backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("op,case", GRADCHECK_CASES, ids=lambda v: v if isinstance(v, str) else v.id)
def test_gradcheck_torch_backend(op, case):
    _gradcheck(op, case, "torch")


@pytest.mark.parametrize("op,case", GRADCHECK_CASES, ids=lambda v: v if isinstance(v, str) else v.id)
def test_gradcheck_triton_backend(op, case):
    # The kernels keep a float64 accumulator for float64 operands, so gradcheck runs them directly.
    _gradcheck(op, case, "triton")


@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block"])
def test_triton_float64_matches_oracle(op):
    """float64 operands get a float64 accumulator in the kernel (not fp32 ``tl.zeros``)."""
    ops = make_operands(op, Case(2, 3, 5, (4,), "contig", True), torch.float64)
    with torch.no_grad():
        y = call_package(op, ops, ops.x, ops.params, "triton")
    y64, _ = run_reference(op, ops, torch.float64, None)
    assert rel_error(y, y64) < 1e-10


# --------------------------------------------------------------------------------------------
# Bias / weight layouts the functional API accepts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block"])
def test_non_contiguous_bias(op, backend):
    """A bias that is a transposed view ([G, og] with column stride G) must give the same result."""
    G, s, og = 3, 5, 4
    x = make_input((5,), G * s, torch.float32)
    w1 = make_weight(G, s, og, torch.float32)
    w2 = make_weight(G, s if op == "gpc_io" else og, og, torch.float32)
    b1 = torch.randn(og, G, device=DEVICE).t().requires_grad_()
    b2 = torch.randn(og, G, device=DEVICE).t().requires_grad_()
    assert not b1.is_contiguous()
    args = {"grouped_linear": (w1, b1), "gpc_io": (w1, w2, b1, b2), "gpc_block": (w1, w2, b1, b2)}[op]
    fn = getattr(kphi3_kernels, op)
    ref = getattr(R, op)
    y = fn(x, *args, backend=backend)
    y64 = ref(x.detach().double(), *[a.detach().double() for a in args])
    assert rel_error(y, y64) < FP32_TOL


# --------------------------------------------------------------------------------------------
# Rank 1, partial requires_grad, inference mode
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block", "interleave"])
def test_one_dimensional_input(op, backend):
    case = (Case(3, 5, 4, (), "contig", True) if op != "interleave"
            else interleave_case(12, 4, ()))
    check_op(op, make_operands(op, case, torch.float32), backend, torch.float32)


PARTIAL = [(op, wanted) for op in ["grouped_linear", "gpc_io", "gpc_block"]
           for wanted in [("x",), ("weight1", "weight2"), ("bias2",), ("x", "bias1")]
           if not (op == "grouped_linear" and wanted == ("bias2",))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,wanted", PARTIAL, ids=[f"{o}-{'+'.join(w)}" for o, w in PARTIAL])
def test_partial_requires_grad(op, wanted, backend):
    ops = make_operands(op, Case(3, 5, 4, (7,), "sliced", True), torch.float32)
    targets = [(n, t) for n, t in ops.grad_targets() if n in wanted]
    x = ops.x if "x" in wanted else ops.x.detach()
    params = {k: (v if k in wanted or v is None else v.detach()) for k, v in ops.params.items()}
    y = call_package(op, ops, x, params, backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [t for _, t in targets], dy)
    _, grads64 = run_reference(op, ops, torch.float64, dy)
    by_name = dict(zip([n for n, _ in ops.grad_targets()], grads64))
    for (n, _), g in zip(targets, grads):
        assert rel_error(g, by_name[n]) < FP32_TOL, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["grouped_linear", "gpc_io", "gpc_block", "interleave"])
def test_inference_mode(op, backend):
    case = (Case(5, 7, 3, (2, 5), "transposed", True) if op != "interleave"
            else interleave_case(35, 5, (2, 5)))
    ops = make_operands(op, case, torch.float32)
    with torch.inference_mode():
        y = call_package(op, ops, ops.x, ops.params, backend)
    y64, _ = run_reference(op, ops, torch.float64, None)
    assert not y.requires_grad
    assert rel_error(y, y64) < FP32_TOL


# --------------------------------------------------------------------------------------------
# Every GPU config, forced through the interpreter on shapes with partial tiles everywhere
# --------------------------------------------------------------------------------------------
# The interpreter cannot autotune; each config the GPU autotuner may pick is code a GPU runs.
# M = 150, s = 80, og = 72 leave a partial tile in P, Q and K for every block size (16..256), in
# the forward (P = M) and in the weight gradients (P = s, Q = og, K = M); row bands pass GROUP_P.
FORCED_CASES = [
    ("grouped_linear", Case(2, 80, 72, (150,), "sliced", True)),
    ("gpc_io", Case(2, 80, 72, (3, 50), "contig", True)),
    ("gpc_block", Case(2, 80, 72, (150,), "contig", True)),              # in >= out: second GEMM
    ("gpc_block", Case(2, 72, 80, (150,), "transposed", False, second=False)),
]


def _all_gpu_configs():
    from kphi3_kernels.ops.grouped_gemm import CUDA_CONFIGS

    return list(CUDA_CONFIGS)


@requires_interpreter
@pytest.mark.parametrize("io_forward", ["split", "fused"])
@pytest.mark.parametrize("config", _all_gpu_configs(), ids=lambda c: "{BLOCK_P}x{BLOCK_Q}x{BLOCK_K}".format(**c.kwargs) + f"-w{c.num_warps}s{c.num_stages}")
def test_every_gpu_config_interpreted(config, io_forward, monkeypatch):
    from kphi3_kernels.ops import triton_impl

    monkeypatch.setattr(triton_impl, "IO_FORWARD", io_forward)
    forced = force_gemm_config(monkeypatch, config)
    cases = FORCED_CASES if io_forward == "split" else FORCED_CASES[1:2]
    for op, case in cases:
        check_op(op, make_operands(op, case, torch.float32), "triton", torch.float32)
    # Every mode of the kernel: the K + K2 loop (or the strided second loop), the gathered
    # residual (dx), the paired problems (dW1 and dW2), the plain residual (the non-IO block).
    want = {"gpc_io_bwd_dxi", "gpc_io_bwd_dx", "gpc_io_bwd_dw"}
    want |= ({"gpc_io_fwd", "gpc_block_fwd_second", "grouped_linear_fwd"} if io_forward == "split"
             else {"gpc_io_fwd_fused"})
    assert want <= set(forced), f"launches not forced through {config}: {want - set(forced)}"


@requires_interpreter
@pytest.mark.parametrize("case", _params(LINEAR_CASES[:6]))
def test_gpc_io_fused_variant_parity(case, monkeypatch):
    """The one-launch IO forward (strided operand read in place) stays correct for comparison."""
    from kphi3_kernels.ops import triton_impl

    monkeypatch.setattr(triton_impl, "IO_FORWARD", "fused")
    check_op("gpc_io", make_operands("gpc_io", case, torch.float32), "triton", torch.float32)


# --------------------------------------------------------------------------------------------
# The IO block's data flow: the saved xi, the decode forward, the paired dW, the gathered dx
# --------------------------------------------------------------------------------------------


def _grouped_launch_names(monkeypatch):
    """Names of the grouped GEMM launches that run (the interpreter asks FORCE_CONFIG of each)."""
    from kphi3_kernels.ops import launch

    names = []

    def spy(spec):
        names.append(spec.name)
        return None

    monkeypatch.setattr(launch, "FORCE_CONFIG", spy)
    return names


@requires_interpreter
@pytest.mark.parametrize("rows,launches", [(1, ["gpc_io_fwd_fused"]), (16, ["gpc_io_fwd_fused"]),
                                           (64, ["gpc_io_fwd_fused"]),
                                           (65, ["gpc_io_deinterleave", "gpc_io_fwd"])])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_gpc_io_inference_forward_is_one_launch_at_decode_sizes(rows, launches, dtype,
                                                                monkeypatch):
    names = _grouped_launch_names(monkeypatch)
    case = Case(5, 48, 20, (rows,), "sliced", True)
    ops = make_operands("gpc_io", case, dtype)
    with torch.no_grad():
        y = call_package("gpc_io", ops, ops.x, ops.params, "triton")
        assert names == launches
        y_plain = call_package("gpc_io", ops, ops.x, ops.params, "torch")  # the plain path
    y64 = call_reference("gpc_io", ops, *reference_operands(ops, torch.float64)[:2])
    assert_meets_contract(f"gpc_io forward, {rows} rows", {"y": rel_error(y, y64)}, dtype,
                          {"y": rel_error(y_plain, y64)})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _params([Case(3, 7, 5, (70,), "transposed", True),
                                          Case(20, 5, 3, (2, 9), "sliced", True),
                                          Case(1, 48, 20, (13,), "contig", False)]))
def test_gpc_io_with_frozen_weight2(case, backend):
    """No gradient reaches W2, so the forward keeps no xi (and may run in one launch)."""
    ops = make_operands("gpc_io", case, torch.float32)
    ops.params["weight2"].requires_grad_(False)
    x64, p64, _ = reference_operands(ops, torch.float64)
    p64["weight2"].requires_grad_(False)
    targets = [ops.x, ops.params["weight1"]] + ([ops.params["bias1"]] if case.bias else [])
    targets64 = [x64, p64["weight1"]] + ([p64["bias1"]] if case.bias else [])
    y = call_package("gpc_io", ops, ops.x, ops.params, backend)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, targets, dy)
    y64 = call_reference("gpc_io", ops, x64, p64)
    grads64 = torch.autograd.grad(y64, targets64, dy.double())
    for got, want in zip([y, *grads], [y64, *grads64]):
        assert rel_error(got, want) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 1, 37])
@pytest.mark.parametrize("G,s,og", [(1, 48, 20), (5, 7, 3), (20, 3, 5)])
def test_gpc_io_bwd_with_saved_and_recomputed_xi(G, s, og, rows, backend):
    """The backward operator gives the same gradients from the forward's xi as from none."""
    from kphi3_kernels.ops import custom_ops

    x = make_input((rows,), G * s, torch.float32, "sliced")
    w1, w2 = (make_weight(G, s, og, torch.float32) for _ in range(2))
    dy = torch.randn(rows, G * og, device=DEVICE)
    xi = R.interleave(x, s).contiguous()
    x64, w164, w264 = (t.detach().double().requires_grad_() for t in (x, w1, w2))
    y64 = R.gpc_io(x64, w164, w264)
    want = torch.autograd.grad(y64, [x64, w164, w264], dy.double())
    for saved in (xi, None):
        got = custom_ops.gpc_io_bwd(dy, x, w1, w2, True, True, True, True, True, xi=saved,
                                    backend=backend)
        for g, w in zip(got[:3], want):
            assert g.shape == w.shape and rel_error(g, w) < FP32_TOL
        db = dy.double().sum(0).view(G, og)
        assert rel_error(got[3], db) < FP32_TOL and rel_error(got[4], db) < FP32_TOL
        assert got[3] is not got[4]


@pytest.mark.parametrize("G,lead", [(3, (33,)), (5, (2, 7))])
def test_gpc_io_dx_meets_its_rounding_bound_when_dxi_dominates(G, lead):
    """fp16: dx = dx1 + dxi with dxi rounded to fp16 first (docs/numerics.md). With W1 small,
    dx is nearly all dxi: check_op holds the Triton path to the rounding bound, about 2u."""
    case = Case(G, 48, 40, lead, "contig", False)
    ops = make_operands("gpc_io", case, torch.float16)
    with torch.no_grad():
        ops.params["weight1"].mul_(1e-3)
    errs = check_op("gpc_io", ops, "triton", torch.float16)
    # Two roundings of about the same tensor: at most 2u = 2^-10, plus the fp32 slack.
    assert errs["x"] < 2 ** -10 + HALF_SLACK
