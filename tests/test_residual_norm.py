"""The decoder's residual stream, fused (``kphi3_kernels.fused``): ``rms_norm``, ``add_rms_norm``
(``h = residual + x`` and ``n = RMSNorm(h)`` in one launch, one backward launch for the sum of
both gradients at the branch point; ``ops/rowwise.py``) and ``silu_mul_gpc_io(...,
residual=h)`` (the residual added in down_proj's epilogue; ``ops/triton_fused.py``), op by op
against the float64 oracle, and their operators (``ops/fused_ops.py``).

The oracles: ``weight * x * rsqrt(mean(x^2) + eps)`` for the norm (``h = residual + x`` before it),
``reference.gpc_io(up * silu(gate), ...) + residual`` for the MLP tail, in float64 on the same
(already rounded) values. The bounds are docs/numerics.md's (``tests/_utils.py``): a result's
bound is its dtype's, except where it is computed from a half-precision operand rounded on the
way (``rms_norm`` of an fp16 ``x`` with an fp32 weight rounds the normalized input to fp16 on
the torch backend; the MLP tail's fp32 result with an fp32 residual adds a block computed from
fp16 operands), which meets the half-precision bound. With an fp32 residual stream and an fp16
branch, ``add_rms_norm``'s ``h``, ``n`` and the fp32 gradients round nothing to fp16 on either
backend (``h`` is the promoted sum, as ``+`` rounds it), so they meet the fp32 bound; the fp16
branch's gradient is the fp32 one rounded once.
"""
import dataclasses
from typing import Tuple

import pytest
import torch

from kphi3_kernels import fused, layout
from kphi3_kernels.ops import custom_ops, fused_ops, launch, outputs, rowwise, triton_fused
from kphi3_kernels.ops.grouped_gemm import CUDA_CONFIGS

from _utils import (DEVICE, FP32_TOL, INTERPRETING, as_float64, check_parity, forbid_launch,
                    make_input, rel_error, rounded_intermediate_bound, run_with_grads)
from test_fused_decoder import (BACKENDS, MlpCase, _dt_second_term, _layout_gpu_configs,
                                _operands, _oracle, requires_triton)

EPS = 1e-5
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _rms_oracle(x, weight, eps=EPS):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _add_rms_oracle(residual, x, weight, eps=EPS):
    h = residual + x
    return h, _rms_oracle(h, weight, eps)


def _rms(backend):
    return lambda x, w: fused.rms_norm(x, w, EPS, backend=backend)


def _add_rms(backend):
    return lambda r, x, w: fused.add_rms_norm(r, x, w, EPS, backend=backend)


def _norm_weight(C, dtype, grad=True):
    return (1 + 0.5 * torch.randn(C, device=DEVICE)).to(dtype).requires_grad_(grad)


# --------------------------------------------------------------------------------------------
# rms_norm and add_rms_norm against the float64 oracle
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NormCase:
    C: int
    lead: Tuple[int, ...]
    x_layout: str = "contig"    # tests/_utils.make_input: contig, sliced, transposed, expanded
    r_layout: str = "contig"

    def __str__(self):
        return f"C{self.C}-M{'x'.join(map(str, self.lead))}-x{self.x_layout}-r{self.r_layout}"


# Channel chunks of 256 (rowwise._config); programs of 16 rows (fewer for small M).
NORM_CASES = [
    NormCase(72, (37,)),                               # one partial chunk, partial row block
    NormCase(300, (2, 9), "sliced", "transposed"),     # 3-D, two chunks, non-contiguous
    NormCase(300, (37,), "transposed", "sliced"),      # column-major x (row stride 1)
    NormCase(1280, (5,), "contig", "expanded"),        # five full chunks; residual row stride 0
    NormCase(257, (17,), "expanded", "contig"),        # a 1-channel last chunk; x row stride 0
    NormCase(24, (3, 7), "transposed", "contig"),      # under one chunk, 3-D transposed
    NormCase(72, (1,)),                                # one row
    NormCase(300, ()),                                 # 1-D: one row, no leading dimension
]
# (residual, x, weight) dtypes. "stream32": an fp32 residual stream and an fp16 branch, as under
# autocast (h fp32, the norm weight fp32).
NORM_DTYPES = {"fp32": (F32, F32, F32), "fp16": (F16, F16, F16), "stream32": (F32, F16, F32)}
# Which of add_rms_norm's outputs a gradient reaches.
MODES = {"h+n": (True, True), "n": (False, True), "h": (True, False)}


def check_rms_norm(case: NormCase, backend: str, x_dtype, w_dtype):
    x = make_input(case.lead, case.C, x_dtype, case.x_layout)
    w = _norm_weight(case.C, w_dtype)
    n_dtype = torch.promote_types(x_dtype, w_dtype)
    dn = torch.randn(*case.lead, case.C, device=DEVICE).to(n_dtype)
    # fp16 x: the torch backend rounds the normalized input to x's dtype (Phi-3's module).
    bound = {n: x_dtype for n in ("n", "x", "weight")}
    baseline = _rms("torch") if backend == "triton" else _rms_oracle
    got = check_parity(f"rms_norm/{case}/{backend}/{x_dtype}/{w_dtype}", _rms(backend),
                       _rms_oracle, baseline, [x, w], [dn], ["n", "x", "weight"], bound)
    assert got["n"].dtype == n_dtype and got["x"].dtype == x_dtype
    assert got["weight"].dtype == w_dtype
    return got


def check_add_rms_norm(case: NormCase, backend: str, dtypes, mode: str):
    r_dtype, x_dtype, w_dtype = dtypes
    r = make_input(case.lead, case.C, r_dtype, case.r_layout)
    x = make_input(case.lead, case.C, x_dtype, case.x_layout)
    w = _norm_weight(case.C, w_dtype)
    h_dtype = torch.promote_types(r_dtype, x_dtype)
    n_dtype = torch.promote_types(h_dtype, w_dtype)
    use_h, use_n = MODES[mode]
    dh = torch.randn(*case.lead, case.C, device=DEVICE).to(h_dtype) if use_h else None
    dn = torch.randn(*case.lead, case.C, device=DEVICE).to(n_dtype) if use_n else None
    names = ["h", "n", "residual", "x", "weight"]
    bound = dict(zip(names, (h_dtype, n_dtype, r_dtype, x_dtype, w_dtype)))
    baseline = _add_rms("torch") if backend == "triton" else _add_rms_oracle
    got = check_parity(f"add_rms_norm/{case}/{backend}/{dtypes}/{mode}", _add_rms(backend),
                       _add_rms_oracle, baseline, [r, x, w], [dh, dn], names, bound)
    assert (got["h"].dtype, got["n"].dtype) == (h_dtype, n_dtype)
    assert got["h"].shape == got["n"].shape == x.shape
    assert (got["residual"].dtype, got["x"].dtype) == (r_dtype, x_dtype)
    if use_n:
        assert got["weight"].dtype == w_dtype
    return got


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_rms_norm_matches_the_float64_oracle(case, backend, dtype):
    check_rms_norm(case, backend, dtype, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NORM_CASES[:3], ids=str)
def test_rms_norm_of_fp16_input_with_an_fp32_weight(case, backend):
    """``n`` in the promoted dtype (fp32), gradients in each operand's dtype."""
    check_rms_norm(case, backend, F16, F32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtypes", NORM_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_add_rms_norm_matches_the_float64_oracle(case, backend, dtypes, mode):
    check_add_rms_norm(case, backend, NORM_DTYPES[dtypes], mode)


# bf16: only on CUDA (the interpreter's bf16 tl.dot is wrong, docs/numerics.md).
@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", NORM_CASES[::2], ids=str)
def test_residual_norms_bf16_cuda(case, mode):
    check_rms_norm(case, "triton", BF16, BF16)
    check_add_rms_norm(case, "triton", (BF16, BF16, BF16), mode)
    check_add_rms_norm(case, "triton", (F32, BF16, F32), mode)  # an fp32 stream, as autocast


@requires_triton
@pytest.mark.parametrize("mode", MODES)
def test_add_rms_norm_gradient_subsets(mode):
    """Each subset of (residual, x, weight) requiring grad: the backward asks only for what it
    needs (rms_norm_bwd's need_dx / need_dw, with and without dh) and still matches."""
    C, M = 300, 21
    use_h, use_n = MODES[mode]
    for subset in ((0,), (1,), (2,), (0, 2), (1, 2), (0, 1)):
        if subset == (2,) and not use_n:
            continue  # nothing to differentiate
        r = torch.randn(M, C, device=DEVICE).requires_grad_(0 in subset)
        x = torch.randn(M, C, device=DEVICE).requires_grad_(1 in subset)
        w = _norm_weight(C, F32, grad=2 in subset)
        douts = [torch.randn(M, C, device=DEVICE) if use else None for use in (use_h, use_n)]
        got = run_with_grads(_add_rms("triton"), [r, x, w], douts)
        want = run_with_grads(_add_rms_oracle, as_float64([r, x, w]), douts)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert (a is None) == (b is None), (subset, mode)
            if b is not None:
                assert rel_error(a, b) < FP32_TOL, (subset, mode)
    # rms_norm: the input or the weight alone.
    for x_grad in (True, False):
        x = torch.randn(M, C, device=DEVICE).requires_grad_(x_grad)
        w = _norm_weight(C, F32, grad=not x_grad)
        dn = [torch.randn(M, C, device=DEVICE)]
        (n,), (g,) = run_with_grads(_rms("triton"), [x, w], dn)
        (n64,), (g64,) = run_with_grads(_rms_oracle, as_float64([x, w]), dn)
        assert rel_error(n, n64) < FP32_TOL and rel_error(g, g64) < FP32_TOL


@requires_triton
def test_inference_without_autograd_gives_the_same_values():
    """Under no_grad (nothing saved for a backward) the same values as with autograd."""
    x, r = (torch.randn(37, 300, device=DEVICE, requires_grad=True) for _ in range(2))
    w = _norm_weight(300, F32)
    with torch.no_grad():
        n = fused.rms_norm(x, w, EPS, backend="triton")
        h, n2 = fused.add_rms_norm(r, x, w, EPS, backend="triton")
    assert torch.equal(n, fused.rms_norm(x, w, EPS, backend="triton"))
    h_grad, n2_grad = fused.add_rms_norm(r, x, w, EPS, backend="triton")
    assert torch.equal(h, h_grad) and torch.equal(n2, n2_grad)
    assert rel_error(n2, _add_rms_oracle(r.double(), x.double(), w.double())[1]) < FP32_TOL


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_like_the_oracle(backend):
    """A NaN or an infinity in a row makes NaN / Inf exactly where the float64 oracle does
    (its row's statistics), and nothing else changes."""
    M, C = 6, 300
    x = torch.randn(M, C, device=DEVICE)
    x[1, 7], x[3, 299], x[4, 0] = float("nan"), float("inf"), float("-inf")
    r = torch.randn(M, C, device=DEVICE)
    r[5, 100] = float("nan")
    w = _norm_weight(C, F32, grad=False)
    n = fused.rms_norm(x, w, EPS, backend=backend)
    h, n2 = fused.add_rms_norm(r, x, w, EPS, backend=backend)
    n64 = _rms_oracle(x.double(), w.double())
    h64, n264 = _add_rms_oracle(r.double(), x.double(), w.double())
    for got, want in ((n, n64), (h, h64), (n2, n264)):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(got), kind(want))
        finite = torch.isfinite(want)
        assert rel_error(got[finite], want[finite]) < FP32_TOL


# --------------------------------------------------------------------------------------------
# silu_mul_gpc_io with the residual added in its epilogue
# --------------------------------------------------------------------------------------------


# G in {1, 2, 5, 13, 20}, per-group widths s and og not powers of two; residual layouts.
TAIL_CASES = [
    (MlpCase(1, 12, 10, (5,), bias=True), "contig"),    # G = 1: the layout is the input padded
    (MlpCase(2, 36, 20, (37,)), "transposed"),          # residual column-major
    (MlpCase(5, 12, 7, (13,), bias=True), "sliced"),
    (MlpCase(5, 15, 6, (3, 5), bias=True), "transposed"),  # 3-D
    (MlpCase(13, 13, 3, (1,)), "contig"),               # one row, s = G
    (MlpCase(20, 24, 6, (7,), sliced=True), "expanded"),  # residual row stride 0
]
# (block, residual) dtypes: the residual stream may be fp32 with an fp16 block (output fp32).
TAIL_DTYPES = {"fp32": (F32, F32), "fp16": (F16, F16), "fp16+stream32": (F16, F32)}


def _tail(backend):
    def fn(gu, w1, w2, b1, b2, r):
        return fused.silu_mul_gpc_io(gu, w1, w2, b1, b2, residual=r, backend=backend)
    return fn


def _tail_oracle(gu, w1, w2, b1, b2, r):
    return _oracle(gu, w1, w2, b1, b2) + r


def check_tail(case: MlpCase, r_layout: str, backend: str, dtype, r_dtype):
    gu, w1, w2, b1, b2 = _operands(case, dtype)
    r = make_input(case.lead, case.G * case.og, r_dtype, r_layout)
    y_dtype = torch.promote_types(dtype, r_dtype)
    dy = torch.randn(*case.lead, case.G * case.og, device=DEVICE).to(y_dtype)
    names = ["y", "gate_up", "weight1", "weight2"] + (["bias1", "bias2"] if case.bias else [])
    names.append("residual")
    # Everything but the residual's gradient (dy itself) is computed from dtype's operands.
    bound = {n: dtype for n in names}

    def rounded_dxi(inputs64, douts, want):
        # The input gradient's W2 term is rounded once (docs/numerics.md), as in
        # test_fused_decoder.check_fused; the residual changes neither term.
        term = _dt_second_term(inputs64[:5], douts[0].to(inputs64[0].device, torch.float64))
        return {"gate_up": rounded_intermediate_bound(dtype, want["gate_up"], term)}

    baseline = _tail("torch") if backend == "triton" else _tail_oracle
    got = check_parity(f"silu_mul_gpc_io/{case}/r{r_layout}/{backend}/{dtype}/{r_dtype}",
                       _tail(backend), _tail_oracle, baseline, [gu, w1, w2, b1, b2, r], [dy],
                       names, bound, rounded_dxi if backend == "triton" else None)
    assert got["y"].dtype == y_dtype and got["y"].shape == r.shape
    assert all(got[n].dtype == dtype for n in names[1:-1])
    # The residual add's gradient is the upstream gradient itself, in the residual's dtype.
    assert got["residual"].dtype == r_dtype
    assert torch.equal(got["residual"], dy.to(r_dtype))
    return got


@pytest.mark.parametrize("dtypes", TAIL_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,r_layout", TAIL_CASES,
                         ids=[f"{c}-r{lay}" for c, lay in TAIL_CASES])
def test_mlp_tail_with_residual_matches_the_float64_oracle(case, r_layout, backend, dtypes):
    check_tail(case, r_layout, backend, *TAIL_DTYPES[dtypes])


@pytest.mark.gpu
@pytest.mark.parametrize("case,r_layout", TAIL_CASES[::2],
                         ids=[f"{c}-r{lay}" for c, lay in TAIL_CASES[::2]])
def test_mlp_tail_with_residual_bf16_cuda(case, r_layout):
    check_tail(case, r_layout, "triton", BF16, BF16)
    check_tail(case, r_layout, "triton", BF16, F32)


@requires_triton
def test_mlp_tail_residual_alone_and_frozen_block():
    """Gradients reach only the residual, or only the block: the other side gets nothing."""
    G, s, og, M = 5, 12, 7, 9
    gu = torch.randn(M, 2 * G * s, device=DEVICE)
    w1, w2 = torch.randn(G, s, og, device=DEVICE), torch.randn(G, s, og, device=DEVICE)
    r = torch.randn(M, G * og, device=DEVICE, requires_grad=True)
    dy = torch.randn(M, G * og, device=DEVICE)
    y = fused.silu_mul_gpc_io(gu, w1, w2, residual=r, backend="triton")
    (dr,) = torch.autograd.grad(y, [r], dy)
    assert torch.equal(dr, dy)
    assert rel_error(y, _tail_oracle(gu.double(), w1.double(), w2.double(), None, None,
                                     r.double())) < FP32_TOL
    w1.requires_grad_(True)
    r_frozen = r.detach()
    y = fused.silu_mul_gpc_io(gu, w1, w2, residual=r_frozen, backend="triton")
    (dw1,) = torch.autograd.grad(y, [w1], dy)
    want = torch.autograd.grad(fused.silu_mul_gpc_io(gu, w1, w2, backend="triton"), [w1], dy)[0]
    assert torch.equal(dw1, want)


# --------------------------------------------------------------------------------------------
# Every config: the residual epilogue under each GPU config; the norms' one config
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETING, reason="forces configs through Triton's interpreter")
@pytest.mark.parametrize("config", _layout_gpu_configs(),
                         ids=lambda c: "{BLOCK_P}x{BLOCK_Q}x{BLOCK_K}".format(**c.kwargs)
                         + f"-w{c.num_warps}s{c.num_stages}")
def test_every_gpu_config_of_the_residual_epilogue_interpreted(config, monkeypatch):
    """``gpc_io_layout_fwd`` with HAS_RESIDUAL in each config the autotuner may pick, on shapes
    with partial tiles in every dimension: M = 130 rows (P), og = 70 (Q), G*R = 2*72 = 144 (K,
    R = 72 not a multiple of BLOCK_K); the residual column-major (both of its strides used)."""
    forced = []

    def force(spec):
        if spec.name != "gpc_io_layout_fwd":
            return None
        forced.append((spec.args["HAS_RESIDUAL"], list(spec.configs)))
        return config

    monkeypatch.setattr(launch, "FORCE_CONFIG", force)
    check_tail(MlpCase(2, 140, 70, (130,), bias=True), "transposed", "triton", F32, F32)
    assert [has for has, _ in forced] == [True]
    # What the GPU autotuner chooses from at this shape is among the configs run here.
    known = {str(c) for c in CUDA_CONFIGS}
    assert forced[0][1] and all(str(c) in known for c in forced[0][1])


@pytest.mark.skipif(not INTERPRETING, reason="FORCE_CONFIG is consulted by the interpreter")
def test_the_norm_kernels_have_one_config_the_interpreted_one(monkeypatch):
    """The norm launches have no autotuning: the one config a GPU runs is the one interpreted
    here (rowwise._config), at every shape of these tests' kinds."""
    seen = []

    def record(spec):
        if spec.name in ("rms_norm", "add_rms_norm", "rms_norm_bwd"):
            seen.append(spec)
        return None

    monkeypatch.setattr(launch, "FORCE_CONFIG", record)
    for M, C in ((1, 72), (37, 300), (5, 1280), (17, 257), (21, 24)):
        x, r = torch.randn(M, C, device=DEVICE), torch.randn(M, C, device=DEVICE)
        x.requires_grad_(True)
        w = _norm_weight(C, F32)
        n = fused.rms_norm(x, w, EPS, backend="triton")
        torch.autograd.grad(n, [x, w], torch.randn_like(n))
        h, n = fused.add_rms_norm(r, x, w, EPS, backend="triton")
        torch.autograd.grad([h, n], [x, w], [torch.randn_like(h), torch.randn_like(n)])
    assert {s.name for s in seen} == {"rms_norm", "add_rms_norm", "rms_norm_bwd"}
    for spec in seen:
        assert len(spec.configs) == 1, spec.name
        assert (launch.config_kwargs(spec.configs[0])
                == launch.config_kwargs(spec.interpreter_config))
        M, C = spec.args["M"], spec.args["CHANNELS"]
        assert launch.config_kwargs(spec.configs[0]) == launch.config_kwargs(
            rowwise._config(M, C))


# --------------------------------------------------------------------------------------------
# Nothing left unwritten, no rows, bad input
# --------------------------------------------------------------------------------------------


def _everything(backend):
    """Outputs and gradients of the three functions on shapes with partial row blocks and
    channel chunks."""
    torch.manual_seed(1)
    results = []
    C, M = 300, 37
    x = torch.randn(M, C, device=DEVICE, requires_grad=True)
    r = torch.randn(M, C, device=DEVICE, requires_grad=True)
    w = _norm_weight(C, F32)
    d1, d2 = torch.randn(M, C, device=DEVICE), torch.randn(M, C, device=DEVICE)
    outs, grads = run_with_grads(_rms(backend), [x, w], [d1])
    results += outs + grads
    for douts in ([d1, d2], [None, d2], [d1, None]):
        outs, grads = run_with_grads(_add_rms(backend), [r, x, w], douts)
        results += outs + [g for g in grads if g is not None]
    case = MlpCase(5, 12, 7, (13,), bias=True)
    inputs = [*_operands(case, F32), torch.randn(13, 35, device=DEVICE, requires_grad=True)]
    outs, grads = run_with_grads(_tail(backend), inputs, [torch.randn(13, 35, device=DEVICE)])
    return results + outs + grads


@requires_triton
def test_poisoned_outputs_leak_no_nan(monkeypatch):
    """Outputs start as NaN when POISON is on (the conftest turns it on for every test): the
    kernels write every element, so results are finite and equal to unpoisoned ones."""
    monkeypatch.setattr(outputs, "POISON", False)
    clean = _everything("triton")
    monkeypatch.setattr(outputs, "POISON", True)
    poisoned = _everything("triton")
    assert len(clean) == len(poisoned)
    for a, b in zip(clean, poisoned):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_give_empty_results_and_zero_weight_gradients(backend):
    C = 72
    w = _norm_weight(C, F32)
    for lead in ((0,), (2, 0)):
        x = torch.randn(*lead, C, device=DEVICE, requires_grad=True)
        r = torch.randn(*lead, C, device=DEVICE, requires_grad=True)
        n = fused.rms_norm(x, w, EPS, backend=backend)
        assert n.shape == x.shape
        dx, dw = torch.autograd.grad(n, [x, w], torch.ones_like(n))
        assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
        for use_h in (True, False):
            h, n = fused.add_rms_norm(r, x, w, EPS, backend=backend)
            assert h.shape == n.shape == x.shape
            outs = [h, n] if use_h else [n]
            dr, dx, dw = torch.autograd.grad(outs, [r, x, w], [torch.ones_like(o) for o in outs])
            assert dr.shape == dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w))
    G, s, og = 5, 12, 7
    gu = torch.randn(2, 0, 2 * G * s, device=DEVICE, requires_grad=True)
    w1 = torch.randn(G, s, og, device=DEVICE, requires_grad=True)
    w2 = torch.randn(G, s, og, device=DEVICE, requires_grad=True)
    b1 = torch.randn(G, og, device=DEVICE, requires_grad=True)
    res = torch.randn(2, 0, G * og, device=DEVICE, requires_grad=True)
    y = fused.silu_mul_gpc_io(gu, w1, w2, b1, residual=res, backend=backend)
    assert y.shape == res.shape
    grads = torch.autograd.grad(y.sum(), [gu, res, w1, w2, b1])
    assert grads[0].shape == gu.shape and grads[1].shape == res.shape
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[2:])


def _forbid_every_launch(monkeypatch):
    """forbid_launch (every launcher of ``torch_impl``, the fused ones included), plus the fused
    operators and the Triton launchers of the fused decoder (``triton_fused``)."""
    from kphi3_kernels.ops import triton_fused

    forbid_launch(monkeypatch)

    def boom(*args, **kwargs):
        raise AssertionError("a kernel / launcher ran although the input should have been rejected")

    for name in ("rms_norm", "add_rms_norm", "mlp_tail"):
        monkeypatch.setattr(fused_ops, name, boom)
    for name in triton_fused.__all__:
        monkeypatch.setattr(triton_fused, name, boom)


def _f(*shape, dtype=F32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


C_BAD = 15
TG, TS, TOG = 5, 12, 7  # the MLP tail's G, s, og
TW = (TG, TS, TOG)


def _tail_call(residual, b):
    return fused.silu_mul_gpc_io(_f(4, 2 * TG * TS), _f(*TW), _f(*TW), residual=residual,
                                 backend=b)


# (id, call(backend), exception, message regex)
BAD_CASES = [
    ("rms-weight-shape", lambda b: fused.rms_norm(_f(4, C_BAD), _f(C_BAD + 1), EPS, backend=b),
     ValueError, r"norm_weight must have shape \(15,\), got \(16,\)"),
    ("rms-weight-2d", lambda b: fused.rms_norm(_f(4, C_BAD), _f(1, C_BAD), EPS, backend=b),
     ValueError, "norm_weight must have shape"),
    ("rms-eps-negative", lambda b: fused.rms_norm(_f(4, C_BAD), _f(C_BAD), -1e-6, backend=b),
     ValueError, "eps must be a non-negative number"),
    ("rms-eps-nan", lambda b: fused.rms_norm(_f(4, C_BAD), _f(C_BAD), float("nan"), backend=b),
     ValueError, "eps"),
    ("rms-eps-bool", lambda b: fused.rms_norm(_f(4, C_BAD), _f(C_BAD), True, backend=b),
     ValueError, "eps"),
    ("rms-int-x", lambda b: fused.rms_norm(torch.ones(4, C_BAD, dtype=torch.int64),
                                           _f(C_BAD), EPS, backend=b),
     TypeError, "floating-point.*int64"),
    ("rms-int-weight", lambda b: fused.rms_norm(_f(4, C_BAD), torch.ones(C_BAD, dtype=torch.int32),
                                                EPS, backend=b),
     TypeError, "norm_weight must be floating-point"),
    ("rms-0d", lambda b: fused.rms_norm(_f(), _f(1), EPS, backend=b), ValueError, "0-d"),
    ("rms-list", lambda b: fused.rms_norm([[1.0] * C_BAD], _f(C_BAD), EPS, backend=b),
     TypeError, "Tensor"),
    ("rms-weight-meta", lambda b: fused.rms_norm(_f(4, C_BAD), _f(C_BAD, device="meta"), EPS,
                                                 backend=b),
     ValueError, "weight is on meta"),
    ("add-residual-shape", lambda b: fused.add_rms_norm(_f(4, C_BAD + 1), _f(4, C_BAD),
                                                        _f(C_BAD), EPS, backend=b),
     ValueError, "residual and x must have one shape"),
    ("add-residual-broadcast", lambda b: fused.add_rms_norm(_f(1, C_BAD), _f(4, C_BAD),
                                                            _f(C_BAD), EPS, backend=b),
     ValueError, "one shape"),
    ("add-residual-int", lambda b: fused.add_rms_norm(torch.ones(4, C_BAD, dtype=torch.int64),
                                                      _f(4, C_BAD), _f(C_BAD), EPS, backend=b),
     TypeError, "residual must be floating-point"),
    ("add-residual-meta", lambda b: fused.add_rms_norm(_f(4, C_BAD, device="meta"),
                                                       _f(4, C_BAD), _f(C_BAD), EPS, backend=b),
     ValueError, "residual is on meta"),
    ("add-weight-meta", lambda b: fused.add_rms_norm(_f(4, C_BAD), _f(4, C_BAD),
                                                     _f(C_BAD, device="meta"), EPS, backend=b),
     ValueError, "weight is on meta"),
    ("add-weight-shape", lambda b: fused.add_rms_norm(_f(4, C_BAD), _f(4, C_BAD), _f(C_BAD - 1),
                                                      EPS, backend=b),
     ValueError, "norm_weight must have shape"),
    ("add-eps-negative", lambda b: fused.add_rms_norm(_f(4, C_BAD), _f(4, C_BAD), _f(C_BAD),
                                                      -1.0, backend=b),
     ValueError, "eps must be a non-negative"),
    ("add-int-x", lambda b: fused.add_rms_norm(_f(4, C_BAD),
                                               torch.ones(4, C_BAD, dtype=torch.int16),
                                               _f(C_BAD), EPS, backend=b),
     TypeError, "x must be floating-point"),
    ("tail-residual-width", lambda b: _tail_call(_f(4, TG * TOG + 1), b),
     ValueError, r"residual must have the result's shape \(4, 35\), got \(4, 36\)"),
    ("tail-residual-rows", lambda b: _tail_call(_f(5, TG * TOG), b),
     ValueError, "residual must have the result's shape"),
    ("tail-residual-rank", lambda b: _tail_call(_f(1, 4, TG * TOG), b),
     ValueError, "residual must have the result's shape"),
    ("tail-residual-int", lambda b: _tail_call(torch.ones(4, TG * TOG, dtype=torch.int64), b),
     TypeError, "residual must be floating-point"),
    ("tail-residual-0d", lambda b: _tail_call(_f(), b), ValueError, "0-d"),
    ("tail-residual-list", lambda b: _tail_call([[0.0] * TG * TOG] * 4, b),
     TypeError, "residual must be a torch.Tensor"),
    ("tail-residual-meta", lambda b: _tail_call(_f(4, TG * TOG, device="meta"), b),
     ValueError, "residual is on meta"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("call,exc,msg", [pytest.param(c, e, m, id=i) for i, c, e, m in BAD_CASES])
def test_bad_input_raises_before_launch(call, exc, msg, backend, monkeypatch):
    _forbid_every_launch(monkeypatch)
    with pytest.raises(exc, match=msg):
        call(backend)


def test_forbid_every_launch_really_forbids(monkeypatch):
    """The guard the test above relies on: with it, a valid call of each fails."""
    _forbid_every_launch(monkeypatch)
    x, w = _f(4, C_BAD), _f(C_BAD)
    for call in (lambda: fused.rms_norm(x, w, EPS, backend="triton"),
                 lambda: fused.add_rms_norm(x, x, w, EPS, backend="triton"),
                 lambda: _tail_call(_f(4, TG * TOG), "triton")):
        with pytest.raises(AssertionError, match="should have been rejected"):
            call()


# --------------------------------------------------------------------------------------------
# The operators: opcheck, and torch.compile of a decoder's residual stream
# --------------------------------------------------------------------------------------------


CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
          "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def _t(*shape, grad=False, dtype=F32):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(grad)


def _rstd(x):
    return torch.rsqrt(x.float().pow(2).mean(-1) + EPS)


def _strided(M, C, grad=False):
    return torch.randn(C, M, device=DEVICE).requires_grad_(grad).t()


def _tail_args(M, G, s, og, dtype=F32, residual_dtype=F32, grad=True):
    """``mlp_tail``'s arguments: gate_up, weights, bias1 (no bias2), the residual, the run, no
    activation given."""
    run = layout.residue_run_length(G * s, G)
    block = [_t(*shape, grad=grad, dtype=dtype) for shape in
             ((M, 2 * G * s), (G, s, og), (G, s, og), (G, og))]
    return (*block, None, _t(M, G * og, grad=grad, dtype=residual_dtype), run, None)


@requires_triton
def test_a_float64_residual_is_added_in_float64():
    """An fp32 block with a float64 residual: the epilogue adds in float64 (the output's
    dtype), so the result is the fp32 block's output plus the residual, exactly."""
    gu, w1, w2, b1, _, r, _, _ = _tail_args(9, 5, 12, 7, grad=False)
    r = (r.double() * 1e3)
    y = fused.silu_mul_gpc_io(gu, w1, w2, b1, residual=r, backend="triton")
    block = fused.silu_mul_gpc_io(gu, w1, w2, b1, backend="triton")
    assert y.dtype == torch.float64 and torch.equal(y, block.double() + r)


# (id, operator, args builder); rms_norm_bwd has no autograd formula of its own, so its
# operands require no grad.
OPCHECK_CASES = [
    ("all-grad", "rms_norm", lambda: (_t(5, 72, grad=True), _t(72, grad=True), EPS)),
    ("strided-no-grad", "rms_norm", lambda: (_strided(7, 300), _t(300), EPS)),
    ("all-grad", "add_rms_norm",
     lambda: (_t(5, 72, grad=True), _t(5, 72, grad=True), _t(72, grad=True), EPS)),
    ("stream32-strided", "add_rms_norm",
     lambda: (_strided(6, 40, grad=True), _t(6, 40, grad=True, dtype=F16), _t(40), EPS)),
    ("stream32-no-grad", "add_rms_norm",
     lambda: (_strided(6, 40), _t(6, 40, dtype=F16), _t(40), EPS)),
    ("with-dh", "rms_norm_bwd",
     lambda: (lambda x: (_t(5, 72), _t(5, 72), x, _t(72), _rstd(x), True, True))(_t(5, 72))),
    ("dw-only", "rms_norm_bwd",
     lambda: (lambda x: (_t(5, 300), None, x, _t(300), _rstd(x), False, True))(_t(5, 300))),
    ("residual", "mlp_tail", lambda: _tail_args(7, 5, 12, 7)),
    ("fp16-stream32-no-grad", "mlp_tail",
     lambda: _tail_args(3, 2, 36, 20, dtype=F16, residual_dtype=F32, grad=False)),
]
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make", [pytest.param(n, m, id=f"{n}-{i}")
                                       for i, n, m in OPCHECK_CASES])
def test_opcheck_the_new_operators(name, make, backend):
    from torch.library import opcheck

    opcheck(custom_ops.op(name, backend).default, make(), test_utils=CHECKS)


def _decoder_tail(backend):
    """A decoder layer's second half: the residual add after the attention and the norm after
    it, gate_up, the MLP tail with the residual added, the next layer's norm."""
    def fn(r, x, w_ln, w_gu, w1, w2, b1, w_next):
        h, n = fused.add_rms_norm(r, x, w_ln, EPS, backend=backend)
        y = fused.silu_mul_gpc_io(n @ w_gu, w1, w2, b1, residual=h, backend=backend)
        return y, fused.rms_norm(y, w_next, 1e-6, backend=backend)
    return fn


def _decoder_inputs():
    G, s, og = 5, 12, 7
    H = G * og
    return [_t(2, 9, H, grad=True), _t(2, 9, H, grad=True), _norm_weight(H, F32),
            (_t(H, 2 * G * s) * H ** -0.5).requires_grad_(True),
            *(t.requires_grad_(True) for t in _operands(MlpCase(G, s, og, (1,)), F32)[1:3]),
            _t(G, og, grad=True), _norm_weight(H, F32)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_of_the_residual_stream_matches_eager(backend):
    inputs = _decoder_inputs()
    douts = [torch.randn(2, 9, 35, device=DEVICE), torch.randn(2, 9, 35, device=DEVICE)]
    eager = run_with_grads(_decoder_tail(backend), inputs, douts)
    torch._dynamo.reset()
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(_decoder_tail(backend), fullgraph=True, backend=record)
    got = run_with_grads(compiled, inputs, douts)  # fullgraph: a graph break would raise here
    for op in (f"add_rms_norm_{backend}", f"mlp_tail_{backend}", f"rms_norm_{backend}"):
        assert any(op in s for s in seen), (op, seen)
    errs = [rel_error(a, b) for a, b in zip(got[0] + got[1], eager[0] + eager[1])]
    assert max(errs) < FP32_TOL, errs
    # And the same as the torch backend.
    want = run_with_grads(_decoder_tail("torch"), inputs, douts)
    errs = [rel_error(a, b) for a, b in zip(got[0] + got[1], want[0] + want[1])]
    assert max(errs) < FP32_TOL, errs
