"""The sweep: for every shape x M, every provider is checked for parity, then timed per mode.

A provider that cannot run here (Triton on a CPU) gives rows saying why; one that fails parity
gives rows saying so and is not timed; one that raises gives rows with the error. Nothing is
dropped: the exit code of ``run.py`` is computed from these rows.

Inputs are rotated: each call takes the next of a few input sets (x, dy and the weights), enough
that together they exceed the cache, so that small shapes are not timed from a warm cache.
"""
from __future__ import annotations

import gc
import itertools
import math
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import memory, parity, shapes, timing
from .progress import Progress
from .providers import Provider
from .roofline import Roofline
from .shapes import Shape

OK, PARITY_FAILED, ERROR = "ok", "parity failed", "error"
FAILED_STATUSES = (PARITY_FAILED, ERROR)


@dataclass
class Row:
    """One tidy result: a provider on a shape at M tokens in one mode (what the JSON holds)."""

    provider: str
    op: str
    shape: str
    family: str
    in_features: int
    out_features: int
    groups: int
    M: int
    dtype: str
    mode: str
    status: str  # "ok", "parity failed", "error", or why it did not run ("needs a GPU", ...)
    parity: str = ""
    parity_rel_err: Optional[float] = None
    parity_tol: Optional[float] = None
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: Optional[int] = None
    speedup_vs_linear: Optional[float] = None
    ideal_speedup_vs_linear: Optional[float] = None
    flops: int = 0
    bytes: int = 0
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    roofline_ms: Optional[float] = None
    roofline_fraction: Optional[float] = None
    bound: str = ""
    params: int = 0
    peak_mem_mb: Optional[float] = None
    peak_mem_method: str = ""
    error: str = ""
    env: Dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status in FAILED_STATUSES

    @property
    def timed(self) -> bool:
        return self.median_ms is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        env = d.pop("env")
        d.update(env)  # device, device_name, versions and date on every row
        return d


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
    tolerance: Optional[float] = None  # None: parity.TOLERANCES[dtype]
    seed: int = 0
    measure_memory: bool = True
    rotate_bytes: Optional[int] = None  # None: twice the L2 (CUDA) or 64 MiB (CPU)
    max_sets: int = 64  # small shapes need many sets to exceed a cache (M = 1: ~3 MB each)


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


def _cycle(n: int) -> Callable[[], int]:
    counter = itertools.cycle(range(n))
    return lambda: next(counter)


def _timed_call(mode: str, fns: Sequence[Callable], sets: Sequence[InputSet]):
    """(the callable to time for ``mode``, tensors whose .grad to clear, a cleanup)."""
    following = _cycle(len(sets))
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


class Sweep:
    def __init__(self, cfg: SweepConfig, progress: Optional[Progress] = None):
        self.cfg = cfg
        self.progress = progress or Progress(0, enabled=False)
        self.tol = cfg.tolerance if cfg.tolerance is not None else parity.tolerance(cfg.dtype)
        self.rows: List[Row] = []

    def total(self) -> int:
        c = self.cfg
        return len(c.shapes) * len(c.Ms) * len(c.providers) * len(c.modes)

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
        self.rows.append(row)
        return row

    def _elem(self) -> int:
        return torch.empty((), dtype=self.cfg.dtype).element_size()

    def run(self) -> List[Row]:
        c = self.cfg
        for shape in c.shapes:
            for M in c.Ms:
                self._run_point(shape, M)
        fill_speedups(self.rows)
        return self.rows

    def _run_point(self, shape: Shape, M: int) -> None:
        c = self.cfg
        try:
            generator = torch.Generator(device=c.device).manual_seed(c.seed)
            sets = [InputSet(shape, M, c.dtype, c.device, generator)
                    for _ in range(_rotation_count(c, shape, M))]
        except Exception as err:  # e.g. out of memory: every row of this point says so
            message = f"creating the inputs: {_describe(err)}"
            for provider in c.providers:
                for mode in c.modes:
                    self._row(provider, shape, M, mode, ERROR, parity="not run", error=message)
            self.progress.write(f"ERROR {shape.name} M={M}: {message}")
            self.progress.advance(len(c.providers) * len(c.modes))
            return
        oracle = None
        try:
            for provider in c.providers:
                reason = provider.unavailable(c.device)
                if reason is not None:
                    for mode in c.modes:
                        self._row(provider, shape, M, mode, reason, parity="not run")
                    self.progress.advance(len(c.modes))
                    continue
                if oracle is None and not provider.dense:
                    oracle = parity.Oracle(sets[0].x, sets[0].params(provider), sets[0].dy)
                self._run_provider(provider, shape, M, sets, oracle)
        finally:
            del sets, oracle
            gc.collect()
            if c.device.type == "cuda":
                torch.cuda.empty_cache()

    def _run_provider(self, provider: Provider, shape: Shape, M: int, sets, oracle) -> None:
        c = self.cfg
        label = f"{shape.name} M={M} {provider.name}"
        self.progress.step(f"{label} parity")
        try:
            fns = [provider.bind(shape, s.params(provider)) for s in sets]
            if provider.dense:
                check = parity.ParityResult.dense_baseline()
            else:
                check = parity.check(fns[0], sets[0].x, sets[0].params(provider), sets[0].dy,
                                     oracle, self.tol, grads=any(m != "fwd" for m in c.modes))
        except Exception as err:  # a provider that cannot even run: every mode says why
            message = _describe(err)
            for mode in c.modes:
                self._row(provider, shape, M, mode, ERROR, parity="not run", error=message)
            self.progress.write(f"ERROR {label}: {message}")
            self.progress.advance(len(c.modes))
            return
        for mode in c.modes:
            self.progress.step(f"{label} {mode}")
            self._run_mode(provider, shape, M, mode, fns, sets, check)
            self.progress.advance()
        for s in sets:
            for t in s.leaves():
                t.grad = None

    def _run_mode(self, provider, shape, M, mode, fns, sets, check: parity.ParityResult) -> None:
        c = self.cfg
        ok = check.ok_for(mode)
        common = dict(parity=check.describe(mode), parity_rel_err=check.worst(mode),
                      parity_tol=None if check.dense else check.tol)
        if ok is False:
            self._row(provider, shape, M, mode, PARITY_FAILED, **common)
            self.progress.write(f"PARITY FAILED {provider.name} {shape.name} M={M} {mode}: "
                                f"{common['parity']} -- not timed")
            return
        try:
            with _grad_mode(mode):
                call, grad_to_none, cleanup = _timed_call(mode, fns, sets)
                try:
                    for _ in sets:  # one call per input set before the timer's own warm-up
                        call()

                    t = timing.bench(call, c.device, grad_to_none, c.budget_s, c.min_reps)
                finally:
                    cleanup()
                peak, method = (None, "not measured")
                if c.measure_memory:
                    peak, method = memory.peak_bytes(_one_call(mode, fns[0], sets[0]), c.device)
        except Exception as err:
            message = _describe(err)
            self._row(provider, shape, M, mode, ERROR, error=message, **common)
            self.progress.write(f"ERROR {provider.name} {shape.name} M={M} {mode}: {message}")
            if c.device.type == "cuda":
                torch.cuda.empty_cache()
            return
        row = self._row(provider, shape, M, mode, OK, median_ms=t.median_ms, p20_ms=t.p20_ms,
                        p80_ms=t.p80_ms, reps=t.reps,
                        peak_mem_mb=None if peak is None else peak / 2 ** 20,
                        peak_mem_method=method, **common)
        seconds = t.median_ms * 1e-3
        row.tflops = row.flops / seconds / 1e12
        row.gbps = row.bytes / seconds / 1e9
        row.roofline_fraction = c.roofline.fraction(row.flops, row.bytes, seconds)


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
