"""Each checker in the suite and in the benchmarks enforces the numerics contract of
docs/numerics.md, no looser: it accepts an honest result and rejects one scaled by (1 + 3e-5) in
fp32, by (1 + 2e-2) in fp16 / bf16, or whose error is just over 2x the plain PyTorch path's.
A result that rounds an intermediate by design meets its rounding bound instead of that ratio,
whichever of the two is larger.
"""
import pytest
import torch

import kphi3_kernels
from kphi3_bench import gpu_check, parity
from kphi3_kernels import reference as R

import _utils
from _utils import (FP32_TOL, HALF_RATIO, HALF_SLACK, HALF_TOL, Case, check_op, check_parity,
                    contract_failure, fused_model_failures, make_operands, ratio_limit, rel_error)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FP32_SCALE, HALF_SCALE = 1 + 3e-5, 1 + 2e-2
# An error just over the ratio limit of a plain path erring by BASE.
BASE = 1e-3
JUST_OVER = ratio_limit(BASE) * (1 + 1e-6)


def test_the_benchmarks_state_the_tests_contract():
    assert (parity.FP32_TOL, parity.HALF_TOL, parity.HALF_RATIO, parity.HALF_SLACK) == \
        (FP32_TOL, HALF_TOL, HALF_RATIO, HALF_SLACK) == (1e-5, 1e-2, 2.0, 1e-4)
    assert parity.tolerance(F32) == FP32_TOL
    assert parity.tolerance(F16) == parity.tolerance(BF16) == HALF_TOL


# --------------------------------------------------------------------------------------------
# The verdicts themselves: tests/_utils.contract_failure and kphi3_bench.parity.contract_failure
# --------------------------------------------------------------------------------------------

VERDICTS = {"tests": contract_failure, "benchmarks": parity.contract_failure}


@pytest.mark.parametrize("verdict", VERDICTS)
def test_verdict_is_the_contract(verdict):
    fails = VERDICTS[verdict]
    assert fails(0.99 * FP32_TOL, F32) is None and fails(3e-5, F32) is not None
    for dtype in (F16, BF16):
        assert fails(ratio_limit(BASE), dtype, BASE) is None
        assert fails(JUST_OVER, dtype, BASE) is not None
        assert fails(2e-2, dtype, 1.5e-2) is not None  # under 2x the plain path, over 1e-2
        assert fails(4e-3, dtype, 1e-3) is not None    # no floor under which the ratio is waived
        assert fails(float("nan"), dtype, BASE) is not None
        with pytest.raises(ValueError):
            fails(1e-3, dtype)  # half precision cannot be judged without the plain path


@pytest.mark.parametrize("verdict", VERDICTS)
def test_a_rounding_bound_replaces_the_ratio(verdict):
    fails = VERDICTS[verdict]
    assert fails(3e-3, F16, BASE, rounding_bound=4e-3) is None      # over the ratio, within
    assert fails(2e-3, F16, BASE, rounding_bound=1.5e-3) is not None  # under the ratio, over
    assert fails(1.1e-2, F16, BASE, rounding_bound=2e-2) is not None  # never over 1e-2


# --------------------------------------------------------------------------------------------
# check_parity
# --------------------------------------------------------------------------------------------


def _linear_inputs(dtype):
    torch.manual_seed(0)
    x = torch.randn(37, 6 * 3).to(dtype).requires_grad_()
    w = (torch.randn(3, 6, 5) / 6 ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(3, 5).to(dtype).requires_grad_()
    return [x, w, b], [torch.randn(37, 15).to(dtype)]


def _scaled(fn, factor):
    """``fn`` with its output (so every gradient too) multiplied by ``factor``."""
    return lambda *a: fn(*a) * factor


def _run_check_parity(fn, baseline, dtype, bound_dtype=None, extra_limits=None):
    inputs, douts = _linear_inputs(dtype)
    names = ["y", "x", "weight", "bias"]
    bound = {n: bound_dtype or dtype for n in names}
    return check_parity("grouped_linear", fn, R.grouped_linear, baseline, inputs, douts, names,
                        bound, extra_limits)


def _torch_backend(x, w, b):
    return kphi3_kernels.grouped_linear(x, w, b, backend="torch")


@pytest.mark.parametrize("dtype,factor", [(F32, FP32_SCALE), (F16, HALF_SCALE)],
                         ids=["fp32", "fp16"])
def test_check_parity_accepts_honest_and_rejects_scaled_results(dtype, factor):
    _run_check_parity(_torch_backend, R.grouped_linear, dtype)
    with pytest.raises(AssertionError):
        _run_check_parity(_scaled(_torch_backend, factor), R.grouped_linear, dtype)


def _float64_oracle_in_fp32(x, w, b):
    """The oracle to about 1e-7 (fp32 inputs): a base for errors set by a scale factor alone."""
    return R.grouped_linear(x.double(), w.double(), b.double()).float()


def test_check_parity_rejects_an_error_just_over_twice_the_plain_path():
    # fp32 operands held to the half bound: the errors are the scale factors to about 1e-7.
    plain = _scaled(_float64_oracle_in_fp32, 1 + BASE)
    _run_check_parity(_scaled(_float64_oracle_in_fp32, 1 + ratio_limit(BASE) - 1e-5), plain,
                      F32, bound_dtype=F16)
    with pytest.raises(AssertionError, match="plain path"):
        _run_check_parity(_scaled(_float64_oracle_in_fp32, 1 + ratio_limit(BASE) + 1e-5), plain,
                          F32, bound_dtype=F16)


def test_check_parity_rounding_bound_replaces_the_ratio():
    plain = _scaled(_float64_oracle_in_fp32, 1 + BASE)

    def bounds(value):
        return lambda inputs64, douts, want: {n: value for n in ("y", "x", "weight", "bias")}

    over_ratio = _scaled(_float64_oracle_in_fp32, 1 + 3e-3)
    _run_check_parity(over_ratio, plain, F32, F16, extra_limits=bounds(4e-3))
    under_ratio = _scaled(_float64_oracle_in_fp32, 1 + 2e-3)
    _run_check_parity(under_ratio, plain, F32, F16)
    with pytest.raises(AssertionError, match="rounding bound"):
        _run_check_parity(under_ratio, plain, F32, F16, extra_limits=bounds(1.5e-3))


# --------------------------------------------------------------------------------------------
# check_op
# --------------------------------------------------------------------------------------------


@pytest.fixture
def scale_grouped_linear(monkeypatch):
    """Scales the package's grouped_linear output (not the reference's) by a factor."""
    original = kphi3_kernels.grouped_linear

    def scale(factor):
        monkeypatch.setattr(kphi3_kernels, "grouped_linear",
                            lambda *a, **k: original(*a, **k) * factor)
    return scale


CASE = Case(3, 6, 5, (37,), "contig", True)


@pytest.mark.parametrize("dtype,factor", [(F32, FP32_SCALE), (F16, HALF_SCALE), (BF16, HALF_SCALE),
                                          (F16, 1 + 3e-3)],
                         ids=["fp32", "fp16", "bf16", "fp16-under-1e-2-over-2x"])
def test_check_op_accepts_honest_and_rejects_scaled_results(dtype, factor, scale_grouped_linear):
    torch.manual_seed(0)
    errs = check_op("grouped_linear", make_operands("grouped_linear", CASE, dtype), "torch", dtype)
    if factor == 1 + 3e-3:  # the scaled output errs under 1e-2: only the ratio can refuse it
        assert max(errs.values()) < 1e-3
    scale_grouped_linear(factor)
    torch.manual_seed(0)
    with pytest.raises(AssertionError):
        check_op("grouped_linear", make_operands("grouped_linear", CASE, dtype), "torch", dtype)


def test_check_op_rejects_an_error_over_twice_the_plain_path(monkeypatch):
    honest = _utils.plain_path_errors
    torch.manual_seed(0)
    errs = check_op("grouped_linear", make_operands("grouped_linear", CASE, F16), "torch", F16)
    # The same result against a plain path whose every error is just under half of it.
    monkeypatch.setattr(_utils, "plain_path_errors",
                        lambda *a: {n: (e - HALF_SLACK) / HALF_RATIO * (1 - 1e-6)
                                    for n, e in honest(*a).items()})
    torch.manual_seed(0)
    assert max(errs.values()) > HALF_SLACK  # an error over the slack alone: the ratio decides
    with pytest.raises(AssertionError, match="plain path"):
        check_op("grouped_linear", make_operands("grouped_linear", CASE, F16), "torch", F16)


# --------------------------------------------------------------------------------------------
# The fused model's check (tests/test_fused_decoder.check_fused_model)
# --------------------------------------------------------------------------------------------


def _model_errors(fused, unfused, plain):
    return ({"logits": fused, "w": fused}, {"logits": unfused, "w": unfused},
            {"logits": plain, "w": plain})


def _scaled_error(factor, dtype):
    """The error of an output scaled by ``factor`` in ``dtype``."""
    torch.manual_seed(0)
    y = torch.randn(64, 32, dtype=torch.float64)
    return rel_error((y * factor).to(dtype), y)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_fused_model_check_accepts_honest_and_rejects_scaled_results(dtype):
    honest = _scaled_error(1, dtype)
    assert fused_model_failures(*_model_errors(honest, honest, honest), dtype) == {}
    scaled = _scaled_error(FP32_SCALE if dtype == F32 else HALF_SCALE, dtype)
    assert fused_model_failures(*_model_errors(scaled, honest, honest), dtype)


def test_fused_model_check_rejects_just_over_twice_either_path():
    assert fused_model_failures(*_model_errors(ratio_limit(BASE), BASE, BASE), F16) == {}
    fused_over = fused_model_failures(*_model_errors(JUST_OVER, BASE, BASE), F16)
    assert set(fused_over) == {"fused logits", "fused w", "fused vs op-level logits",
                               "fused vs op-level w"}
    # The op-level model is held to the contract too, not only used as the fused one's base.
    unfused_over = fused_model_failures(*_model_errors(BASE, JUST_OVER, BASE), F16)
    assert set(unfused_over) == {"op-level logits", "op-level w"}
    # No slack beyond the contract's: 1e-4 over the ratio, and never over 1e-2.
    assert fused_model_failures(*_model_errors(2 * BASE + 5e-4, BASE, BASE), F16)
    assert fused_model_failures(*_model_errors(1.2e-2, 1e-2, 1e-2), F16)


# --------------------------------------------------------------------------------------------
# The benchmarks' parity gate (kphi3_bench.parity.check)
# --------------------------------------------------------------------------------------------


def _gate(dtype, factor, grads, rounded=()):
    torch.manual_seed(0)
    G, s, og, M = 4, 16, 8, 33
    x = torch.randn(M, G * s).to(dtype)
    params = [(torch.randn(G, s, og) / (2 * s) ** 0.5).to(dtype).requires_grad_()
              for _ in range(2)]
    dy = torch.randn(M, G * og).to(dtype)
    oracle = parity.Oracle(x, params, dy)

    def fn(x_):
        return kphi3_kernels.gpc_io(x_, *params, backend="torch") * factor

    result = parity.check(fn, x, params, dy, oracle, parity.tolerance(dtype), grads, rounded)
    return result.ok_for("fwd+bwd" if grads else "fwd"), result


@pytest.mark.parametrize("grads", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype,factor", [(F32, FP32_SCALE), (F16, HALF_SCALE), (BF16, HALF_SCALE),
                                          (F16, 1 + 3e-3)],
                         ids=["fp32", "fp16", "bf16", "fp16-under-1e-2-over-2x"])
def test_benchmark_gate_accepts_honest_and_rejects_scaled_results(dtype, factor, grads):
    ok, result = _gate(dtype, 1.0, grads)
    assert ok, result.failures
    ok, result = _gate(dtype, factor, grads)
    assert not ok and result.failures
    if factor == 1 + 3e-3:
        assert max(result.errors.values()) < HALF_TOL  # refused by the ratio alone


def test_benchmark_gate_holds_a_rounded_result_to_its_rounding_bound():
    ok, result = _gate(F16, 1.0, True, rounded=["dx"])
    assert ok, result.failures
    ok, result = _gate(F16, 1 + 3e-3, True, rounded=["dx"])  # over 1.5u: over the bound too
    assert not ok and "dx" in result.failures


# --------------------------------------------------------------------------------------------
# gpu_check's parity step
# --------------------------------------------------------------------------------------------


def test_gpu_check_verdict_is_the_contract():
    honest = {"y": 2e-3, "dx": 3e-3}
    assert gpu_check.case_failures(honest, honest, BF16) == {}
    assert gpu_check.case_failures({"y": JUST_OVER, "dx": 3e-3}, {"y": BASE, "dx": 3e-3}, BF16)
    scaled = {n: e + 2e-2 for n, e in honest.items()}
    assert set(gpu_check.case_failures(scaled, scaled, F16)) == {"y", "dx"}
    # Formerly passed: under 5e-3 at twice the torch backend's ratio, or under 2e-2 at 1.5x.
    assert gpu_check.case_failures({"y": 4e-3}, {"y": 1e-3}, BF16)
    assert gpu_check.case_failures({"y": 1.5e-2}, {"y": 1.2e-2}, BF16)
    # The rounding bound replaces the ratio, both ways.
    assert gpu_check.case_failures({"dx": 3e-3}, {"dx": BASE}, BF16, {"dx": 4e-3}) == {}
    assert gpu_check.case_failures({"dx": 2e-3}, {"dx": BASE}, BF16, {"dx": 1.5e-3})


@pytest.fixture
def candidate_scaled_by(monkeypatch):
    """A stand-in 'triton' candidate: the torch backend with its output scaled by a factor."""
    def scale(factor):
        for op in ("grouped_linear", "gpc_io", "gpc_block"):
            original = getattr(kphi3_kernels, op)

            def fn(*a, backend=None, __original=original, **k):
                y = __original(*a, backend="torch", **k)
                return y * factor if backend == "triton" else y

            monkeypatch.setattr(kphi3_kernels, op, fn)
    return scale


@pytest.mark.parametrize("factor,ok", [(1.0, True), (HALF_SCALE, False), (1 + 3e-3, False)],
                         ids=["honest", "scaled-2e-2", "scaled-3e-3"])
def test_gpu_check_parity_cases_on_a_scaled_candidate(candidate_scaled_by, factor, ok):
    candidate_scaled_by(factor)
    cases = gpu_check.parity_cases(torch.device("cpu"), "triton", gpu_check.DRY_SHAPES[:1], (7,))
    assert {c["op"] for c in cases} == {"gpc_io", "grouped_linear", "gpc_block"}
    assert all("error" not in c for c in cases), cases
    # bf16's own error (u = 2^-8) hides a 3e-3 scale; fp16's (u = 2^-11) does not.
    judged = [c for c in cases if factor != 1 + 3e-3 or c["dtype"] == "fp16"]
    assert all(c["ok"] is ok for c in judged), [(c["op"], c["dtype"], c["failures"])
                                                for c in judged]
    io_cases = [c for c in cases if c["op"] == "gpc_io"]
    assert all(set(c["rounding_bounds"]) == {"dx"} for c in io_cases)
