"""The launch ledger (``kphi3_bench.ledger``): its counts on cases computed by hand, and the
committed budget of the Triton path's launches and bytes.

Nothing here runs a kernel: the launchers are called on meta tensors and ``ops.launch.RECORDER``
keeps each launch, so these tests take the same time with or without a GPU or the interpreter.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kphi3_bench import ledger
from kphi3_bench.shapes import SHAPES, Shape, min_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = os.path.join(ROOT, "benchmarks", "results", "ledger-budget.json")
LEDGER_JSON = os.path.join(ROOT, "benchmarks", "results", "ledger-2026-12-07.json")
H200 = ledger.CostModel(790.0, 4300.0, 2.0)

# in 96 -> out 80 with G = 2 (96 // 48 = 2 divides both): s = 48, og = 40.
TINY = Shape("tiny-io", "tiny", "io", 96, 80, 48)
M = 100


def _meta(*size, dtype=torch.bfloat16, grad=False):
    return torch.empty(*size, dtype=dtype, device="meta", requires_grad=grad)


def _by_name(path):
    return {l.name: l for l in path.launches}


# --- The Triton path, by hand -----------------------------------------------------------------

def test_tiny_gpc_io_forward_by_hand():
    assert (TINY.groups, TINY.in_per_group, TINY.out_per_group) == (2, 48, 40)
    path = ledger.triton_launches(ledger.Problem("gpc_io", TINY, M, "bf16"), "fwd")
    assert [l.name for l in path.launches] == ["gpc_io_deinterleave", "gpc_io_fwd"]
    pre, gemm = path.launches
    # The pre-pass moves data only: reads x (100 x 96 bf16) and writes xi (the same size).
    assert pre.flops == 0
    assert pre.bytes == 2 * 100 * 96 * 2 == 38_400
    # First-choice tile for a 100 x 40 output: 128 x 64 x 64 (no 256-wide tile: Q rounds up to 64).
    assert gemm.config.startswith("BLOCK_P=128, BLOCK_Q=64, BLOCK_K=64")
    # One 128 x 64 tile per group, 2 groups, K = 48 + 48, each half padded to one 64-step:
    # 2 * 2 programs * 128 * 64 * 64 * 2 steps.
    assert gemm.flops == 4_194_304
    # x 19200 + xi 19200 + W1 7680 + W2 7680 + y 16000 (bias/residual placeholders are y again).
    assert gemm.bytes == 19_200 + 19_200 + 7_680 + 7_680 + 16_000 == 69_760
    # Both memory-bound: bytes / 4.3 TB/s + 2 us.
    assert H200.time_us(pre.flops, pre.bytes) == pytest.approx(2 + 38_400 / 4.3e6)
    assert path.time_us(H200) == pytest.approx(4 + (38_400 + 69_760) / 4.3e6)


def test_tiny_gpc_io_decode_forward_is_one_launch():
    # At M <= 64 without a backward to feed, the strided operand is read in place: no pre-pass.
    path = ledger.triton_launches(ledger.Problem("gpc_io", TINY, 16, "bf16"), "fwd")
    (gemm,) = path.launches
    assert gemm.name == "gpc_io_fwd_fused"
    assert gemm.config.startswith("BLOCK_P=64, BLOCK_Q=64, BLOCK_K=64")
    # One 64 x 64 tile per group, 2 groups, a 64-step for each of the two K loops of 48.
    assert gemm.flops == 2 * 2 * 64 * 64 * 64 * 2 == 2_097_152
    # x (16 x 96, read by both loops: one tensor) + W1 + W2 + y (16 x 80).
    assert gemm.bytes == 3_072 + 7_680 + 7_680 + 2_560 == 20_992


def test_tiny_gpc_io_backward_by_hand():
    path = ledger.triton_launches(ledger.Problem("gpc_io", TINY, M, "bf16"), "bwd")
    assert [l.name for l in path.launches] == ["gpc_io_bwd_dxi", "gpc_io_bwd_dx", "gpc_io_bwd_dw"]
    got = _by_name(path)
    # dxi = dy_n W2[n]^T: a 100 x 48 output per group (128 x 64 tile), K = og = 40 (one 64-step);
    # dy 16000 + W2 7680 + dxi in bf16 (100 x 96 x 2 = 19200).
    assert got["gpc_io_bwd_dxi"].flops == 2 * 2 * 128 * 64 * 64 == 2_097_152
    assert got["gpc_io_bwd_dxi"].bytes == 16_000 + 7_680 + 19_200
    # dx = dy_n W1[n]^T + dxi gathered in the epilogue: dy, W1, dxi read; dx written.
    assert got["gpc_io_bwd_dx"].config.startswith("BLOCK_P=128, BLOCK_Q=64, BLOCK_K=64")
    assert got["gpc_io_bwd_dx"].flops == 2_097_152
    assert got["gpc_io_bwd_dx"].bytes == 16_000 + 7_680 + 19_200 + 19_200
    # [dW1; dW2][n] = [x_n | xi_n]^T dy_n: 2G = 4 programs of a 48 x 40 output (64 x 64 tile),
    # K = M = 100 -> two 64-steps; x 19200 + the saved xi 19200 + dy 16000 (once) + dW1 + dW2.
    dw = got["gpc_io_bwd_dw"]
    assert dw.config.startswith("BLOCK_P=64, BLOCK_Q=64, BLOCK_K=64")
    assert dw.flops == 2 * 4 * 64 * 64 * 64 * 2 == 4_194_304
    assert dw.bytes == 19_200 + 19_200 + 16_000 + 7_680 + 7_680 == 69_760


def test_tiny_grouped_linear_backward_by_hand():
    path = ledger.triton_launches(ledger.Problem("grouped_linear", TINY, M, "bf16"), "bwd")
    dx, dw = path.launches
    assert (dx.name, dw.name) == ("grouped_linear_bwd_dx", "grouped_linear_bwd_dw")
    assert dx.flops == 2_097_152 and dx.bytes == 16_000 + 7_680 + 19_200
    assert dw.flops == 2_097_152 and dw.bytes == 19_200 + 16_000 + 7_680


def test_accumulated_output_counts_read_and_write():
    from kphi3_kernels.ops.launch import KernelLaunch

    a, c = _meta(4, 8), _meta(4, 8)
    spec = KernelLaunch(name="acc", kernel=None, grid=lambda meta: (1,),
                        args=dict(x_ptr=a, r_ptr=c, y_ptr=c, M=4),
                        configs=[_move_config()], interpreter_config=_move_config(),
                        restore=("y_ptr",))
    assert ledger.triton_launch_cost(spec).bytes == 64 + 64 + 64  # a, then c read and written


def _move_config():
    import triton

    return triton.Config({"BLOCK_M": 1, "BLOCK_A": 8, "BLOCK_B": 2}, num_warps=4)


def test_unknown_kernel_is_refused():
    import triton
    from kphi3_kernels.ops.launch import KernelLaunch

    config = triton.Config({"BLOCK_X": 64}, num_warps=4)
    spec = KernelLaunch(name="new", kernel=None, grid=lambda meta: (1,), args={},
                        configs=[config], interpreter_config=config)
    with pytest.raises(ValueError, match="teach the ledger"):
        ledger.triton_launch_cost(spec)


# --- The aten recording, by hand --------------------------------------------------------------

def test_dense_linear_by_hand():
    x, w = _meta(3, 4, grad=True), _meta(5, 4, grad=True)
    dy = _meta(3, 5)
    fwd = ledger.record_aten(F.linear, [x, w], "fwd", dy)
    # t(W) is a view: the one launch is the mm, 2*M*in*out FLOPs, x + W + y bytes.
    assert [l.name for l in fwd.launches] == ["aten.mm.default"]
    assert fwd.flops == 2 * 3 * 4 * 5 == 120
    assert fwd.bytes == (3 * 4 + 5 * 4 + 3 * 5) * 2 == 94
    bwd = ledger.record_aten(F.linear, [x, w], "bwd", dy)
    # dx = dy W (reads dy, W; writes dx) and dW = dy^T x (reads dy, x; writes dW): 94 bytes each.
    assert [l.name for l in bwd.launches] == ["aten.mm.default"] * 2
    assert [l.flops for l in bwd.launches] == [120, 120]
    assert [l.bytes for l in bwd.launches] == [94, 94]


def test_aten_bytes_rules():
    x, y = _meta(8, 8), _meta(8, 8)  # 128 bytes each
    with ledger.AtenRecorder() as rec:
        x.mul(x)              # x read once, out written: 256
        x.add_(y)             # x read and written, y read: 384
        x.copy_(y)            # y read, x written (not read): 256
        x.t().contiguous()    # the view is free, the copy reads and writes: 256
        x.view(64)            # metadata only: no launch
        torch.empty_like(x)   # allocation only: no launch
    assert [l.name for l in rec.launches] == [
        "aten.mul.Tensor", "aten.add_.Tensor", "aten.copy_.default", "aten.clone.default"]
    assert [l.bytes for l in rec.launches] == [256, 384, 256, 256]


def test_reference_interleave_is_one_copy():
    path = ledger.reference_launches(ledger.Problem("interleave", TINY, M, "bf16"), "fwd")
    assert [(l.name, l.flops, l.bytes) for l in path.launches] == [
        ("aten.clone.default", 0, 2 * 100 * 96 * 2)]


def test_floor_matches_the_shape_table():
    for mode in ledger.LEDGER_MODES:
        f = ledger.floor(ledger.Problem("gpc_io", TINY, M, "bf16"), mode)
        assert f.bytes == min_bytes(TINY, M, mode, 2)
    f = ledger.floor(ledger.Problem("gpc_io", TINY, M, "bf16"), "fwd")
    assert f.flops == 4 * 100 * 96 * 80 // 2 == 1_536_000
    assert f.bytes == (100 * 96 + 2 * 2 * 48 * 40 + 100 * 80) * 2 == 50_560
    inter = ledger.floor(ledger.Problem("interleave", TINY, M, "bf16"), "bwd")
    assert (inter.flops, inter.bytes) == (0, 2 * 100 * 96 * 2)


# --- The released shapes against figures computed before with this model ---------------------

# Speed of light: triton fwd, bwd, reference fwd, bwd, dense bwd; then realistic: triton fwd,
# bwd, dense bwd. The backward's weight gradients split K (kphi3_kernels.ops.grouped_gemm.
# split_plan): qkv 2 splits, o 6, gate_up 3, down 3 (see test_split_k_before_and_after).
@pytest.mark.parametrize("name,want", [
    ("kphi3-qkv", [54.5, 98.6, 165, 141, 207.9, 72.6, 118.5, 214.1]),
    ("kphi3-o", [28.7, 54.9, 76, 99.5, 72.0, 35.8, 62.7, 76.9]),
    ("kphi3-gate_up", [122.5, 245.9, 404, 277, 547.6, 160.9, 286.7, 557.2]),
    ("kphi3-down", [87.2, 124.4, 134, 290, 275.8, 87.2, 140.4, 295.5]),
])
def test_released_gpc_io_at_8192(name, want):
    p = ledger.Problem("gpc_io", SHAPES[name], 8192, "bf16")
    triton_fwd, triton_bwd = ledger.triton_launches(p, "fwd"), ledger.triton_launches(p, "bwd")
    dense_bwd = ledger.dense_launches(p, "bwd")
    got = [triton_fwd.time_us(H200), triton_bwd.time_us(H200),
           ledger.reference_launches(p, "fwd").time_us(H200),
           ledger.reference_launches(p, "bwd").time_us(H200), dense_bwd.time_us(H200),
           triton_fwd.realistic_us(H200), triton_bwd.realistic_us(H200),
           dense_bwd.realistic_us(H200)]
    assert got == pytest.approx(want, rel=5e-3)


@pytest.fixture
def no_split():
    from kphi3_kernels.ops import grouped_gemm

    previous = grouped_gemm.FORCE_SPLITS
    grouped_gemm.FORCE_SPLITS = 1
    yield
    grouped_gemm.FORCE_SPLITS = previous


def _qkv_dw():
    p = ledger.Problem("gpc_io", SHAPES["kphi3-qkv"], 8192, "bf16")
    return [l for l in ledger.triton_launches(p, "bwd").launches if "_dw" in l.name]


def test_split_k_before_and_after_by_hand(no_split):
    """qkv_proj's weight gradients at 8192 tokens: 60 programs (2G = 10 groups x 2 x 3 tiles of
    128 x 256) of 128 K-steps fill 60 of 132 SMs; split in 2 they are 120 programs of 64 steps,
    plus the sum of the two fp32 slices."""
    from kphi3_kernels.ops import grouped_gemm

    (before,) = _qkv_dw()
    grouped_gemm.FORCE_SPLITS = None
    gemm, summed = _qkv_dw()
    assert (before.programs, before.steps, before.ctas_per_sm) == (60, 128, 1)
    assert (gemm.name, gemm.programs, gemm.steps) == ("gpc_io_bwd_dw", 120, 64)
    assert summed.name == "gpc_io_bwd_dw_sum" and summed.flops == 0
    # The workspace: 2 problems x 2 splits x 5 * 256 * 768 fp32; the GEMM writes it instead of
    # the two bf16 gradients, the sum reads it and writes them.
    numel = 5 * 256 * 768
    ws, grads = 2 * 2 * numel * 4, 2 * numel * 2
    assert gemm.bytes == before.bytes - grads + ws
    assert summed.bytes == ws + grads
    # Same FLOPs: speed of light sees only the workspace's bytes (42.8 -> 42.8 + 6.6 us)...
    assert gemm.flops == before.flops
    assert H200.time_us(gemm.flops, gemm.bytes) == pytest.approx(
        H200.time_us(before.flops, before.bytes), rel=1e-6)
    # ...the realistic column sees the waves: 1 wave of 128 + 2.5 steps, then 1 of 64 + 2.5.
    step_us = 2 * 128 * 256 * 64 * 132 / 790e12 * 1e6
    assert H200.realistic_us(before) == pytest.approx(2 + 130.5 * step_us)
    assert H200.realistic_us(gemm) == pytest.approx(2 + 66.5 * step_us)


# --- The realistic column, by hand ------------------------------------------------------------

STEP_128x128x64_US = 2 * 128 * 128 * 64 * 132 / 790e12 * 1e6   # one K-step of one program


def _tile(programs, steps, ctas=1, tile=(128, 128, 64)):
    bp, bq, bk = tile
    return ledger.LaunchCost("t", 2 * programs * bp * bq * bk * steps, 0, kind="tile",
                             programs=programs, tile=tile, steps=steps, ctas_per_sm=ctas)


def test_twenty_programs_on_132_sms():
    # 20 programs of 8 K-steps: one (partial) wave, each program alone on its SM, so the launch
    # takes one program's K loop plus its prologue / epilogue, not 20/132 of the work.
    t = _tile(20, 8)
    assert H200.realistic_us(t) == pytest.approx(2 + (8 + 2.5) * STEP_128x128x64_US)
    assert H200.realistic_us(t) == pytest.approx(5.679, abs=1e-3)
    assert H200.time_us(t.flops, t.bytes) == pytest.approx(2 + 20 * 8 * STEP_128x128x64_US / 132)
    # Waves: 132 programs are one wave, 133 two; 2 CTAs per SM: 264 programs share one wave
    # (2 x 8 steps, one exposed overhead), a 265th adds a partial wave of 8 + 2.5 steps.
    assert H200.realistic_us(_tile(132, 8)) == pytest.approx(H200.realistic_us(t))
    assert H200.realistic_us(_tile(133, 8)) == pytest.approx(2 + 2 * 10.5 * STEP_128x128x64_US)
    assert H200.realistic_us(_tile(264, 8, 2)) == pytest.approx(2 + 18.5 * STEP_128x128x64_US)
    assert H200.realistic_us(_tile(265, 8, 2)) == pytest.approx(2 + 29 * STEP_128x128x64_US)
    assert H200.realistic_us(_tile(20, 8, 2)) == pytest.approx(H200.realistic_us(t))


def test_a_released_launch_of_twenty_programs(no_split):
    # o_proj's weight gradients unsplit at 8192 tokens: 2G = 10 groups x 2 tiles of 128 x 256
    # (256 x 256 outputs) = 20 programs of K = 8192 / 64 = 128 steps, one CTA per SM (3 stages
    # of 128x64 + 256x64 bf16 tiles = 144 KiB).
    p = ledger.Problem("gpc_io", SHAPES["kphi3-o"], 8192, "bf16")
    (dw,) = [l for l in ledger.triton_launches(p, "bwd").launches if l.name == "gpc_io_bwd_dw"]
    assert (dw.programs, dw.tile, dw.steps, dw.ctas_per_sm) == (20, (128, 256, 64), 128, 1)
    step_us = 2 * STEP_128x128x64_US
    assert H200.realistic_us(dw) == pytest.approx(2 + 130.5 * step_us)   # 93.5 us
    assert H200.time_us(dw.flops, dw.bytes) == pytest.approx(16.9, abs=0.05)


def test_ctas_per_sm_from_shared_memory():
    import triton

    from kphi3_bench import ledger_costs

    def cfg(p, q, k, stages):
        return triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_K": k}, num_warps=4,
                             num_stages=stages)

    limit = 227 * 1024
    assert ledger_costs._ctas_per_sm(cfg(128, 256, 64, 3), 2, limit) == 1   # 144 KiB
    assert ledger_costs._ctas_per_sm(cfg(128, 128, 64, 3), 2, limit) == 2   # 96 KiB
    assert ledger_costs._ctas_per_sm(cfg(128, 128, 64, 4), 2, limit) == 1   # 128 KiB
    assert ledger_costs._ctas_per_sm(cfg(128, 64, 64, 4), 2, limit) == 2    # 96 KiB


def test_gathered_launch_by_hand():
    path = ledger.triton_launches(ledger.Problem("gpc_io", TINY, M, "bf16"), "bwd")
    got = _by_name(path)
    dx = got["gpc_io_bwd_dx"]
    # dxi (100 x 96 bf16) is read gathered at its interleaved columns; dy, W1 and dx are not.
    assert dx.gathered_bytes == 19_200
    assert got["gpc_io_bwd_dxi"].gathered_bytes == 0 and got["gpc_io_bwd_dw"].gathered_bytes == 0
    plain = dx.bytes - 19_200
    assert H200.realistic_memory_s(dx) == pytest.approx(plain / 4.3e12 + 19_200 / (0.55 * 4.3e12))
    # At this size the tile's own K loop (1 step + 2.5 of overhead) outweighs its bytes.
    assert H200.realistic_us(dx) == pytest.approx(
        2 + 3.5 * 2 * 128 * 64 * 64 * 132 / 790e12 * 1e6)
    # At 8192 tokens down_proj's (84 MB of dxi gathered) is memory-bound: 46.0 -> 62.0 us.
    p = ledger.Problem("gpc_io", SHAPES["kphi3-down"], 8192, "bf16")
    big = _by_name(ledger.triton_launches(p, "bwd"))["gpc_io_bwd_dx"]
    assert big.gathered_bytes == 8192 * 5120 * 2
    assert H200.realistic_us(big) == pytest.approx(
        2 + ((big.bytes - big.gathered_bytes) / 4.3e12
             + big.gathered_bytes / (0.55 * 4.3e12)) * 1e6)
    assert H200.realistic_us(big) == pytest.approx(62.0, abs=0.05)
    assert ledger.GATHER_BANDWIDTH_FRACTION == 0.55
    # The fused IO forward reads x in place with K stride G: x is its gathered operand.
    (fused,) = ledger.triton_launches(ledger.Problem("gpc_io", TINY, 16, "bf16"), "fwd").launches
    assert fused.gathered_bytes == 16 * 96 * 2


def test_gathered_producers_of_the_fused_layer():
    cfg = ledger.CONFIGS["kphi3"]
    fwd = ledger.fused_launches(cfg, 64, "bf16", "fwd")
    bwd = ledger.fused_launches(cfg, 64, "bf16", "bwd")
    # No activation pass: gate_up_proj's launch writes the layout [64, 20*20*16] at the slots
    # of its tiles' channels.
    assert not fwd["activation"].launches
    (head,) = fwd["gate_up"].launches
    assert head.name == "gpc_io_fwd_act_layout" and head.gathered_bytes == 64 * 6400 * 2
    norms = {l.name: l for l in fwd["norms"].launches}
    # The split heads re-read their input row gathered for the de-interleaved copy: x, or
    # residual and branch where the head adds them.
    assert norms["rms_norm_split"].gathered_bytes == 64 * 1280 * 2
    assert norms["add_rms_norm_split"].gathered_bytes == 2 * 64 * 1280 * 2
    gathered = {l.name: l.gathered_bytes for c in bwd.values() for l in c.launches}
    # The norm head's dx gathers dxi [64, 1280]; the MLP tail's d(gate_up) reads gate_up and
    # writes its gradient ([64, 10240] each) at the channels of its tiles' slots.
    assert gathered["norm_io_bwd_dxn"] == 64 * 1280 * 2
    assert gathered["mlp_tail_bwd_dgate_up"] == 2 * 64 * 10240 * 2
    assert gathered["rms_norm_bwd"] == 0


def test_the_activation_layout_launch_by_hand():
    """gate_up_proj's split head (G = 5, s = 256, og = 2048) writing down_proj's layout (G = 20,
    R = 16) at 8192 tokens, first-choice 128x128x64: a program per gate tile, 64 row tiles x
    5120 / 128 gate column tiles = 2560 programs, each two K loops of (256 + 256) / 64 = 8
    steps (the gate tile's, then the up tile's). It reads n and xi [8192, 1280] and both
    weights, writes gate_up [8192, 10240] and the layout [8192, 6400], gathered."""
    fwd = ledger.fused_launches(ledger.CONFIGS["kphi3"], 8192, "bf16", "fwd")
    (head,) = fwd["gate_up"].launches
    assert head.tile == (128, 128, 64) and head.programs == 64 * 40 and head.steps == 16
    assert head.flops == 2 * 2560 * 128 * 128 * 64 * 16 == 2 * 8192 * 10240 * 512
    weights = 2 * 5 * 256 * 2048 * 2
    assert head.bytes == (2 * 8192 * 1280 + 8192 * 10240 + 8192 * 6400) * 2 + weights
    assert head.gathered_bytes == 8192 * 6400 * 2
    tail = fwd["down"].launches
    assert [l.name for l in tail] == ["gpc_io_layout_fwd"]


def test_the_mlp_tail_backward_charges_each_product_its_tile_meets():
    """d(gate_up) at down_proj (G = 20, s = 256, og = 64, R = 16), 8192 tokens, first-choice
    64x64x64: 128 row tiles x 5 slot tiles x 20 blocks = 12800 programs; each of the 320 slots'
    64-wide tiles meets 4 residues, so a program sums 5 products of one K step: 2 * 64^3 * 5
    FLOPs. It moves dy [8192, 1280], gate_up and its gradient [8192, 10240] (and the weights),
    and no dxi."""
    bwd = ledger.fused_launches(ledger.CONFIGS["kphi3"], 8192, "bf16", "bwd")
    names = [l.name for l in bwd["down"].launches]
    assert names == ["mlp_tail_bwd_dgate_up", "gpc_io_layout_bwd_dw"]
    dgu = bwd["down"].launches[0]
    assert dgu.programs == 128 * 5 * 20 and dgu.steps == 5
    assert dgu.flops == 12800 * 2 * 64 ** 3 * 5
    weights = 2 * 20 * 256 * 64 * 2
    assert dgu.bytes == 8192 * 1280 * 2 + 2 * 8192 * 10240 * 2 + weights


def test_dense_gemm_realistic_by_hand():
    # F.linear at qkv's widths, 8192 tokens: one mm of K = 1280 (20 steps of 64), no wave loss,
    # 2.5 steps of overhead per tile: compute / (20 / 22.5).
    p = ledger.Problem("gpc_io", SHAPES["kphi3-qkv"], 8192, "bf16")
    (mm,) = ledger.dense_launches(p, "fwd").launches
    assert (mm.kind, mm.steps) == ("cublas", 20)
    compute_us = 2 * 8192 * 1280 * 3840 / 790e12 * 1e6
    assert H200.realistic_us(mm) == pytest.approx(2 + compute_us * 22.5 / 20)
    assert H200.time_us(mm.flops, mm.bytes) == pytest.approx(2 + compute_us)


def test_profiles_and_measured_ceilings():
    h100, h200 = ledger.PROFILES["h100"], ledger.PROFILES["h200"]
    assert (h100.sms, h100.l2_mb, h100.default_tflops, h100.default_gbps) == (132, 50, 798, 3000)
    assert (h200.sms, h200.l2_mb, h200.default_tflops, h200.default_gbps) == (132, 60, 790, 4300)
    assert ledger.profile_for("NVIDIA H100 80GB HBM3") == h100
    assert ledger.profile_for("NVIDIA H200") == h200
    m = ledger.cost_model("h100")
    assert (m.peak_tflops, m.peak_gbps, m.profile) == (798, 3000, h100)
    # Measured ceilings (gpu_check's ceilings.json) replace the profile's: both columns use them.
    measured = ledger.CostModel(700.0, 3500.0, 2.0)
    t = _tile(20, 8)
    assert measured.realistic_us(t) == pytest.approx(2 + 10.5 * STEP_128x128x64_US * 790 / 700)


def test_measured_over_predicted_has_both_columns():
    from types import SimpleNamespace

    row = SimpleNamespace(provider="triton", median_ms=0.1, shape="kphi3-o", M=8192, mode="fwd",
                          dtype="bf16", family="kphi3", op="o", in_features=1280,
                          out_features=1280, groups=5)
    (pair,) = ledger.measured_over_predicted([row], H200)
    p = ledger.Problem("gpc_io", SHAPES["kphi3-o"], 8192, "bf16")
    path = ledger.triton_launches(p, "fwd")
    assert pair["predicted_us"] == pytest.approx(path.time_us(H200), abs=1e-3)
    assert pair["realistic_us"] == pytest.approx(path.realistic_us(H200), abs=1e-3)
    assert pair["measured_over_realistic"] == pytest.approx(100 / path.realistic_us(H200),
                                                            abs=1e-3)
    assert "measured/realistic" in ledger.format_measured([pair])


# --- The budget -------------------------------------------------------------------------------

def _load_budget():
    with open(BUDGET) as f:
        return json.load(f)


def test_budget_covers_the_released_shapes():
    grid = _load_budget()["grid"]
    assert set(ledger.OPS) <= set(grid["ops"])
    assert {s.name for s in SHAPES.values() if s.family == "kphi3"} <= set(grid["shapes"])
    assert set(ledger.DEFAULT_M) <= set(grid["m"])
    assert set(ledger.LEDGER_MODES) <= set(grid["modes"])
    assert "bf16" in grid["dtypes"]


def test_triton_path_is_within_its_budget():
    """Fails when a change adds a launch or moves more bytes than benchmarks/results/
    ledger-budget.json allows; the message names the row, the count and the budget, and the
    command that rewrites the budget when the increase is intended."""
    budget = _load_budget()
    rows = ledger.build_ledger(**ledger.budget_grid(budget), io_forward=budget["io_forward"],
                               baselines=False)
    problems = ledger.check_budget(rows, budget, os.path.relpath(BUDGET, ROOT))
    assert not problems, "\n".join(problems)


def test_check_budget_reports_rows_over_budget():
    rows = ledger.build_ledger([TINY], [M], ["fwd"], ["bf16"], ["gpc_io"], baselines=False)
    budget = ledger.budget_from_rows(rows, "split", "b.json")
    assert ledger.check_budget(rows, budget, "b.json") == []
    key = "gpc_io tiny-io M=100 fwd bf16"
    budget["rows"][key] = {"launches": 1, "bytes": 108_159}   # counted: 2 launches, 108160 bytes
    problems = ledger.check_budget(rows, budget, "b.json")
    assert len(problems) == 2
    assert problems[0].startswith(f"{key}: the Triton path makes 2 launches "
                                  "(gpc_io_deinterleave, gpc_io_fwd), over its budget of 1")
    assert "moves 108,160 bytes, over its budget of 108,159 bytes in b.json" in problems[1]
    assert all("--write-budget b.json" in p and "--shapes tiny-io" in p for p in problems)
    assert "no budget" in ledger.check_budget(rows, {"rows": {}}, "b.json")[0]


# --- Command line and committed results -------------------------------------------------------

def test_help_does_not_import_torch():
    code = ("import sys; from kphi3_bench import ledger; ledger.build_parser().format_help(); "
            "assert 'torch' not in sys.modules, 'importing the ledger imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_main_writes_json_markdown_and_budget(tmp_path, capsys):
    out, md, budget = tmp_path / "l.json", tmp_path / "l.md", tmp_path / "b.json"
    assert ledger.main(["--shapes", "kphi3-o", "--m", "16", "--dtypes", "bf16", "--json", str(out),
                        "--markdown", str(md), "--write-budget", str(budget)]) == 0
    printed = capsys.readouterr().out
    assert "gpc_io" in printed and "a prediction, not a measurement" in printed
    data = json.loads(out.read_text())
    assert data["schema"] == ledger.SCHEMA and len(data["rows"]) == 4 * 2
    row = next(r for r in data["rows"] if r["op"] == "gpc_io" and r["mode"] == "fwd")
    assert [k["name"] for k in row["triton"]["kernels"]] == ["gpc_io_fwd_fused"]  # M <= 64
    assert "not a measurement" in md.read_text()
    assert ledger.main(["--check-budget", str(budget), "--quiet"]) == 0
    written = json.loads(budget.read_text())
    written["rows"]["gpc_io kphi3-o M=16 fwd bf16"]["bytes"] -= 1
    budget.write_text(json.dumps(written))
    assert ledger.main(["--check-budget", str(budget), "--quiet"]) == 1
    assert "over its budget" in capsys.readouterr().err


def test_main_rejects_unknown_names(capsys):
    assert ledger.main(["--ops", "conv"]) == 2
    assert ledger.main(["--shapes", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_committed_ledger_matches_the_code():
    """The Triton and floor columns of the committed ledger at the released shapes, M = 8192."""
    with open(LEDGER_JSON) as f:
        data = json.load(f)
    kept = [r for r in data["rows"] if r["family"] == "kphi3" and r["M"] == 8192
            and r["dtype"] == "bf16"]
    assert len(kept) == 4 * 4 * 2
    rows = ledger.build_ledger([SHAPES[n] for n in dict.fromkeys(r["shape"] for r in kept)],
                               [8192], dtypes=["bf16"], io_forward=data["model"]["io_forward"],
                               baselines=False)
    fresh = {r.key: r.to_dict(ledger.h200_model()) for r in rows}
    for r in kept:
        now = fresh[ledger.row_key(r["op"], r["shape"], r["M"], r["mode"], r["dtype"])]
        assert (now["triton"], now["floor"]) == (r["triton"], r["floor"]), (
            "the committed ledger is stale: regenerate it with python -m kphi3_bench.ledger "
            "--json benchmarks/results/ledger-<date>.json --markdown "
            "benchmarks/results/ledger-<date>.md")
