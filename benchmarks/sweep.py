"""The sweep: for every shape x M, every provider is checked for parity, then timed per mode.

A provider that cannot run here (Triton on a CPU) gives rows saying why; one that fails parity
gives rows saying so and is not timed; one that raises gives rows with the error. Nothing is
dropped: the exit code of ``run.py`` is computed from these rows.

The providers of one shape, M and mode are timed together (``timing.bench_many``: on a CPU their
calls alternate), so that their ratios come from one run. Such a run is kept only when it is
*stable*: every row's spread p80 / p20 is within ``spread_threshold``, and no grouped provider
beats nn.Linear by more than the roofline allows (nn.Linear's roofline time / the row's: about
G/2). Otherwise all of them are timed again, up to ``max_repeats`` more times within
``max_time_s``, each repeat with twice the calls of the run before (a median of more calls moves
less with a burst of load from elsewhere); the first stable run is kept, or else the least
unstable one, whose offending rows say ``stable: False`` and why (``unstable_reason``).

Rows are handed to ``on_rows`` as each mode's rows are written (``kphi3-bench --out`` rewrites its
JSON file then), and points already in ``done`` are skipped (``--resume``). The progress bar
counts only the rows of providers that run here.

Inputs are rotated: each call takes the next of a few input sets (x, dy and the weights), enough
that together they exceed the cache, so that small shapes are not timed from a warm cache. The
providers timed together share one rotation, so that no call finds the inputs of the call
before it still in the cache.
"""
from __future__ import annotations

import functools
import gc
import itertools
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from . import memory, parity, shapes, timing
from .progress import Progress
from .providers import Provider
from .report import ABOVE_IDEAL, ERROR, NOISY, OK, PARITY_FAILED, Row
from .roofline import Roofline
from .shapes import Shape

BASELINE = "nn.Linear"  # the provider the speedups are measured against

# p80 / p20 above which a row is timed again: measured on this project's machines, see
# ``default_spread_threshold``.
SPREAD_THRESHOLD = {"cpu": 1.5, "cuda": 1.2}
# How far past the roofline's bound a speed-up over nn.Linear may go before the pair's timings
# are suspected: on a CPU, nn.Linear's fp32 GEMM at M = 1-16 runs at a third of the copy
# bandwidth that bound assumes, and the grouped paths beat it by up to 1.3x more than the bound
# in runs whose every timing was steady (2026-12-07, 2-core Xeon); on CUDA, none.
ABOVE_IDEAL_SLACK = {"cpu": 1.5, "cuda": 1.0}

# timer(calls by provider name, device, tensors whose .grad to clear by name, budget_s, min_reps)
Timer = Callable[[Mapping[str, Callable[[], object]], torch.device,
                  Mapping[str, Sequence[torch.Tensor]], float, int], Dict[str, timing.Timing]]


def default_spread_threshold(device: torch.device) -> float:
    """1.5 on a CPU (wall clock of a shared machine), 1.2 on CUDA (do_bench's CUDA events)."""
    return SPREAD_THRESHOLD["cuda" if device.type == "cuda" else "cpu"]


@dataclass
class SweepConfig:
    shapes: Sequence[Shape]
    Ms: Sequence[int]
    modes: Sequence[str]
    providers: Sequence[Provider]
    dtype: torch.dtype
    device: torch.device
    roofline: Roofline
    env: Dict[str, str] = field(default_factory=dict)
    budget_s: float = 1.0      # CPU: timed calls continue while this lasts (after min_reps)
    min_reps: int = 5          # CPU: at least this many timed calls
    spread_threshold: Optional[float] = None  # None: default_spread_threshold(device)
    max_repeats: int = 3       # an unstable run is timed again at most this many times
    max_time_s: float = 15.0   # ... and not when that would take the row past this many seconds
    timer: Optional[Timer] = None  # None: timing.bench_many (tests pass a fake one)
    tolerance: Optional[float] = None  # None: parity.TOLERANCES[dtype], the numerics contract
    seed: int = 0
    measure_memory: bool = True
    rotate_bytes: Optional[int] = None  # None: twice the L2 (CUDA) or 64 MiB (CPU)
    max_sets: int = 64  # small shapes need many sets to exceed a cache (M = 1: ~3 MB each)
    warmup_calls: Optional[int] = None  # untimed calls per provider and mode; None: one per set
    warmup_s: float = 1.0  # ... but a provider's warm-up stops after this many seconds
    done: frozenset = frozenset()  # (shape, M, mode) already measured (--resume): not run again
    on_rows: Optional[Callable[[Sequence[Row]], None]] = None  # after each mode's rows (--out)


class InputSet:
    """One rotation slot: ``x``, the upstream gradient ``dy`` and each provider kind's weights."""

    def __init__(self, shape: Shape, M: int, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator):
        self.shape, self.dtype, self.device, self.generator = shape, dtype, device, generator
        self.x = torch.randn(M, shape.in_features, generator=generator, device=device).to(dtype)
        self.x.requires_grad_()
        self.dy = torch.randn(M, shape.out_features, generator=generator, device=device).to(dtype)
        self._params: Dict[bool, List[torch.Tensor]] = {}

    def params(self, provider: Provider) -> List[torch.Tensor]:
        """The weights for ``provider``: shared by every grouped provider, own ones for dense."""
        if provider.dense not in self._params:
            self._params[provider.dense] = provider.make_params(
                self.shape, self.dtype, self.device, self.generator)
        return self._params[provider.dense]

    def leaves(self) -> List[torch.Tensor]:
        return [self.x] + [p for ps in self._params.values() for p in ps]


def _rotation_count(cfg: SweepConfig, shape: Shape, M: int) -> int:
    """How many input sets: enough to exceed twice the last-level cache, at most ``max_sets``."""
    target = cfg.rotate_bytes
    if target is None:
        if cfg.device.type == "cuda":
            props = torch.cuda.get_device_properties(cfg.device)
            target = 2 * getattr(props, "L2_cache_size", 64 << 20)
        else:
            target = 64 << 20
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    set_bytes = elem * (M * (shape.in_features + shape.out_features) + shapes.params(shape))
    return max(1, min(cfg.max_sets, math.ceil(target / set_bytes)))


def warmup_count(cfg: SweepConfig, sets: int) -> int:
    """Untimed calls per provider before a mode's first run: one per input set, or
    ``cfg.warmup_calls`` when that is fewer (at least one: the first call compiles, allocates)."""
    return sets if cfg.warmup_calls is None else max(1, min(cfg.warmup_calls, sets))


def warm_up(call: Callable[[], object], calls: int, seconds: float) -> None:
    """``calls`` untimed calls (one per input set, so that each set's weights and the kernels'
    packed copies are warm before timing), but none started after ``seconds``: at large M one
    call may take a second."""
    start = time.perf_counter()
    for i in range(calls):
        if i and time.perf_counter() - start > seconds:
            break
        call()


def done_points(rows: Sequence[Row]) -> frozenset:
    """The (shape, M, mode) whose rows are all present (``--resume`` skips them)."""
    return frozenset((r.shape, r.M, r.mode) for r in rows)


def _cycle(n: int) -> Callable[[], int]:
    counter = itertools.cycle(range(n))
    return lambda: next(counter)


def _timed_call(mode: str, fns: Sequence[Callable], sets: Sequence[InputSet],
                following: Optional[Callable[[], int]] = None):
    """(the callable to time for ``mode``, tensors whose .grad to clear, a cleanup).

    ``following`` gives the input set of each call; callables timed together share one, so that
    consecutive calls never read the same set."""
    following = following or _cycle(len(sets))
    leaves = [t for s in sets for t in s.leaves()]
    if mode == "fwd":
        def call():
            k = following()
            return fns[k](sets[k].x)
        return call, (), lambda: None
    if mode == "fwd+bwd":
        def call():
            k = following()
            fns[k](sets[k].x).backward(sets[k].dy)
        return call, leaves, lambda: None
    outs = [fn(s.x) for fn, s in zip(fns, sets)]  # graphs kept: only the backward is timed

    def call():
        k = following()
        outs[k].backward(sets[k].dy, retain_graph=True)
    return call, leaves, outs.clear


def _one_call(mode: str, fn: Callable, s: InputSet) -> Callable[[], object]:
    """One call on set 0 for the memory measurement (gradients cleared before it)."""
    for t in s.leaves():
        t.grad = None
    if mode == "fwd":
        return lambda: fn(s.x)
    if mode == "fwd+bwd":
        return lambda: fn(s.x).backward(s.dy)
    out = fn(s.x)
    return lambda: out.backward(s.dy, retain_graph=True)


def _grad_mode(mode: str):
    return torch.no_grad() if mode == "fwd" else torch.enable_grad()


# An instability: (kind, severity: how far past its limit, 1.0 = at it; the words for the row).
Instability = Tuple[str, float, str]


def assess(timings: Mapping[str, timing.Timing], spread_threshold: float,
           speedup_bounds: Mapping[str, float], baseline: str = BASELINE, slack: float = 1.0
           ) -> Dict[str, List[Instability]]:
    """What is wrong with one run of providers timed together, by provider (stable ones absent).

    A row is *noisy* when its p80 / p20 exceeds ``spread_threshold``; it is *above the ideal*
    when the baseline's median / its median exceeds ``slack`` times its bound in
    ``speedup_bounds`` (the most a provider can beat nn.Linear by when both run at the roofline;
    providers not in it are not checked). ``slack`` > 1 where nn.Linear itself runs well below
    its roofline (a CPU's fp32 GEMM at small M), so that its own slowness is not taken for a
    disturbed timing."""
    found: Dict[str, List[Instability]] = {}
    base = timings.get(baseline)
    for name, t in timings.items():
        issues = []
        spread = timing.spread(t)
        if spread > spread_threshold:
            issues.append((NOISY, spread / spread_threshold,
                           f"{NOISY}: its call times varied too much (p80 = {spread:.2f}x p20, "
                           f"at most {spread_threshold:g}x accepted)"))
        bound = speedup_bounds.get(name)
        if base is not None and name != baseline and bound and t.median_ms > 0:
            speedup = base.median_ms / t.median_ms
            if speedup > bound * slack:
                allowed = f"the {bound:.2f}x the roofline allows" + (
                    f" (x{slack:g} on this device)" if slack != 1 else "")
                issues.append((ABOVE_IDEAL, speedup / (bound * slack),
                               f"{ABOVE_IDEAL}: {speedup:.2f}x faster than {baseline}, more than "
                               f"{allowed}, so one of the two timings was disturbed"))
        if issues:
            found[name] = issues
    return found


def _severity(issues: Mapping[str, List[Instability]]) -> float:
    return max((sev for found in issues.values() for _, sev, _ in found), default=0.0)


@dataclass
class Measurement:
    """The run of a shape, M and mode that is kept, and how it was reached."""

    timings: Dict[str, timing.Timing]
    issues: Dict[str, List[Instability]]
    runs: int  # how many runs were made (the kept one included)
    max_time_s: Optional[float] = None  # set when that limit, not the repeat count, ended them

    def reason(self, name: str) -> str:
        """Why ``name``'s row is unstable, and how often it was timed ("" when it is stable)."""
        found = self.issues.get(name)
        if not found:
            return ""
        text = "; ".join(words for _, _, words in found)
        runs = "once" if self.runs == 1 else f"{self.runs} times"
        if self.max_time_s is not None:
            return (f"{text}; timed {runs}, not again: another run would have taken this row "
                    f"past --max-time {self.max_time_s:g} s")
        if self.runs == 1:
            return f"{text}; timed once, not again: --max-repeats 0 allows no repeat"
        return f"{text}; timed {runs}, unstable every time (the least unstable run is kept)"

    def advice(self) -> str:
        """What would give the unstable rows of this measurement a usable number."""
        if self.max_time_s is not None:
            return ("rerun on an idle machine, or give each row more time with a larger "
                    f"--max-time (e.g. --max-time {max(10.0, 4 * self.max_time_s):g})")
        if self.runs == 1:
            return "rerun on an idle machine, or allow repeats with --max-repeats (e.g. 3)"
        return "rerun on an idle machine, or allow more repeats with a larger --max-repeats"


class Sweep:
    def __init__(self, cfg: SweepConfig, progress: Optional[Progress] = None):
        self.cfg = cfg
        self.progress = progress or Progress(0, enabled=False)
        self.tol = cfg.tolerance if cfg.tolerance is not None else parity.tolerance(cfg.dtype)
        self.spread_threshold = cfg.spread_threshold or default_spread_threshold(cfg.device)
        # The calls are warmed up here (``warmup_calls``) before the first run: no more.
        self.timer: Timer = cfg.timer or functools.partial(timing.bench_many, warmup=0)
        self.rows: List[Row] = []

    def runnable(self) -> List[Provider]:
        c = self.cfg
        return [p for p in c.providers if p.unavailable(c.device, c.dtype) is None]

    def total(self) -> int:
        """The rows the progress bar counts: those of providers that run here, not yet done."""
        c = self.cfg
        todo = sum(1 for s in c.shapes for M in c.Ms for mode in c.modes
                   if (s.name, M, mode) not in c.done)
        return todo * len(self.runnable())

    def _row(self, provider: Provider, shape: Shape, M: int, mode: str, status: str,
             **kwargs) -> Row:
        row = Row(provider=provider.name, op=shape.op, shape=shape.name, family=shape.family,
                  in_features=shape.in_features, out_features=shape.out_features,
                  groups=shape.groups, M=M, dtype=shapes.dtype_name(self.cfg.dtype), mode=mode,
                  status=status, flops=shapes.flops(shape, M, mode, provider.dense),
                  bytes=shapes.min_bytes(shape, M, mode, self._elem(), provider.dense),
                  params=shapes.params(shape, provider.dense),
                  ideal_speedup_vs_linear=None if provider.dense else shapes.ideal_speedup(shape),
                  env=dict(self.cfg.env), **kwargs)
        roof = self.cfg.roofline
        row.roofline_ms = roof.time_s(row.flops, row.bytes) * 1e3
        row.bound = roof.bound(row.flops, row.bytes)
        if not provider.dense:
            row.roofline_speedup_vs_linear = self._speedup_bound(shape, M, mode)
        self.rows.append(row)
        return row

    def _rows_done(self) -> None:
        """Rows were added: hand them to ``on_rows`` (the --out file is rewritten)."""
        if self.cfg.on_rows is not None:
            fill_speedups(self.rows)
            self.cfg.on_rows(self.rows)

    def _elem(self) -> int:
        return torch.empty((), dtype=self.cfg.dtype).element_size()

    def _speedup_bound(self, shape: Shape, M: int, mode: str) -> float:
        """The most the IO block can beat nn.Linear by: nn.Linear's roofline time / its own
        (G/2 when compute-bound, a little less when memory-bound); G/2 without a roofline."""
        roof, elem = self.cfg.roofline, self._elem()
        own = roof.time_s(shapes.flops(shape, M, mode), shapes.min_bytes(shape, M, mode, elem))
        dense = roof.time_s(shapes.flops(shape, M, mode, True),
                            shapes.min_bytes(shape, M, mode, elem, True))
        return dense / own if own > 0 and dense > 0 else shapes.ideal_speedup(shape)

    def run(self) -> List[Row]:
        c = self.cfg
        for shape in c.shapes:
            for M in c.Ms:
                first = len(self.rows)
                self._run_point(shape, M)
                self._order_point(first)
        fill_speedups(self.rows)
        return self.rows

    def _order_point(self, first: int) -> None:
        """A point's rows by provider, then mode (the order of the configuration)."""
        place = {p.name: i for i, p in enumerate(self.cfg.providers)}
        modes = {m: i for i, m in enumerate(self.cfg.modes)}
        self.rows[first:] = sorted(self.rows[first:],
                                   key=lambda r: (place.get(r.provider, 0), modes.get(r.mode, 0)))

    def _run_point(self, shape: Shape, M: int) -> None:
        c = self.cfg
        modes = [m for m in c.modes if (shape.name, M, m) not in c.done]
        if not modes:
            return
        try:
            generator = torch.Generator(device=c.device).manual_seed(c.seed)
            sets = [InputSet(shape, M, c.dtype, c.device, generator)
                    for _ in range(_rotation_count(c, shape, M))]
        except Exception as err:  # e.g. out of memory: every row of this point says so
            message = f"creating the inputs: {_describe(err)}"
            for provider in c.providers:
                for mode in modes:
                    self._row(provider, shape, M, mode, ERROR, parity="not run", error=message)
            self.progress.write(f"ERROR {shape.name} M={M}: {message}")
            self.progress.advance(len(self.runnable()) * len(modes))
            self._rows_done()
            return
        oracle = None
        ready = []
        try:
            for provider in c.providers:
                reason = provider.unavailable(c.device, c.dtype)
                if reason is not None:  # a row saying why; the progress bar never counted it
                    for mode in modes:
                        self._row(provider, shape, M, mode, reason, parity="not run")
                    continue
                if oracle is None and not provider.dense:
                    oracle = parity.Oracle(sets[0].x, sets[0].params(provider), sets[0].dy)
                checked = self._check(provider, shape, M, sets, oracle, modes)
                if checked is not None:
                    ready.append(checked)
            for mode in modes:
                self._run_mode(ready, shape, M, mode, sets)
        finally:
            del sets, oracle, ready
            gc.collect()
            if c.device.type == "cuda":
                torch.cuda.empty_cache()

    def _check(self, provider: Provider, shape: Shape, M: int, sets, oracle, modes):
        """(provider, its callables per input set, its parity), or None when it raised."""
        label = f"{shape.name} M={M} {provider.name}"
        self.progress.step(f"{label} parity")
        try:
            fns = [provider.bind(shape, s.params(provider)) for s in sets]
            if provider.dense:
                check = parity.ParityResult.dense_baseline()
            else:
                # The Triton IO block rounds dxi by design: its dx meets the rounding bound.
                rounded = ("dx",) if provider.name == "triton" else ()
                check = parity.check(fns[0], sets[0].x, sets[0].params(provider), sets[0].dy,
                                     oracle, self.tol, grads=any(m != "fwd" for m in modes),
                                     rounded=rounded)
        except Exception as err:  # a provider that cannot even run: every mode says why
            message = _describe(err)
            for mode in modes:
                self._row(provider, shape, M, mode, ERROR, parity="not run", error=message)
            self.progress.write(f"ERROR {label}: {message}")
            self.progress.advance(len(modes))
            self._rows_done()
            return None
        finally:
            for s in sets:
                for t in s.leaves():
                    t.grad = None
        return provider, fns, check

    def _run_mode(self, ready, shape: Shape, M: int, mode: str, sets) -> None:
        """Time every provider that passed parity for ``mode``, together; write their rows."""
        c = self.cfg
        entries = []
        for provider, fns, check in ready:
            common = dict(parity=check.describe(mode), parity_rel_err=check.worst(mode),
                          parity_tol=None if check.dense else check.tol)
            if check.ok_for(mode) is False:
                self._row(provider, shape, M, mode, PARITY_FAILED, **common)
                self.progress.write(f"PARITY FAILED {provider.name} {shape.name} M={M} {mode}: "
                                    f"{common['parity']} -- not timed")
                self.progress.advance()
            else:
                entries.append((provider, fns, common))
        if not entries:
            self._rows_done()
            return
        self.progress.step(f"{shape.name} M={M} {mode}")
        errors: Dict[str, str] = {}
        calls, grads, cleanups = {}, {}, []
        following = _cycle(len(sets))
        kept, peaks = None, {}
        with _grad_mode(mode):
            try:
                for provider, fns, _ in entries:
                    try:
                        call, grad_to_none, cleanup = _timed_call(mode, fns, sets, following)
                        cleanups.append(cleanup)
                        # The warm-up: one call per input set unless told fewer (do_bench adds
                        # its own on CUDA).
                        warm_up(call, warmup_count(c, len(sets)), c.warmup_s)
                    except Exception as err:
                        errors[provider.name] = _describe(err)
                        continue
                    calls[provider.name], grads[provider.name] = call, grad_to_none
                kept = self._measure(calls, grads, errors, shape, M, mode)
            finally:
                for cleanup in cleanups:
                    cleanup()
            for provider, fns, _ in entries:
                if provider.name in errors or not c.measure_memory:
                    continue
                try:
                    peaks[provider.name] = memory.peak_bytes(
                        _one_call(mode, fns[0], sets[0]), c.device)
                except Exception as err:
                    errors[provider.name] = _describe(err)
        for s in sets:
            for t in s.leaves():
                t.grad = None
        for provider, fns, common in entries:
            name = provider.name
            if name in errors:
                self._row(provider, shape, M, mode, ERROR, error=errors[name], **common)
                self.progress.write(f"ERROR {name} {shape.name} M={M} {mode}: {errors[name]}")
                if c.device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                self._timed_row(provider, shape, M, mode, kept, peaks.get(name), common)
            self.progress.advance()
        self._rows_done()

    def _measure(self, calls, grads, errors: Dict[str, str], shape: Shape, M: int,
                 mode: str) -> Optional[Measurement]:
        """Time ``calls`` together until a run is stable, ``max_repeats`` repeats were made, or
        another would end past ``max_time_s``; keep the stable run or the least unstable one.
        A provider whose call raises is dropped (its error in ``errors``) and the runs restart."""
        c = self.cfg
        bounds = {name: self._speedup_bound(shape, M, mode) for name in calls
                  if not self._dense(name)}
        runs: List[Tuple[Dict[str, timing.Timing], Dict[str, List[Instability]]]] = []
        out_of_time = False
        start = time.perf_counter()
        while calls:
            began = time.perf_counter()
            # A noisy run is timed again with twice the calls: a median of more calls moves
            # less with a burst of load from elsewhere.
            scale = 2 ** len(runs)
            try:
                timings = self.timer(calls, c.device, grads, c.budget_s * scale,
                                     c.min_reps * scale)
            except timing.CallFailed as failed:
                errors[failed.name] = _describe(failed.error)
                calls.pop(failed.name, None)
                grads.pop(failed.name, None)
                runs.clear()
                continue
            except Exception as err:  # the timer itself failed: every row of the run says so
                for name in calls:
                    errors[name] = _describe(err)
                return None
            took = time.perf_counter() - began
            issues = assess(timings, self.spread_threshold, bounds,
                            slack=ABOVE_IDEAL_SLACK["cuda" if c.device.type == "cuda" else "cpu"])
            runs.append((timings, issues))
            if not issues or len(runs) > c.max_repeats:
                break
            if time.perf_counter() - start + 2 * took > c.max_time_s:  # the next run is 2x
                out_of_time = True
                break
            label = ", ".join(sorted(issues))
            self.progress.step(f"{shape.name} M={M} {mode}: again ({label} unstable)")
        if not runs:
            return None
        best = runs[-1] if not runs[-1][1] else min(runs, key=lambda run: _severity(run[1]))
        return Measurement(best[0], best[1], len(runs), c.max_time_s if out_of_time else None)

    def _dense(self, name: str) -> bool:
        return any(p.dense for p in self.cfg.providers if p.name == name)

    def _timed_row(self, provider, shape, M, mode, kept: Measurement, peak, common) -> None:
        c = self.cfg
        t = kept.timings[provider.name]
        peak_bytes, method = peak if peak is not None else (None, "not measured")
        reason = kept.reason(provider.name)
        row = self._row(provider, shape, M, mode, OK, median_ms=t.median_ms, p20_ms=t.p20_ms,
                        p80_ms=t.p80_ms, reps=t.reps, stable=not reason, unstable_reason=reason,
                        repeats=kept.runs,
                        peak_mem_mb=None if peak_bytes is None else peak_bytes / 2 ** 20,
                        peak_mem_method=method, **common)
        seconds = t.median_ms * 1e-3
        row.tflops = row.flops / seconds / 1e12
        row.gbps = row.bytes / seconds / 1e9
        row.roofline_fraction, row.roofline_note = capped_fraction(
            c.roofline.fraction(row.flops, row.bytes, seconds))
        if reason:
            self.progress.write(f"UNSTABLE {provider.name} {shape.name} M={M} {mode}: {reason}. "
                                f"This time is not a result: {kept.advice()}.")


def capped_fraction(fraction: Optional[float]):
    """(the roofline fraction, at most 1; a note when the measured one was above 1): a row faster
    than the roofline means the peak was measured low (on a busy machine), not 130 % efficiency."""
    if fraction is None or fraction <= 1.0:
        return fraction, ""
    return 1.0, (f"ran at {100 * fraction:.0f}% of the measured peak: the peak was measured low "
                 "(other work on the machine), so this row is at the roofline")


def _describe(err: BaseException) -> str:
    """The error's type and message, plus the innermost frame it was raised in."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}{where}"


def fill_speedups(rows: Sequence[Row]) -> None:
    """``speedup_vs_linear`` = nn.Linear's median / the row's median, same shape, M, mode, dtype."""
    linear = {(r.shape, r.M, r.mode, r.dtype): r.median_ms for r in rows
              if r.provider == "nn.Linear" and r.timed}
    for r in rows:
        base = linear.get((r.shape, r.M, r.mode, r.dtype))
        r.speedup_vs_linear = base / r.median_ms if (base and r.timed) else None


def run_sweep(cfg: SweepConfig, progress: bool = True) -> List[Row]:
    sweep = Sweep(cfg)
    sweep.progress = Progress(sweep.total(), enabled=progress)
    try:
        return sweep.run()
    finally:
        sweep.progress.close()
