"""Time one call: median and p20/p80, warm-up excluded.

CUDA: ``triton.testing.do_bench`` (CUDA events around each call; it also flushes the L2 cache
before each call), quantiles 0.5/0.2/0.8. Without Triton, a CUDA-event loop of our own.
CPU: wall clock (``time.perf_counter``) around each call, repeated until a time budget is
spent, median.

Providers compared with each other are timed together (``bench_many``): on a CPU their calls
alternate, one call of each in turn, so that a burst of load from elsewhere slows all of them
and the ratios between them hold; on CUDA each gets one ``do_bench`` back to back. ``spread``
(p80 / p20) is what ``sweep.py`` uses to decide that a measurement was too noisy to keep.

The callables time what they are given; rotating through several input sets (so that caches do
not flatter small shapes) is done by the caller, see ``sweep.py``.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: Optional[int]  # None when the timer decides (do_bench does not say)
    method: str


def spread(t: Timing) -> float:
    """p80 / p20: 1.0 when every call took the same time; inf when p20 is zero."""
    return t.p80_ms / t.p20_ms if t.p20_ms > 0 else float("inf")


class CallFailed(RuntimeError):
    """A timed call raised; ``name`` says whose (the others of its round are still good)."""

    def __init__(self, name: str, error: BaseException):
        super().__init__(f"{name}: {error}")
        self.name, self.error = name, error


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def quantiles_ms(samples_s: Sequence[float]):
    """Median, p20 and p80 (linear interpolation, like ``torch.quantile``) of samples in seconds."""
    ordered = sorted(samples_s)
    out = []
    for q in QUANTILES:
        pos = q * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out.append((ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)) * 1e3)
    return out


def bench_cpu(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
              budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 1000,
              warmup: int = 2) -> Timing:
    """Wall clock per call; ``warmup`` calls first (not timed), then at least ``min_reps`` timed
    calls and more while ``budget_s`` lasts."""
    for _ in range(warmup):
        _clear_grads(grad_to_none)
        fn()
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while len(samples) < min_reps or (sum(samples) < budget_s and len(samples) < max_reps):
            _clear_grads(grad_to_none)
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    median, p20, p80 = quantiles_ms(samples)
    return Timing(median, p20, p80, len(samples), "wall clock (time.perf_counter), median")


def _bench_cuda_events(fn, grad_to_none, warmup_ms=25.0, rep_ms=100.0) -> Timing:
    """A stand-in for do_bench when Triton is missing: CUDA events, warm-up excluded."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    reps = max(1, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        _clear_grads(grad_to_none)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    median, p20, p80 = quantiles_ms([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])
    return Timing(median, p20, p80, reps, "CUDA events (own loop; triton missing), median")


def bench_cuda(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = (),
               warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """``triton.testing.do_bench`` with the median and p20/p80 (CUDA events, L2 flushed per call)."""
    try:
        from triton.testing import do_bench
    except Exception:  # no (working) triton on this CUDA machine
        return _bench_cuda_events(fn, grad_to_none, warmup_ms, rep_ms)
    median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms,
                                grad_to_none=list(grad_to_none) or None,
                                quantiles=list(QUANTILES))
    return Timing(float(median), float(p20), float(p80), None,
                  "triton.testing.do_bench (CUDA events), median")


def bench(fn: Callable[[], object], device: torch.device, grad_to_none: Sequence[torch.Tensor] = (),
          budget_s: float = 1.0, min_reps: int = 5, warmup: int = 2) -> Timing:
    """Time ``fn`` on ``device``: do_bench on CUDA, wall clock on CPU. ``warmup`` untimed calls
    come first (at least one per rotated input set); do_bench then adds its own warm-up."""
    if device.type == "cuda":
        for _ in range(warmup):
            fn()
        return bench_cuda(fn, grad_to_none)
    return bench_cpu(fn, grad_to_none, budget_s=budget_s, min_reps=min_reps, warmup=warmup)


def bench_cpu_interleaved(fns: Mapping[str, Callable[[], object]],
                          grad_to_none: Mapping[str, Sequence[torch.Tensor]],
                          budget_s: float = 1.0, min_reps: int = 5, max_reps: int = 1000,
                          warmup: int = 2) -> Dict[str, Timing]:
    """Wall clock per call, the callables taking turns: one call of each per pass, the order
    reversed every other pass, at least ``min_reps`` passes and more while ``budget_s`` per
    callable lasts. A call that raises ends the measurement with ``CallFailed``."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            _clear_grads(grad_to_none.get(name, ()))
            _call(name, fns[name])
    samples: Dict[str, list] = {name: [] for name in names}
    total_budget = budget_s * len(names)
    spent = 0.0
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        passes = 0
        while passes < min_reps or (spent < total_budget and passes < max_reps):
            for name in (names if passes % 2 == 0 else reversed(names)):
                _clear_grads(grad_to_none.get(name, ()))
                start = time.perf_counter()
                _call(name, fns[name])
                took = time.perf_counter() - start
                samples[name].append(took)
                spent += took
            passes += 1
    finally:
        if gc_was_enabled:
            gc.enable()
    method = "wall clock (time.perf_counter), median; providers' calls interleaved"
    out = {}
    for name in names:
        median, p20, p80 = quantiles_ms(samples[name])
        out[name] = Timing(median, p20, p80, len(samples[name]), method)
    return out


def _call(name: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as err:
        raise CallFailed(name, err) from err


def bench_many(fns: Mapping[str, Callable[[], object]], device: torch.device,
               grad_to_none: Mapping[str, Sequence[torch.Tensor]], budget_s: float = 1.0,
               min_reps: int = 5, warmup: int = 2) -> Dict[str, Timing]:
    """Time several callables together, in one run, so that their ratios come from one run:
    interleaved calls on a CPU (``bench_cpu_interleaved``), one ``do_bench`` each, back to back,
    on CUDA. A call that raises gives ``CallFailed`` naming it."""
    if device.type != "cuda":
        return bench_cpu_interleaved(fns, grad_to_none, budget_s=budget_s, min_reps=min_reps,
                                     warmup=warmup)
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = bench(fn, device, grad_to_none.get(name, ()), budget_s, min_reps, warmup)
        except Exception as err:
            raise CallFailed(name, err) from err
    return out
