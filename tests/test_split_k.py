"""Split K in the weight gradients (``grouped_gemm.split_plan``, ``_split_k_sum_kernel``).

The shape rule on hand-computed cases; parity of every weight gradient with the float64 oracle
for every forced split count, in fp32 and fp16 through the interpreter, G from 1 to 20, M = 0, 1
and odd; every GPU config of the one GEMM with the split; bitwise-equal repeat runs.
"""
import pytest
import torch
import triton

from kphi3_kernels import fused
from kphi3_kernels import reference as R
from kphi3_kernels.ops import grouped_gemm as GG
from kphi3_kernels.ops import launch

from _utils import (Case, assert_meets_contract, check_op, force_gemm_config, make_operands,
                    rel_error, requires_interpreter)

CPU = torch.device("cpu")
FIRST = GG.CUDA_CONFIGS[0]  # 128x256x64
SPLITS = [2, 3, 7, 16]


# --- the shape rule ---------------------------------------------------------------------------

def test_twenty_programs_on_132_sms_split_six_ways():
    # o_proj's paired dW at M = 8192: 2 * 5 groups * (256/128) * (256/256) = 20 programs. Six
    # splits run 120 programs in one wave (a sixth of the work each); seven would take two waves.
    assert GG.split_plan(256, 256, 8192, 10, FIRST, CPU, sms=132) == (6, 1408)


@pytest.mark.parametrize("P, Q, groups, config, want", [
    (256, 768, 10, FIRST, (2, 4096)),          # qkv: 60 programs -> 120, one wave
    (256, 2048, 10, FIRST, (3, 2816)),         # gate_up: 160 programs (2 waves) -> 480 (4 of 1/3)
    (256, 64, 40, GG.CUDA_CONFIGS[3], (3, 2816)),  # down (128x64): 80 programs -> 240
])
def test_released_weight_gradients_at_8192_tokens(P, Q, groups, config, want):
    assert GG.split_plan(P, Q, 8192, groups, config, CPU, sms=132) == want


@pytest.mark.parametrize("K", [0, 1, 16, 1023, 2047])
def test_short_reductions_never_split(K):
    # Each split keeps SPLIT_MIN_K of the reduction: under two of those there is nothing to split.
    assert GG.split_plan(256, 256, K, 10, FIRST, CPU, sms=132) == (1, K)


def test_a_full_wave_is_not_split():
    assert GG.split_plan(256, 256, 8192, 10, GG.CUDA_CONFIGS[-1], CPU, sms=132)[0] == 1  # 320


def test_split_ranges_are_whole_multiples_of_every_block_k():
    for K in (1025, 4097, 8192, 12345):
        for want in range(2, 17):
            GG.FORCE_SPLITS = want
            try:
                splits, per = GG.split_plan(64, 64, K, 1, FIRST, CPU)
            finally:
                GG.FORCE_SPLITS = None
            assert per % 128 == 0 and (splits - 1) * per < K <= splits * per


# --- parity, every split count ----------------------------------------------------------------

@pytest.fixture
def splits(request, monkeypatch):
    monkeypatch.setattr(GG, "FORCE_SPLITS", request.param)
    return request.param


def _launch_names(monkeypatch):
    names = []
    monkeypatch.setattr(launch, "FORCE_CONFIG", lambda spec: names.append(spec.name))
    return names


SPLIT_CASES = [  # K = M rows; 2049 rows give up to 17 ranges of 128, 515 rows 5
    ("grouped_linear", Case(1, 48, 80, (2049,), "contig", True)),
    ("gpc_io", Case(2, 7, 5, (3, 431), "sliced", True)),
    ("gpc_io", Case(20, 5, 3, (515,), "contig", False)),
    ("gpc_block", Case(5, 12, 7, (701,), "transposed", True)),
    ("gpc_block", Case(3, 7, 12, (257,), "contig", True, second=False)),
]


@requires_interpreter
@pytest.mark.parametrize("splits", SPLITS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op, case", SPLIT_CASES, ids=lambda v: getattr(v, "id", v))
def test_weight_gradients_split_k_ways_match_the_float64_oracle(op, case, dtype, splits,
                                                                 monkeypatch):
    names = _launch_names(monkeypatch)
    check_op(op, make_operands(op, case, dtype), "triton", dtype)
    assert any(n.endswith("_sum") for n in names), names


@requires_interpreter
@pytest.mark.parametrize("splits", [3], indirect=True)
@pytest.mark.parametrize("rows", [0, 1])
def test_no_rows_or_one_row_with_splits_forced(rows, splits):
    for op in ("grouped_linear", "gpc_io"):
        check_op(op, make_operands(op, Case(3, 7, 5, (rows,), "contig", True), torch.float32),
                 "triton", torch.float32)


def _layout_dw(gate_up, w1, w2):
    w1, w2 = (w.detach().requires_grad_() for w in (w1, w2))
    fused.silu_mul_gpc_io(gate_up, w1, w2, backend="triton").square().sum().backward()
    return w1.grad, w2.grad


def _layout_dw_oracle(gate_up, w1, w2):
    w1, w2 = (w.detach().double().requires_grad_() for w in (w1, w2))
    gate, up = gate_up.double().chunk(2, dim=-1)
    R.gpc_io(up * torch.nn.functional.silu(gate), w1, w2).square().sum().backward()
    return w1.grad, w2.grad


@requires_interpreter
@pytest.mark.parametrize("splits", SPLITS, indirect=True)
@pytest.mark.parametrize("G, s, og, M", [(2, 12, 7, 2049), (5, 10, 3, 700), (20, 20, 2, 301)])
def test_layout_weight_gradients_split(G, s, og, M, splits, monkeypatch):
    names = _launch_names(monkeypatch)
    g = torch.Generator().manual_seed(G * M)
    gate_up = torch.randn(M, 2 * G * s, generator=g)
    w1, w2 = (torch.randn(G, s, og, generator=g) / s ** 0.5 for _ in range(2))
    got, want = _layout_dw(gate_up, w1, w2), _layout_dw_oracle(gate_up, w1, w2)
    assert_meets_contract("layout dW", {f"dW{i + 1}": rel_error(a, b)
                                        for i, (a, b) in enumerate(zip(got, want))}, torch.float32)
    assert "gpc_io_layout_bwd_dw_sum" in names


# --- every GPU config of the one GEMM, split ----------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("splits", [3], indirect=True)
@pytest.mark.parametrize("config", list(GG.CUDA_CONFIGS),
                         ids=lambda c: "{BLOCK_P}x{BLOCK_Q}x{BLOCK_K}".format(**c.kwargs))
def test_every_gpu_config_with_split_k_interpreted(config, splits, monkeypatch):
    """Partial tiles everywhere: dW is 130 x 70 per group (P, Q), K = 431 rows in 3 splits of
    256, 128 (a partial BLOCK_K of 128 in the last) and 47."""
    forced = force_gemm_config(monkeypatch, config)
    for op in ("gpc_io", "grouped_linear"):
        check_op(op, make_operands(op, Case(2, 130, 70, (431,), "contig", True), torch.float32),
                 "triton", torch.float32)
    got = _layout_dw(torch.randn(431, 2 * 2 * 130), *(torch.randn(2, 130, 70) / 12 for _ in "ab"))
    assert all(torch.isfinite(t).all() for t in got)
    assert {"gpc_io_bwd_dw", "grouped_linear_bwd_dw", "gpc_io_layout_bwd_dw"} <= set(forced)


# --- determinism --------------------------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("splits", [7], indirect=True)
def test_split_weight_gradients_are_bitwise_equal_run_to_run(splits):
    ops = make_operands("gpc_io", Case(5, 12, 7, (2049,), "contig", True), torch.float16)
    x = ops.x.detach()
    dy = torch.randn(2049, 5 * 7).to(torch.float16)
    from kphi3_kernels.ops import triton_impl

    runs = [triton_impl.gpc_io_bwd(dy, x, x.new_empty(0), ops.params["weight1"].detach(),
                                   ops.params["weight2"].detach(), False)[1:3] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
