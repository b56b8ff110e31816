"""The sanitizer (tests/sanitizer.py) catches what it claims to, on small deliberately wrong
kernels, and lets correct ones through. The kernels are built for Triton's interpreter directly,
so these tests run everywhere, with or without ``--sanitize``."""
import copy
import re

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

import sanitizer


def interpreted(fn):
    """``@triton.jit``, always through the interpreter (the sanitizer sees nothing else)."""
    return InterpretedFunction(fn)


# -- wrong kernels ------------------------------------------------------------------------------

@interpreted
def _overlapping_store_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # Each program writes one element past its block: the first element of the next block.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, 2 * BLOCK)
    keep = tl.arange(0, 2 * BLOCK) <= BLOCK
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=keep), mask=keep)


@interpreted
def _reads_neighbour_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # y[i] = x[i] + y[next block's first element], which the next program writes.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    nxt = tl.load(y_ptr + (pid + 1) * BLOCK, mask=(pid + 1) * BLOCK < n, other=0.0)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) + nxt)


@interpreted
def _unmasked_store_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n, other=0.0))   # no store mask


@interpreted
def _unmasked_load_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs), mask=offs < n)   # no load mask


@interpreted
def _arrival_order_kernel(ticket_ptr, out_ptr):
    # Each program takes a ticket and writes its id into that slot: slots fill in arrival order.
    # The atomic and the stores are race-free, yet the result is whatever order programs run in.
    pid = tl.program_id(0)
    slot = tl.atomic_add(ticket_ptr, 1)
    tl.store(out_ptr + slot, pid)


# -- correct kernels ----------------------------------------------------------------------------

@interpreted
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@interpreted
def _row_accumulate_kernel(x_ptr, y_ptr, K: tl.constexpr, BLOCK_K: tl.constexpr):
    # Each program sums its row of x into its own y[row], reading and rewriting it per step.
    row = tl.program_id(0)
    for k in range(0, K, BLOCK_K):
        offs = k + tl.arange(0, BLOCK_K)
        part = tl.sum(tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0), axis=0)
        tl.store(y_ptr + row, tl.load(y_ptr + row) + part)


@interpreted
def _atomic_sum_kernel(x_ptr, total_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(total_ptr, tl.sum(tl.load(x_ptr + offs, mask=offs < n, other=0), axis=0))


# -- the tests ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _keep_the_suite_summary_clean():
    """The deliberate violations here stay out of the ``--sanitize`` summary of the suite."""
    san = sanitizer.SANITIZER
    stats, violations = copy.deepcopy(san.stats), list(san.violations)
    yield
    san.stats, san.violations = stats, violations


def _sanitized(kernel, grid, *args, **kwargs):
    with sanitizer.sanitizing():
        kernel[grid](*args, **kwargs)


def _violation(kernel, grid, *args, **kwargs) -> str:
    with pytest.raises(sanitizer.SanitizerError) as err:
        _sanitized(kernel, grid, *args, **kwargs)
    return str(err.value)


def test_two_programs_storing_the_same_element():
    x, y = torch.arange(17, dtype=torch.float32), torch.zeros(17)
    msg = _violation(_overlapping_store_kernel, (2,), x, y, BLOCK=8)
    assert "_overlapping_store_kernel" in msg
    # Program 0 writes y[8], program 1's first element: byte 32 of y.
    assert "programs (0, 0, 0) and (1, 0, 0) both store byte offset 32 of 'y_ptr'" in msg, msg


def test_a_program_reading_what_another_writes():
    x, y = torch.ones(16), torch.zeros(16)
    msg = _violation(_reads_neighbour_kernel, (2,), x, y, 16, BLOCK=8)
    assert re.search(r"program \(0, 0, 0\) loads byte offset 32 of 'y_ptr', which program "
                     r"\(1, 0, 0\) stores", msg), msg


def test_an_unmasked_store_past_the_tensor():
    # y is the first 10 elements of a 16-element buffer: the overrun stays in memory we own.
    x, buffer = torch.ones(10), torch.zeros(16)
    msg = _violation(_unmasked_store_kernel, (3,), x, buffer[:10], 10, BLOCK=4)
    assert "out-of-bounds store by program (2, 0, 0)" in msg, msg
    assert "byte offset 40 of 'y_ptr', outside it (it spans bytes 0 to 40)" in msg, msg


def test_an_unmasked_load_past_the_tensor():
    buffer, y = torch.ones(16), torch.zeros(10)
    msg = _violation(_unmasked_load_kernel, (3,), buffer[:10], y, 10, BLOCK=4)
    assert "out-of-bounds load by program (2, 0, 0)" in msg, msg
    assert "byte offset 40 of 'x_ptr'" in msg, msg


def test_a_result_that_depends_on_program_order():
    ticket, out = torch.zeros(1, dtype=torch.int32), torch.full((8,), -1, dtype=torch.int32)
    msg = _violation(_arrival_order_kernel, (8,), ticket, out)
    assert "depends on the order of the programs" in msg, msg
    assert "'out_ptr'" in msg and "stored by program" in msg, msg


def test_an_elementwise_copy_passes_and_masked_lanes_do_not_count():
    # n is not a multiple of BLOCK: the last program's masked lanes point past both tensors.
    x = torch.randn(37)
    y = torch.full((37,), float("nan"))
    _sanitized(_copy_kernel, (triton.cdiv(37, 16),), x, y, 37, BLOCK=16)
    assert torch.equal(x, y)


def test_programs_accumulating_into_their_own_outputs_pass():
    x, y = torch.randn(6, 50), torch.zeros(6)
    _sanitized(_row_accumulate_kernel, (6,), x, y, 50, BLOCK_K=16)
    torch.testing.assert_close(y, x.sum(1))


def test_an_atomic_reduction_across_programs_passes():
    # Integer values: the sum is the same in any order (a float sum's rounding would not be).
    x, total = torch.arange(100, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    _sanitized(_atomic_sum_kernel, (triton.cdiv(100, 16),), x, total, 100, BLOCK=16)
    assert int(total) == sum(range(100))    # one run's worth: the shuffled rerun starts afresh


def test_statistics_count_launches_programs_and_bytes():
    san = sanitizer.SANITIZER
    before = san.stats.get("_copy_kernel", sanitizer.KernelStats("_copy_kernel"))
    launches, programs, checked = before.launches, before.programs, before.bytes_checked
    x, y = torch.randn(64), torch.zeros(64)
    _sanitized(_copy_kernel, (4,), x, y, 64, BLOCK=16)
    after = san.stats["_copy_kernel"]
    assert (after.launches, after.programs) == (launches + 1, programs + 4)
    assert after.bytes_checked - checked == 2 * 64 * 4           # 64 loads and 64 stores of fp32
    assert any("_copy_kernel" in line for line in sanitizer.summary_lines())


def test_uninstalling_restores_the_interpreter():
    from triton.runtime import interpreter as itp

    was_installed = sanitizer.SANITIZER.installed     # under --sanitize it stays installed
    store, call = itp.InterpreterBuilder.create_masked_store, itp.GridExecutor.__call__
    with sanitizer.sanitizing():
        pass
    assert itp.InterpreterBuilder.create_masked_store is store
    assert itp.GridExecutor.__call__ is call
    assert sanitizer.SANITIZER.installed == was_installed
