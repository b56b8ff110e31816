"""The step runner of ``gpu_check``: steps in order of value, each started only when its estimate
fits in what is left of a time limit, each one's files written as it completes.

A ``Step`` has a planner and a body. The planner (cheap, no GPU) says what the step needs: the
distinct kernel compiles (``keys``: one per (kernel, constexpr specialization, config), as
``compile_report.plan`` keys them) and the seconds of running it (``run_s``, from the launch
ledger's predictions and the timing method's fixed costs) plus fixed costs (``fixed_s``: process
starts, imports). Kernels compiled by an earlier step of the same run are not counted again.

``Runner.run`` goes through the steps in order. Before each it computes the estimate
(``new compiles x COMPILE_S_PER_KERNEL + run_s + fixed_s``) and starts the step only if the
estimate fits in the remaining time; otherwise the step is listed as skipped for time and the
next (perhaps cheaper) one is considered. After every step ``summary.json`` and ``summary.txt``
are rewritten (atomically: a run stopped at any point, even by SIGKILL, leaves a complete summary
of the steps that finished). With ``hard_stop`` a step still running when the time limit (plus
``GRACE_S``) is reached is interrupted (``StepTimeout``) and recorded as stopped; what it wrote
before stays.

In a dry run nothing runs: each step that fits (on a clock advanced by the estimates) writes its
plan (``plan-<step>.json``) instead, and the summary gives the total estimated GPU time.

This module imports neither torch nor the kernels.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, Optional, Sequence

# Seconds to compile one Triton kernel (one kernel, constexpr specialization and config) the
# first time it is launched on the GPU machine. Rationale: the compile report of 2026-12-07
# (benchmarks/results/compile-report-2026-12-07.json, each record's ``compile_s``: the
# ``triton.compile`` call that the runtime makes on a first launch) took 0.39 s a kernel on average
# over its 430 bf16 / fp16 sm_90a kernels (median 0.38 s), on 2 shared CPU cores; its first
# version, before the layout GEMMs became views of the one GEMM kernel, took 1.09 s (median
# 0.3 s, the slowest 4 s). 0.6 s, half again the measured mean, keeps a margin for the slow ones
# and for ptxas on a busy host; a kernel already in Triton's on-disk cache (a machine that ran
# gpu_check before) costs far less: then this over-estimates. The first GPU run's summary
# (estimate beside time taken per step) calibrates it.
COMPILE_S_PER_KERNEL = 0.6

# A step still running this long after the time limit is interrupted (with ``hard_stop``).
GRACE_S = 5.0

DEFAULT_BUDGET_S = 420.0

RAN, FAILED, SKIPPED_TIME, SKIPPED, STOPPED, PLANNED = (
    "ran", "failed", "skipped for time", "skipped", "stopped at the time limit", "planned")


class StepTimeout(BaseException):
    """Raised inside a step that runs past the time limit (``hard_stop``). A BaseException, like
    KeyboardInterrupt, so that the ``except Exception`` of a timing loop does not swallow it."""


class SkipStep(Exception):
    """Raised by a planner or a body: the step cannot run here (the message says why)."""


@dataclass
class Plan:
    """What a step needs: kernel compiles (by key), run seconds and fixed seconds."""

    keys: FrozenSet[str] = frozenset()
    run_s: float = 0.0
    fixed_s: float = 0.0
    detail: Dict[str, Any] = field(default_factory=dict)
    own_compiles: int = 0  # compiles into the step's own cache (costed in fixed_s, not shared)
    max_s: Optional[float] = None  # the step stops itself after this long (a subprocess timeout)

    def new_keys(self, compiled: FrozenSet[str]) -> FrozenSet[str]:
        return frozenset(self.keys) - frozenset(compiled)

    def estimate_s(self, compiled: FrozenSet[str] = frozenset(),
                   compile_s: float = COMPILE_S_PER_KERNEL) -> float:
        total = len(self.new_keys(compiled)) * compile_s + self.run_s + self.fixed_s
        return total if self.max_s is None else min(total, self.max_s)

    def compiles(self, compiled: FrozenSet[str] = frozenset()) -> int:
        return len(self.new_keys(compiled)) + self.own_compiles


@dataclass
class Step:
    name: str                             # e.g. "parity"; files and the summary use it
    what: str                             # one line: what it measures
    plan: Callable[[], Plan]              # cheap, no GPU
    body: Callable[[Plan, float], dict]   # (its plan, seconds left) -> result dict ("ok", ...)
    files: Sequence[str] = ()             # what it writes into the output folder
    needs: Sequence[str] = ()             # steps whose results it reads: skipped without them

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")


def write_json(path: str, payload: Any) -> None:
    """Indented JSON through a temporary file that replaces ``path`` (never half a file)."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    os.replace(temporary, path)


def write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(temporary, path)


@contextlib.contextmanager
def deadline(seconds: Optional[float]) -> Iterator[None]:
    """Raise ``StepTimeout`` in this (main) thread after ``seconds``; no-op when None, off the
    main thread or where SIGALRM does not exist."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise StepTimeout(f"stopped at the time limit ({seconds:.0f} s left when it started)")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Runner:
    """Runs (or, ``dry_run``, plans) steps within ``budget_s`` seconds of ``clock``."""

    def __init__(self, out_dir: str, budget_s: float, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic, hard_stop: bool = False,
                 compile_s: float = COMPILE_S_PER_KERNEL, header: Optional[dict] = None,
                 echo: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.out_dir, self.budget_s, self.dry_run = out_dir, float(budget_s), dry_run
        self.clock, self.hard_stop, self.compile_s, self.echo = clock, hard_stop, compile_s, echo
        self.compiled: FrozenSet[str] = frozenset()
        self.start = clock()
        self.planned_s = 0.0  # dry run: the GPU seconds of the steps planned so far
        self.all_s = 0.0      # every step's estimate in order, as if the time limit allowed all
        self._all_compiled: FrozenSet[str] = frozenset()
        self.summary: Dict[str, Any] = dict(header or {})
        self.summary.update({"dry_run": dry_run, "budget_s": self.budget_s,
                             "compile_s_per_kernel": compile_s, "order": [], "steps": {},
                             "skipped_for_time": [], "ok": True})

    # ------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        """Seconds left: on the real clock, and in a dry run also on the planned GPU clock."""
        left = self.budget_s - self.elapsed()
        if self.dry_run:
            left = min(left, self.budget_s - self.planned_s)
        return left

    def run(self, steps: Sequence[Step]) -> Dict[str, Any]:
        for step in steps:
            self._one(step)
        self.summary["ok"] = all(s.get("ok", True) for s in self.summary["steps"].values())
        self.summary["finished"] = True
        self._write_summary()
        return self.summary

    def _one(self, step: Step) -> None:
        record: Dict[str, Any] = {"what": step.what, "files": list(step.files)}
        self.summary["order"].append(step.name)
        self.summary["steps"][step.name] = record
        missing = [n for n in step.needs
                   if self.summary["steps"].get(n, {}).get("status") in (None, SKIPPED,
                                                                         SKIPPED_TIME)]
        plan_start = self.clock()
        try:
            plan = step.plan()
        except SkipStep as why:
            record.update(status=SKIPPED, ok=True, reason=str(why), files=[])
            self.echo(f"== {step.name}: skipped ({why})")
            self._write_summary()
            return
        except Exception as err:
            record.update(status=FAILED, ok=False, files=[],
                          error=f"planning: {type(err).__name__}: {err}",
                          traceback=traceback.format_exc())
            self.echo(f"== {step.name}: FAILED while planning ({type(err).__name__}: {err})")
            self._write_summary()
            return
        self.all_s += plan.estimate_s(self._all_compiled, self.compile_s)
        self._all_compiled = self._all_compiled | plan.keys
        self.summary["estimated_all_s"] = round(self.all_s, 1)
        new = plan.new_keys(self.compiled)
        estimate = plan.estimate_s(self.compiled, self.compile_s)
        record.update(compiles=plan.compiles(self.compiled),
                      compiles_total=len(plan.keys) + plan.own_compiles,
                      estimate_s=round(estimate, 1), run_s=round(plan.run_s, 1),
                      fixed_s=round(plan.fixed_s, 1),
                      plan_seconds=round(self.clock() - plan_start, 2))
        remaining = self.remaining()
        record["remaining_at_start_s"] = round(remaining, 1)
        if missing:
            record.update(status=SKIPPED, ok=True, files=[],
                          reason=f"needs {', '.join(missing)}, which did not run")
            self.echo(f"== {step.name}: skipped (needs {', '.join(missing)})")
            self._write_summary()
            return
        # Decided on the figures the record shows (0.1 s), so the summary explains each skip.
        if record["estimate_s"] > record["remaining_at_start_s"]:
            record.update(status=SKIPPED_TIME, ok=True, files=[],
                          reason=f"needs ~{estimate:.0f} s, {max(remaining, 0):.0f} s left")
            self.summary["skipped_for_time"].append(step.name)
            self.echo(f"== {step.name}: skipped for time (needs ~{estimate:.0f} s, "
                      f"{max(remaining, 0):.0f} s left)")
            self._write_summary()
            return
        if self.dry_run:
            self._plan_only(step, plan, record, new, estimate)
            return
        self.echo(f"== {step.name} ({plan.compiles(self.compiled)} kernels to compile, "
                  f"~{estimate:.0f} s of {remaining:.0f} s left)")
        started = self.clock()
        limit = remaining + GRACE_S if self.hard_stop else None
        try:
            with deadline(limit):
                result = step.body(plan, remaining)
        except StepTimeout as err:
            result = {"ok": False, "status": STOPPED, "error": str(err)}
        except SkipStep as why:
            result = {"ok": True, "status": SKIPPED, "reason": str(why)}
        except Exception as err:
            result = {"ok": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()}
        seconds = self.clock() - started
        status = result.pop("status", None) or (RAN if result.get("ok") else FAILED)
        record.update(result)
        record.update(status=status, seconds=round(seconds, 1))
        if status != SKIPPED:
            self.compiled = self.compiled | plan.keys
        self.echo(f"== {step.name}: {status if status != RAN else 'ok'} ({seconds:.1f} s, "
                  f"estimated {estimate:.0f} s)")
        self._write_summary()

    def _plan_only(self, step: Step, plan: Plan, record: Dict[str, Any], new, estimate) -> None:
        path = os.path.join(self.out_dir, f"plan-{step.slug}.json")
        write_json(path, {"step": step.name, "what": step.what,
                          "compiles": len(new) + plan.own_compiles,
                          "compiles_total": len(plan.keys) + plan.own_compiles,
                          "compile_s_per_kernel": self.compile_s,
                          "compile_s": round(len(new) * self.compile_s, 1),
                          "run_s": round(plan.run_s, 1), "fixed_s": round(plan.fixed_s, 1),
                          "estimate_s": round(estimate, 1),
                          "would_write": list(step.files), "detail": plan.detail})
        self.planned_s += estimate
        self.compiled = self.compiled | plan.keys
        record.update(status=PLANNED, ok=True, files=[os.path.basename(path)],
                      planned_gpu_s_after=round(self.planned_s, 1))
        self.echo(f"== {step.name}: {len(new) + plan.own_compiles} kernel compiles, ~{estimate:.0f} s "
                  f"(total ~{self.planned_s:.0f} s)")
        self._write_summary()

    # ------------------------------------------------------------------------------------------
    def _write_summary(self) -> None:
        self.summary["elapsed_s"] = round(self.elapsed(), 1)
        if self.dry_run:
            self.summary["estimated_gpu_s"] = round(self.planned_s, 1)
        write_json(os.path.join(self.out_dir, "summary.json"), self.summary)
        write_text(os.path.join(self.out_dir, "summary.txt"), format_summary(self.summary))


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as a table: step, status, seconds (or the estimate), compiles, note."""
    dry = summary.get("dry_run")
    head = ["step", "status", "estimate s", "planned total s" if dry else "took s", "compiles",
            "note"]
    rows = [head]
    for name in summary.get("order", []):
        s = summary["steps"][name]
        note = s.get("reason") or s.get("error") or s.get("note") or ""
        took = s.get("planned_gpu_s_after") if dry else s.get("seconds")
        rows.append([name, s.get("status", "?"),
                     "" if s.get("estimate_s") is None else f"{s['estimate_s']:.0f}",
                     "" if took is None else f"{took:.0f}",
                     "" if s.get("compiles") is None else str(s["compiles"]),
                     str(note).splitlines()[0][:70] if note else ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    kind = "dry run (plans only)" if dry else "run"
    tail = [f"{kind}; time limit {summary.get('budget_s', 0):.0f} s; "
            f"{summary.get('elapsed_s', 0):.1f} s elapsed"]
    if dry:
        tail.append(f"estimated GPU time of the planned steps: "
                    f"{summary.get('estimated_gpu_s', 0):.0f} s")
    skipped = summary.get("skipped_for_time") or []
    tail.append("skipped for time: " + (", ".join(skipped) if skipped else "none"))
    if not summary.get("finished"):
        tail.append("(in progress, or stopped before the end)")
    return "\n".join(lines + [""] + tail)
