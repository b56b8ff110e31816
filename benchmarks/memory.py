"""Peak memory of one call, above what was allocated before it (inputs and weights excluded).

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
CPU: the allocation and free events that torch's CPU allocator reports to ``torch.profiler``
(``profile_memory=True``), summed in time order; their running maximum is the peak. When the
profiler does not give them, the answer is ``None`` ("n/a"), never a guess.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator, Optional, Tuple

import torch

CUDA_METHOD = "torch.cuda.max_memory_allocated during one call, above the memory allocated before it"
CPU_METHOD = ("peak of torch's CPU allocations during one call, above those before it "
              "(torch.profiler memory events)")


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Keep the profiler's C++ start/stop log lines (kineto's "USDT: ... profiler_start") off the
    terminal; whatever else was written there is passed on if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _cpu_peak(fn: Callable[[], object]) -> Optional[int]:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events
                        if e.device_type() == torch.autograd.DeviceType.CPU)
    except Exception:  # a torch without these internals: say n/a rather than guess
        return None
    if not deltas:
        return None
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[int], str]:
    """(peak bytes of one call of ``fn`` or None, how it was measured)."""
    if device.type == "cuda":
        return _cuda_peak(fn, device), CUDA_METHOD
    if device.type == "cpu":
        try:
            return _cpu_peak(fn), CPU_METHOD
        except Exception as err:  # the profiler itself failed: n/a, and say why
            return None, f"n/a (torch.profiler failed: {type(err).__name__}: {err})"
    return None, f"n/a (no memory measurement for {device.type})"
