"""One command that checks and times the kernels on a CUDA GPU: half-precision parity, then timings.

    python -m kphi3_bench.gpu_check --out-dir gpu-check-out    # on a machine with a CUDA GPU
    python -m kphi3_bench.gpu_check --dry-run --out-dir /tmp/x # on a CPU: torch backend, tiny shapes

Every number it writes is measured by this run on the machine it runs on (nothing is copied
from elsewhere); the roofline it compares against is the one ``kphi3_bench.roofline`` picks
(on an H200 in bf16/fp16, the ceilings measured on an H200; see docs/performance.md).

Steps (each one is recorded, a failing step does not stop the next):
1. ``env.json``: device, versions, date.
2. ``pytest tests -m gpu`` (output in ``pytest-gpu.txt``, JUnit XML next to it).
3. ``parity.json``: ``gpc_io``, ``grouped_linear`` and ``gpc_block`` (with biases) in bf16 and fp16
   on the Triton backend, forward and every gradient, against a float64 reference at the
   released shapes and odd token counts; the torch backend's error in the same dtype is shown
   next to it. A case passes when every output and gradient meets the numerics contract
   (``kphi3_bench.parity``): under 1e-2 and no worse than 2x the torch backend's error + 1e-4,
   except the IO block's ``dx`` on Triton, which meets its rounding bound instead.
4. The benchmark sweep (``kphi3_bench.run``'s machinery): the released shapes at
   M in {16, 2048, 8192}, fwd / bwd / fwd+bwd, providers triton, torch, reference, torch.compile
   and nn.Linear, in bf16: ``<device>-<date>.json`` (ready for benchmarks/results/), its table and
   plots.
5. ``ledger-vs-measured.json``: every timed row of the sweep that the launch ledger models
   (triton, reference, nn.Linear) beside the ledger's H200 prediction for it, measured / predicted
   (``kphi3_bench.ledger``): the run that calibrates the cost model.
6. ``variants.json``: the IO block's two forward designs (``split``: de-interleave pass + one
   clean GEMM; ``fused``: one launch reading ``x[:, n::G]`` in place) timed in one run next to
   nn.Linear, the reference and ``torch.compile`` of the reference, at the released shapes and
   M in {2048, 8192}, each with its parity and its roofline floor: which design wins is decided
   here, by these numbers.
7. ``compile-report.json``: the compile report (``kphi3_bench.compile_report``) of every launch
   at the released shapes in bf16/fp16 for this GPU's architecture: registers, spills, shared
   memory, matrix instructions and global access kinds, beside the timings they explain.
8. Optionally (``--model``) the model-level benchmark: ``model-<device>-<date>.json``, the
   training step and ``generate`` of dense Phi-3, KPhi-3 on the reference (torch) backend, with
   the op-level kernels and with ``fused_decoder=True``, timed in one run.
``summary.json`` says which steps passed; the exit status is 0 only when all did.

``--dry-run`` runs every step's logic on the CPU with the torch backend standing in for Triton,
on tiny shapes, and skips pytest (its command is recorded): it checks the script, not the GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

import kphi3_kernels
from kphi3_kernels import reference

from . import env, parity, providers, report, roofline, shapes
from .shapes import Shape
from .run import sweep_meta
from .sweep import SweepConfig, run_sweep

TIMING_M = (16, 2048, 8192)
VARIANT_M = (2048, 8192)
PARITY_M = (1, 37, 2048)  # a decode row, an odd count (masked tiles), a training-size count
HALF_DTYPES = (torch.bfloat16, torch.float16)

# Dry run: tiny grouped shapes (in, out, min) with G = 4 and G = 2, one with in < out.
DRY_SHAPES = [Shape("tiny-up", "tiny", "up", 64, 128, 16), Shape("tiny-down", "tiny", "down", 128, 64, 32)]
DRY_M = (1, 7)


def _randn(shape, dtype, device, generator, scale=1.0):
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype).requires_grad_()


PARAM_NAMES = {"grouped_linear": ["w", "b"], "gpc_io": ["w1", "w2", "b1", "b2"],
               "gpc_block": ["w1", "w2", "b1", "b2"]}


def _case_inputs(op: str, shape: Shape, M: int, dtype, device, generator):
    """(x, weights and biases in PARAM_NAMES order) for one op; all leaves requiring grad."""
    G, s, og = shape.groups, shape.in_per_group, shape.out_per_group
    x = _randn((M, shape.in_features), dtype, device, generator)
    if op == "grouped_linear":
        return x, [_randn((G, s, og), dtype, device, generator, s ** -0.5),
                   _randn((G, og), dtype, device, generator)]
    if op == "gpc_io":
        return x, [_randn((G, s, og), dtype, device, generator, (2 * s) ** -0.5),
                   _randn((G, s, og), dtype, device, generator, (2 * s) ** -0.5),
                   _randn((G, og), dtype, device, generator), _randn((G, og), dtype, device, generator)]
    w2 = (_randn((G, og, og), dtype, device, generator, og ** -0.5)
          if shape.in_features >= shape.out_features else None)
    return x, [_randn((G, s, og), dtype, device, generator, s ** -0.5), w2,
               _randn((G, og), dtype, device, generator),
               _randn((G, og), dtype, device, generator) if w2 is not None else None]


def _run_op(op: str, backend: Optional[str], x, params):
    """Forward on a backend (None: the plain reference) and backward with a fixed upstream grad."""
    if backend is None:
        fn = getattr(reference, op)
    else:
        fn = getattr(kphi3_kernels, op)
    y = fn(x, *params) if backend is None else fn(x, *params, backend=backend)
    return y


def _errors(op, backend, x, params, dy, want) -> Dict[str, float]:
    leaves = [x] + [p for p in params if p is not None]
    for t in leaves:
        t.grad = None
    y = _run_op(op, backend, x, params)
    y.backward(dy)
    got = [y] + [t.grad for t in leaves]
    names = ["y", "dx"] + [f"d{n}" for n, p in zip(PARAM_NAMES[op], params) if p is not None]
    return {n: (float("inf") if g is None else parity.rel_err(g, w))
            for n, g, w in zip(names, got, want)}


def case_failures(errors: Dict[str, float], torch_errors: Dict[str, float], dtype,
                  rounding: Optional[Dict[str, float]] = None) -> Dict[str, str]:
    """The numerics contract on each output and gradient (``parity.contract_failure``): the
    torch backend is the plain PyTorch path; a rounding bound replaces the ratio where given."""
    rounding = rounding or {}
    failures = {}
    for n, err in errors.items():
        why = parity.contract_failure(err, dtype, torch_errors.get(n), rounding.get(n))
        if why is not None:
            failures[n] = why
    return failures


def _rounding_bounds(op, candidate, x64, p64, dy, want, dtype) -> Dict[str, float]:
    """The Triton IO block rounds ``dxi`` (``dx``'s term through W2) to the operand dtype before
    the sum (docs/numerics.md, "Rounded intermediates"): ``dx`` meets that rounding bound."""
    if op != "gpc_io" or candidate != "triton":
        return {}
    x = x64.detach().requires_grad_()
    y = _run_op(op, None, x, [torch.zeros_like(p64[0]), p64[1].detach(), None, None])
    (dxi,) = torch.autograd.grad(y, [x], dy.double())
    return {"dx": parity.rounded_intermediate_bound(dtype, want[1], dxi)}


def parity_cases(device, candidate: str, shapes_: List[Shape], Ms, seed=0) -> List[dict]:
    """Every op x dtype x shape x M: the candidate backend's and the torch backend's errors."""
    out = []
    for op in ("gpc_io", "grouped_linear", "gpc_block"):
        for dtype in HALF_DTYPES:
            for shape in shapes_:
                for M in Ms:
                    g = torch.Generator(device=device).manual_seed(seed)
                    x, params = _case_inputs(op, shape, M, dtype, device, g)
                    dy = torch.randn(M, shape.out_features, generator=g, device=device).to(dtype)
                    x64 = x.detach().double().requires_grad_()
                    p64 = [None if p is None else p.detach().double().requires_grad_() for p in params]
                    y64 = _run_op(op, None, x64, p64)
                    y64.backward(dy.double())
                    want = [y64] + [t.grad for t in [x64] + [p for p in p64 if p is not None]]
                    case = {"op": op, "dtype": shapes.dtype_name(dtype), "shape": shape.name,
                            "in": shape.in_features, "out": shape.out_features, "G": shape.groups,
                            "M": M, "backend": candidate}
                    try:
                        cand = _errors(op, candidate, x, params, dy, want)
                        base = _errors(op, "torch", x, params, dy, want)
                        rounding = _rounding_bounds(op, candidate, x64, p64, dy, want, dtype)
                        failures = case_failures(cand, base, dtype, rounding)
                        case.update(errors=cand, torch_errors=base, worst=max(cand.values()),
                                    torch_worst=max(base.values()), rounding_bounds=rounding,
                                    failures=failures, ok=not failures)
                    except Exception as err:
                        case.update(ok=False, error=f"{type(err).__name__}: {err}")
                    out.append(case)
    return out


def run_pytest_gpu(out_dir: str, dry_run: bool, timeout_s: int) -> dict:
    xml = os.path.join(out_dir, "pytest-gpu.xml")
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    if dry_run:
        return {"ok": True, "skipped": "dry run", "command": " ".join(cmd)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        text = err.stdout or ""
        if isinstance(text, bytes):  # TimeoutExpired keeps the raw bytes even with text=True
            text = text.decode(errors="replace")
        with open(os.path.join(out_dir, "pytest-gpu.txt"), "w") as f:
            f.write(text + f"\nTIMED OUT after {timeout_s} s\n")
        return {"ok": False, "error": f"timed out after {timeout_s} s", "command": " ".join(cmd)}
    with open(os.path.join(out_dir, "pytest-gpu.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    # 5: nothing was collected (no test carries the gpu marker): not a failure of the kernels.
    return {"ok": proc.returncode in (0, 5), "returncode": proc.returncode, "last_line": tail,
            "command": " ".join(cmd)}


def run_timing(out_dir: str, device, dtype, shapes_, Ms, provider_names, quick_budget: bool) -> dict:
    chosen = providers.resolve_providers(provider_names)
    info = env.environment(device)
    roof = roofline.roofline_for(device, dtype, quick=quick_budget)
    cfg = SweepConfig(shapes=shapes_, Ms=Ms, modes=list(shapes.MODES), providers=chosen,
                      dtype=dtype, device=device, roofline=roof,
                      env=env.row_env(info),
                      budget_s=0.05 if quick_budget else 1.0, min_reps=3 if quick_budget else 5)
    rows = run_sweep(cfg, progress=sys.stderr.isatty())
    meta = sweep_meta(cfg, info, roof, "python -m kphi3_bench.gpu_check (its timing step)", False)
    stem = env.default_results_name(device)[:-len(".json")]
    json_path = os.path.join(out_dir, f"{stem}.json")
    report.write_json(json_path, rows, meta)
    text = report.format_report(rows, meta)
    with open(os.path.join(out_dir, f"{stem}.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    plots = []
    try:
        plots = report.write_plots(rows, os.path.join(out_dir, f"plots-{stem}"))
    except RuntimeError as err:  # no matplotlib: the numbers are what matter
        print(f"plots skipped: {err}")
    failed = [f"{r.provider} {r.shape} M={r.M} {r.mode}: {r.status} {r.error}" for r in rows if r.failed]
    return {"ok": not failed, "json": json_path, "plots": plots, "failed": failed,
            "rows": len(rows), "timed": sum(r.timed for r in rows)}


def run_ledger(out_dir: str, timing_json: Optional[str]) -> dict:
    """Every timed row of the timing step beside the launch ledger's H200 prediction for it:
    measured / predicted per provider, shape, M and mode (the model's calibration)."""
    from . import ledger

    if not timing_json or not os.path.exists(timing_json):
        return {"ok": False, "error": "the timing step wrote no results"}
    pairs = ledger.measured_over_predicted(report.rows_from_dicts(report.load_rows(timing_json)))
    report.write_payload(os.path.join(out_dir, "ledger-vs-measured.json"),
                         {"model": ledger.model_dict(ledger.h200_model(), "auto"),
                          "rows": pairs})
    print(ledger.format_measured(pairs))
    return {"ok": True, "rows": len(pairs)}


def run_variants(out_dir: str, device, dry_run: bool, with_compile: bool) -> dict:
    from . import variants

    dtype = torch.float32 if dry_run else torch.bfloat16
    roof = roofline.roofline_for(device, dtype, quick=dry_run)
    tflops, gbps = roof.peak_tflops, roof.peak_gbps
    if dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        rows = []  # the Triton variants need a GPU or the interpreter; floors are still written
    elif dry_run:
        # The interpreter stands in for the GPU: one tiny shape, so the logic is exercised.
        rows = variants.time_variants(device, dtype, DRY_SHAPES[:1], DRY_M[-1:], tflops, gbps,
                                      with_compile=False, budget_s=0.02)
    else:
        rows = variants.time_variants(device, dtype, [s for s in shapes.SHAPES.values()
                                                      if s.family == "kphi3"],
                                      VARIANT_M, tflops, gbps, with_compile=with_compile)
    predicted = variants.predicted_floors([s for s in shapes.SHAPES.values()
                                           if s.family == "kphi3"], 8192,
                                          torch.empty((), dtype=dtype).element_size(), tflops, gbps)
    report.write_payload(os.path.join(out_dir, "variants.json"),
                         {"roofline": {"tflops": tflops, "gbps": gbps, "source": roof.describe()},
                          "rows": rows, "predicted_floors_m8192": predicted})
    print(variants.format_rows(rows))
    bad = [r for r in rows
           if r["rel_error"] is not None and not r["rel_error"] < parity.tolerance(dtype)]
    return {"ok": not bad, "rows": len(rows), "parity_failed": len(bad)}


def run_compile_report(out_dir: str, dry_run: bool, timeout_s: int) -> dict:
    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 90 if major >= 9 else 80
    path = os.path.join(out_dir, "compile-report.json")
    cmd = [sys.executable, "-m", "kphi3_bench.compile_report", "--shapes", "kphi3",
           "--dtypes", "bf16" if dry_run else "bf16,fp16", "--targets", str(arch),
           "--out", path] + (["--first-choice", "--ops", "gpc_io_fwd"] if dry_run else [])
    env_ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env_)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s", "command": " ".join(cmd)}
    with open(os.path.join(out_dir, "compile-report.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])
    summary_line = next((line for line in reversed(tail) if "property violations" in line), "")
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": summary_line,
            "command": " ".join(cmd)}


def run_model(out_dir: str, device, dry_run: bool) -> dict:
    from . import model_bench

    stem = env.default_results_name(device)[:-len(".json")]
    path = os.path.join(out_dir, f"model-{stem}.json")
    argv = ["--out", path, "--no-progress"] + (["--quick", "--device", "cpu"] if dry_run else [])
    status = model_bench.main(argv)
    return {"ok": status == 0, "returncode": status, "json": path}


def _step(summary: dict, name: str, fn: Callable[[], dict]) -> None:
    start = time.perf_counter()
    print(f"== {name}", flush=True)
    try:
        result = fn()
    except Exception as err:
        result = {"ok": False, "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    summary["steps"][name] = result
    print(f"== {name}: {'ok' if result.get('ok') else 'FAILED'} ({result['seconds']} s)", flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kphi3_bench.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="gpu-check-out",
                   help="folder for every result file, created if missing (default: ./%(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, torch backend instead of Triton, tiny shapes, no pytest")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out of the timing")
    p.add_argument("--model", action="store_true", help="also run the model-level benchmark")
    p.add_argument("--pytest-timeout-s", type=int, default=240,
                   help="stop `pytest -m gpu` after this long (default %(default)s)")
    p.add_argument("--compile-timeout-s", type=int, default=240,
                   help="stop the compile report after this long (default %(default)s)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry-run to exercise the script on a CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    candidate = "torch" if dry else "triton"
    released = [s for s in shapes.SHAPES.values() if s.family == "kphi3"]
    summary: dict = {"dry_run": dry, "out_dir": os.path.abspath(args.out_dir), "steps": {}}

    def write_env():
        info = env.environment(device)
        with open(os.path.join(args.out_dir, "env.json"), "w") as f:
            json.dump(info, f, indent=1)
        return {"ok": True, **info}

    def check_parity():
        cases = parity_cases(device, candidate, DRY_SHAPES if dry else released,
                             DRY_M if dry else PARITY_M)
        report.write_payload(os.path.join(args.out_dir, "parity.json"),
                             {"limits": {"abs": parity.HALF_TOL,
                                         "ratio_to_torch": parity.HALF_RATIO,
                                         "slack": parity.HALF_SLACK}, "cases": cases})
        bad = [c for c in cases if not c["ok"]]
        for c in cases:
            flag = "ok " if c["ok"] else "BAD"
            print(f"{flag} {c['op']:14s} {c['dtype']} {c['shape']:14s} M={c['M']:<5d} "
                  f"{candidate} {c.get('worst', float('nan')):.2e}  torch "
                  f"{c.get('torch_worst', float('nan')):.2e} {c.get('error', '')}")
        return {"ok": not bad, "cases": len(cases), "failed": len(bad)}

    names = ["triton", "torch", "reference", "torch.compile", "nn.Linear"]
    if args.no_compile:
        names.remove("torch.compile")
    if dry:
        names.remove("triton")  # on CPU it would only say "needs a GPU"

    _step(summary, "env", write_env)
    _step(summary, "pytest -m gpu", lambda: run_pytest_gpu(args.out_dir, dry, args.pytest_timeout_s))
    _step(summary, "parity", check_parity)
    _step(summary, "timing", lambda: run_timing(
        args.out_dir, device, torch.float32 if dry else torch.bfloat16,
        DRY_SHAPES if dry else released, DRY_M if dry else TIMING_M, names, quick_budget=dry))
    _step(summary, "ledger", lambda: run_ledger(
        args.out_dir, summary["steps"].get("timing", {}).get("json")))
    _step(summary, "variants", lambda: run_variants(args.out_dir, device, dry,
                                                    not args.no_compile))
    _step(summary, "compile report", lambda: run_compile_report(args.out_dir, dry,
                                                                args.compile_timeout_s))
    if args.model:
        _step(summary, "model", lambda: run_model(args.out_dir, device, dry))
    summary["ok"] = all(s.get("ok") for s in summary["steps"].values())
    report.write_payload(os.path.join(args.out_dir, "summary.json"), summary)
    print(f"gpu_check: {'all steps passed' if summary['ok'] else 'FAILED'}; see "
          f"{os.path.join(args.out_dir, 'summary.json')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
