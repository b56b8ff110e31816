"""One command that checks and times the kernels on a CUDA GPU within a time limit, the most
valuable measurements first.

    python -m kphi3_bench.gpu_check --out-dir gpu-check-out                 # on a CUDA GPU, 420 s
    python -m kphi3_bench.gpu_check --budget-s 240 --out-dir gpu-check-out  # a shorter limit
    python -m kphi3_bench.gpu_check --dry-run --budget-s 420 --out-dir /tmp/plan  # no GPU needed
    python -m kphi3_bench.gpu_check --rehearse --out-dir /tmp/x             # the steps on a CPU

Every number it writes is measured by this run on the machine it runs on (nothing is copied from
elsewhere).

**The time limit** (``--budget-s``, default 420 s, counted from the start of the command). The
steps run in the order below. Before each, its GPU time is estimated (its kernel compiles not
yet done by an earlier step x ``gpu_steps.COMPILE_S_PER_KERNEL``, plus its run time from the
launch ledger's predictions and the timing method's fixed costs, plus fixed costs such as
process starts); a step starts only if that estimate fits in the time left, otherwise it is
listed as skipped for time and the next one is considered. A step still running when the limit
(plus ``gpu_steps.GRACE_S``) is reached is stopped. Each step writes its files as it completes
(the timing steps after every row), and ``summary.json`` / ``summary.txt`` are rewritten after
every step: which steps ran, how long each took against its estimate, which were skipped for
time. A run cut short, even killed, keeps everything it measured.

**Autotuning is bounded.** Until the autotune step, every kernel is launched with its
first-choice config (``configs[0]``; ``kphi3_kernels.ops.launch.FIRST_CHOICE``, the environment
variable ``KPHI3_FIRST_CHOICE=1`` for the GPU tests): one compile per kernel instead of one per
config. The autotune step then times the core grid again with every config tried.

Steps, by value:
1. ``env``: ``env.json``, device, versions, date.
2. ``ceilings``: ``ceilings.json``, this GPU's two ceilings, measured: a bf16 8192^3 matmul
   (TFLOP/s) and a 1 GiB device-to-device copy (GB/s, read + write), best of 5. The timing steps'
   roofline and the measured / predicted step use them.
3. ``pytest -m gpu``: the GPU tests (``pytest-gpu.txt``, JUnit XML ``pytest-gpu.xml``).
4. ``parity``: ``parity.json``, ``gpc_io``, ``grouped_linear`` and ``gpc_block`` (with biases) in
   bf16 and fp16 on the Triton backend, forward and every gradient, against a float64 reference at
   the released shapes and odd token counts, the torch backend's error in the same dtype beside
   it (a case passes when it meets the numerics contract of ``kphi3_bench.parity``: under 1e-2 and
   no worse than 2x the torch backend's error + 1e-4, except the IO block's ``dx`` on Triton,
   which meets its rounding bound instead); then the logits of the op-level (``kphi3-triton``)
   and fused (``kphi3-fused``) models in bf16 and fp16 against the float64 model (the model
   benchmark's check: no worse than 2x the torch backend's error).
5. ``timing``: ``timing-<device>-<date>.json`` / ``.txt``, the released shapes at M = 16 and 8192,
   fwd / bwd / fwd+bwd, providers triton, reference and nn.Linear, bf16.
6. ``model train``: ``model-train-<device>-<date>.json``, the training step (forward, backward,
   AdamW) of dense Phi-3, KPhi-3 on the torch backend, on the op-level kernels and fused, bf16.
7. ``ledger``: ``ledger-vs-measured.json``, every timed row of ``timing`` beside the launch
   ledger's prediction with this GPU's measured ceilings (and with the H200 figures):
   measured / predicted, the run that calibrates the cost model.
8. ``sanitizer``: ``compute-sanitizer --tool racecheck`` and ``--tool memcheck`` over one small
   launch of every kernel (``kphi3_bench.kernel_smoke``): ``sanitizer.json``,
   ``sanitizer-racecheck.txt``, ``sanitizer-memcheck.txt``. Skipped, with the reason recorded,
   where ``compute-sanitizer`` is neither on PATH nor in ``$CUDA_HOME/bin`` or
   ``/usr/local/cuda/bin``.
9. ``sweep``: the benchmark sweep (``kphi3_bench.run``'s machinery) at M in {16, 2048, 8192} with
   all five providers (torch.compile included): ``<device>-<date>.json`` (ready for
   benchmarks/results/), its table and plots.
10. ``variants``: ``variants.json``, the IO block's two forward designs (``split``, ``fused``)
    timed in one run next to nn.Linear, the reference and ``torch.compile`` of the reference;
    and the MLP tail's three designs (op-level, the two layout operators, the fused decoder's
    one operator), a training step each, at down_proj's shape.
11. ``compile report``: ``compile-report.json``, registers, spills, shared memory and load kinds
    of every launch at the released shapes in bf16/fp16 for this GPU's architecture.
12. ``autotune``: ``autotune-<device>-<date>.json`` and ``autotune.json``, the Triton rows of
    ``timing`` again with full autotuning, each beside its first-choice time.
13. Optionally (``--model``) ``model``: the model-level benchmark, ``model-<device>-<date>.json``.

The exit status is 0 when every step that ran passed (steps skipped for time do not fail a run).

``--dry-run`` runs nothing and touches no GPU: it records the launches of each step (as the
compile report does), counts the distinct kernel compiles (kernel, constexpr specialization,
config) each needs beyond the earlier steps', estimates its GPU time, prints both, and writes
``plan-<step>.json`` for each step that would fit in ``--budget-s`` (on a clock advanced by the
estimates), with the same summary files. ``--rehearse`` runs the steps' logic on the CPU with the
torch backend standing in for Triton, on tiny shapes, without pytest or the sanitizer: it checks
the script, not the GPU.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, FrozenSet, List, Optional, Sequence

import torch

import kphi3_kernels
from kphi3_kernels import reference

from . import env, parity, providers, report, roofline, shapes
from .gpu_steps import (DEFAULT_BUDGET_S, Plan, Runner, SkipStep, Step, format_summary,
                        write_json, write_text)
from .shapes import Shape
from .run import sweep_meta
from .sweep import SweepConfig, run_sweep

CORE_M = (16, 8192)              # the timing step: a decode-size and a training-size token count
CORE_PROVIDERS = ("triton", "reference", "nn.Linear")  # the providers the launch ledger models
TIMING_M = (16, 2048, 8192)      # the full sweep
VARIANT_M = (2048, 8192)
PARITY_M = (1, 37, 2048)  # a decode row, an odd count (masked tiles), a training-size count
HALF_DTYPES = (torch.bfloat16, torch.float16)
MODEL_VARIANTS = ("phi3-dense", "kphi3-torch", "kphi3-triton", "kphi3-fused")
PARITY_MODELS = ("kphi3-triton", "kphi3-fused")
FIRST_CHOICE_ENV = "KPHI3_FIRST_CHOICE"
STEP_NAMES = ("env", "ceilings", "pytest -m gpu", "parity", "timing", "model train", "ledger",
              "sanitizer", "sweep", "variants", "compile report", "autotune", "model")

# Dry run and rehearsal: tiny grouped shapes (in, out, min) with G = 4 and G = 2, one with in < out.
DRY_SHAPES = [Shape("tiny-up", "tiny", "up", 64, 128, 16), Shape("tiny-down", "tiny", "down", 128, 64, 32)]
DRY_M = (1, 7)

# ----------------------------------------------------------------------------------------------
# What a step costs on the GPU machine besides its kernel compiles (gpu_steps.COMPILE_S_PER_KERNEL).
# Estimates, each with where it comes from; the summary shows every step's estimate beside the
# seconds it took, so a GPU run corrects them.
# ----------------------------------------------------------------------------------------------
# One timed (provider, shape, M, mode) on CUDA: triton.testing.do_bench's 25 ms warm-up and 100 ms
# of calls (benchmarks/timing.py), its 5-call first estimate, the L2 flush before every call
# and the Python around it.
DO_BENCH_S = 0.2
# One (shape, M, mode) row of the sweep besides do_bench: up to 64 rotated input sets built, one
# warm-up call per set, the float64 parity check and the peak-memory call of each provider.
ROW_OVERHEAD_S = 0.6
# Unstable rows are timed again (gpu_check allows one repeat, with twice the calls).
REPEAT_FACTOR = 1.5
# Warm-up calls per provider and row whose ledger-predicted kernel time is added to the run time.
WARMUP_CALLS = 64
# A Python process that imports torch, the kernels and initializes CUDA (pytest, the sanitized
# launches, the compile report run as subprocesses).
PROCESS_START_S = 15.0
# pytest collects every test module (torch, transformers, the model) before it selects -m gpu:
# 6.4 s for 2909 tests on a 2-core CPU with warm imports (2026-12-07), more when cold.
PYTEST_COLLECT_S = 15.0
# The gpu-marked tests (75 of 2909 on 2026-12-07, `pytest tests -m gpu --collect-only`), small
# shapes, each a few launches besides its compiles.
PYTEST_PER_TEST_S = 0.5
PYTEST_GPU_TESTS = 75
# One parity case (op, dtype, shape, M): float64 reference, candidate and torch backend, forward
# and backward, on the GPU.
PARITY_CASE_S = 0.1
# Building a model at the CUDA sizes of the model benchmark (2 layers, vocab 32064) on the GPU and
# its parity forward, or its AdamW set-up; transformers is imported once.
MODEL_BUILD_S = 4.0
TRANSFORMERS_IMPORT_S = 5.0
# compute-sanitizer: its start (instrumenting the CUDA libraries torch loads) and one launch under
# racecheck or memcheck (every load and store instrumented: a tiny launch takes about a second).
SANITIZER_START_S = 30.0
SANITIZED_LAUNCH_S = 1.0
# torch.compile(reference.gpc_io, dynamic=True) in the sweep: one graph per grad mode (forward
# under no_grad, forward + backward), Inductor on one compile thread (providers._configure_compile),
# about 30 s a graph with its Triton kernels; and of the reference forward alone for the variants.
TORCH_COMPILE_S = 90.0
VARIANTS_COMPILE_S = 30.0
# The autotuner times every config of a launch with do_bench (25 ms warm-up + 100 ms).
AUTOTUNE_CONFIG_S = 0.15
# The compile report compiles into its own fresh cache, in min(8, CPUs) processes: 3.6 core-seconds
# a kernel (its 2026-12-07 run: 850 kernels in 1550 s on 2 cores), on a GPU host of 16 CPUs.
COMPILE_REPORT_CORE_S = 3.6
GPU_HOST_CPUS = 16
# Fixed costs of the cheap steps.
ENV_S, CEILINGS_S, LEDGER_S = 1.0, 5.0, 5.0
# The full model benchmark (--model): training and generate (128 tokens) of four variants.
MODEL_BENCH_FIXED_S = 90.0

# The launchers each step's Triton path calls (compile_report.OPS names).
IO_OPS = ("gpc_io_fwd", "gpc_io_bwd", "interleave_fwd")
PARITY_OPS = ("grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd",
              "gpc_block_fwd", "gpc_block_fwd(no weight2)", "gpc_block_bwd",
              "gpc_block_bwd(no weight2)", "interleave_fwd")


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




# ----------------------------------------------------------------------------------------------
# Planning: compile keys (as the compile report specializes launches) and predicted run times
# ----------------------------------------------------------------------------------------------


class Planner:
    """Each step's distinct kernel compiles and predicted seconds, without a GPU.

    A compile is one (kernel, constexpr specialization, config) for ``arch``: the launches the
    step's Triton path makes are recorded (``compile_report.record_launches``, nothing runs) and
    specialized like the runtime does (``compile_report.specialize``), the key of each is kept.
    """

    def __init__(self, arch: int = 90):
        self.arch = arch
        self.unavailable: Optional[str] = None  # why launches cannot be recorded here
        self._cache: Dict[tuple, tuple] = {}

    def keys(self, shapes_: Sequence[Shape], dtypes: Sequence[str], ms: Sequence[int],
             ops: Optional[Sequence[str]], first_choice: bool = True,
             io_forward: Optional[str] = None) -> tuple:
        """(frozenset of compile keys, launches recorded, configs counted)."""
        import contextlib

        from . import compile_report

        if ops is not None:
            ops = [o for o in ops if o in compile_report.OPS]
        keys, launches, configs = set(), 0, 0
        for shape in shapes_:
            for dtype in dtypes:
                for m in ms:
                    ck = (shape, dtype, m, tuple(ops or ()), first_choice, io_forward)
                    if ck not in self._cache:
                        try:
                            if io_forward is None:
                                ctx = contextlib.nullcontext()
                            else:
                                from .variants import io_forward as io_forward_ctx
                                ctx = io_forward_ctx(io_forward)
                            with ctx:
                                recs = compile_report.record_launches(shape, m, dtype, ops)
                            got, n_configs = set(), 0
                            for rec in recs:
                                chosen = list(rec.launch.configs)[: 1 if first_choice else None]
                                n_configs += len(chosen)
                                for config in chosen:
                                    got.add(compile_report.specialize(rec.launch, config,
                                                                      self.arch)["key"])
                            self._cache[ck] = (frozenset(got), len(recs), n_configs)
                        except compile_report.InterpreterError as err:
                            self.unavailable = str(err).split(".")[0]
                            self._cache[ck] = (frozenset(), 0, 0)
                    k, n, c = self._cache[ck]
                    keys |= k
                    launches += n
                    configs += c
        return frozenset(keys), launches, configs


def _ledger_us(shapes_: Sequence[Shape], ms: Sequence[int]) -> Dict[tuple, Dict[str, float]]:
    """(shape name, M, mode) -> the ledger's predicted us per path (bf16, H200 ceilings);
    ``fwd+bwd`` is the sum of the two."""
    from . import ledger

    model = ledger.h200_model()
    out = {}
    for row in ledger.build_ledger(list(shapes_), list(ms), ["fwd", "bwd"], ["bf16"], ["gpc_io"]):
        out[(row.shape.name, row.m, row.mode)] = {k: v for k, v in row.times(model).items()
                                                  if v is not None}
    for (name, m, mode), t in list(out.items()):
        if mode == "fwd" and (name, m, "bwd") in out:
            bwd = out[(name, m, "bwd")]
            out[(name, m, "fwd+bwd")] = {k: t[k] + bwd[k] for k in t if k in bwd}
    return out


# The ledger's path for each provider; torch and torch.compile run the reference's data flow.
PROVIDER_PATH = {"triton": "triton", "reference": "reference", "nn.Linear": "dense",
                 "torch": "reference", "torch.compile": "reference"}


def timing_seconds(shapes_: Sequence[Shape], ms: Sequence[int], provider_names: Sequence[str]
                   ) -> tuple:
    """(seconds, detail) of timing ``provider_names`` over shapes x M x the three modes: per
    measurement do_bench's fixed window or five predicted calls, whichever is longer, plus the
    warm-up calls at the ledger's predicted time, plus each row's overhead; times the repeats."""
    note = ""
    try:
        predicted = _ledger_us(shapes_, ms)
    except Exception as err:  # the ledger cannot count a launch: do_bench's window still holds
        predicted, note = {}, f"no ledger prediction ({type(err).__name__}: {err})"[:300]
    seconds, measurements, kernel_s = 0.0, 0, 0.0
    rows = 0
    for shape in shapes_:
        for m in ms:
            for mode in shapes.MODES:
                rows += 1
                for name in provider_names:
                    t = predicted.get((shape.name, m, mode), {}).get(PROVIDER_PATH.get(name, ""),
                                                                      0.0) * 1e-6
                    measurements += 1
                    kernel_s += WARMUP_CALLS * t
                    seconds += max(DO_BENCH_S, 5 * t) + WARMUP_CALLS * t
    seconds = (seconds + rows * ROW_OVERHEAD_S) * REPEAT_FACTOR
    detail = {"rows": rows, "measurements": measurements,
              "warmup_kernel_s_from_ledger": round(kernel_s, 3),
              "per_measurement_s": DO_BENCH_S, "per_row_s": ROW_OVERHEAD_S,
              "repeat_factor": REPEAT_FACTOR}
    if note:
        detail["ledger_note"] = note
    return seconds, detail


def model_train_seconds(sizes, variants: Sequence[str]) -> tuple:
    """(seconds, detail): each variant's warm-up, timed and peak-memory calls of the training
    step at the model ledger's predicted time per layer (bf16, H200) x layers, plus embedding and
    lm_head."""
    from . import model_ledger

    tokens = sizes.batch * sizes.seq
    try:
        data = model_ledger.build([sizes.family], tokens=tokens, batch=sizes.batch,
                                  decode_batches=(1,))
    except Exception as err:  # the ledger cannot count a launch: builds and compiles still hold
        return 0.0, {"tokens_per_step": tokens, "ledger_note": (
            f"no model ledger prediction ({type(err).__name__}: {err})")[:300]}
    paths = data["train"][0]["paths"]
    outside = sum(data["outside_layer"][0][k]["time_us"] for k in ("embedding", "lm_head"))
    path_of = {"phi3-dense": "dense", "kphi3-torch": "reference", "kphi3-triton": "triton",
               "kphi3-fused": "fused"}
    calls = 2 + sizes.steps + 1
    per_step = {v: (paths[path_of[v]]["time_us"] * sizes.layers + outside) * 1e-6
                for v in variants}
    seconds = sum(calls * s for s in per_step.values())
    return seconds, {"tokens_per_step": tokens, "calls_per_variant": calls,
                     "predicted_step_ms": {v: round(s * 1e3, 2) for v, s in per_step.items()}}


def find_compute_sanitizer() -> Optional[str]:
    """``compute-sanitizer`` on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin; None if absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            path = os.path.join(root, "bin", "compute-sanitizer")
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return None


def model_sizes(cuda: bool):
    """The model benchmark's default sizes on CUDA (quick ones on a CPU rehearsal)."""
    from . import cli
    from .model_bench import ModelSizes

    column = 1 if cuda else 0
    chosen = {k: v[column] for k, v in cli.MODEL_DEFAULT_SIZES.items()}
    return ModelSizes(family="kphi3", gen_batch=1, **chosen)


# ----------------------------------------------------------------------------------------------
# What the steps run
# ----------------------------------------------------------------------------------------------


def run_pytest_gpu(out_dir: str, rehearse: bool, timeout_s: float) -> dict:
    xml = os.path.join(out_dir, "pytest-gpu.xml")
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    if rehearse:
        return {"ok": True, "status": "skipped", "reason": "rehearsal: pytest is not run on a CPU",
                "command": " ".join(cmd)}
    child_env = dict(os.environ, **{FIRST_CHOICE_ENV: "1"})
    timeout_s = max(1, int(timeout_s))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env=child_env)
    except subprocess.TimeoutExpired as err:
        text = err.stdout or ""
        if isinstance(text, bytes):  # TimeoutExpired keeps the raw bytes even with text=True
            text = text.decode(errors="replace")
        write_text(os.path.join(out_dir, "pytest-gpu.txt"), text + f"\nTIMED OUT after {timeout_s} s\n")
        return {"ok": False, "error": f"timed out after {timeout_s} s", "command": " ".join(cmd)}
    write_text(os.path.join(out_dir, "pytest-gpu.txt"), proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    # 5: nothing was collected (no test carries the gpu marker): not a failure of the kernels.
    return {"ok": proc.returncode in (0, 5), "returncode": proc.returncode, "last_line": tail,
            "command": " ".join(cmd)}


def measure_ceilings(out_dir: str, device) -> tuple:
    """This device's bf16 matmul TFLOP/s and copy GB/s (``ceilings.json``); (result, Roofline)."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n, nbytes, repeats = (8192, 1 << 30, 5) if cuda else (512, 1 << 24, 2)
    tflops = roofline.measure_matmul_tflops(device, dtype, n=n, repeats=repeats)
    gbps = roofline.measure_copy_gbps(device, nbytes=nbytes, repeats=repeats)
    what_t = f"measured by gpu_check: {shapes.dtype_name(dtype)} {n}x{n}x{n} matmul, best of {repeats}"
    what_g = f"measured by gpu_check: {nbytes >> 20} MiB device copy (read + write), best of {repeats}"
    roof = roofline.Roofline(tflops, gbps, what_t, what_g)
    result = {"ok": tflops > 0 and gbps > 0, "device_name": env.device_name(device),
              "tflops": float(f"{tflops:.4g}"), "gbps": float(f"{gbps:.4g}"), "dtype": shapes.dtype_name(dtype),
              "matmul_n": n, "copy_bytes": nbytes, "repeats": repeats,
              "h200_reference": {"tflops": roofline.H200_BF16_TFLOPS, "gbps": roofline.H200_COPY_GBPS,
                                 "source": roofline.H200_SOURCE}}
    write_json(os.path.join(out_dir, "ceilings.json"), result)
    print(f"ceilings: {tflops:.0f} TFLOP/s ({result['dtype']} matmul), {gbps:.0f} GB/s (copy)")
    return result, roof


def run_timing(out_dir: str, device, dtype, shapes_, Ms, provider_names, quick_budget: bool,
               stem: str, roof=None, plots: bool = False, max_repeats: int = 1) -> dict:
    """The sweep's machinery over ``shapes_`` x ``Ms`` x every mode; ``<stem>.json`` is rewritten
    after every row, ``<stem>.txt`` (and the plots) at the end."""
    chosen = providers.resolve_providers(provider_names)
    info = env.environment(device)
    roof = roof or roofline.roofline_for(device, dtype, quick=quick_budget)
    cfg = SweepConfig(shapes=shapes_, Ms=Ms, modes=list(shapes.MODES), providers=chosen,
                      dtype=dtype, device=device, roofline=roof,
                      env=env.row_env(info), max_repeats=max_repeats,
                      budget_s=0.05 if quick_budget else 1.0, min_reps=3 if quick_budget else 5)
    if quick_budget:  # a CPU rehearsal: the logic, not the numbers (tiny shapes need 64 sets)
        cfg.max_sets = 4
    meta = sweep_meta(cfg, info, roof, "python -m kphi3_bench.gpu_check", False)
    json_path = os.path.join(out_dir, f"{stem}.json")
    cfg.on_rows = lambda rows: report.write_json(json_path, rows, meta, complete=False)
    rows = run_sweep(cfg, progress=sys.stderr.isatty())
    report.write_json(json_path, rows, meta)
    text = report.format_report(rows, meta)
    write_text(os.path.join(out_dir, f"{stem}.txt"), text)
    print(text)
    written = []
    if plots:
        try:
            written = report.write_plots(rows, os.path.join(out_dir, f"plots-{stem}"))
        except RuntimeError as err:  # no matplotlib: the numbers are what matter
            print(f"plots skipped: {err}")
    failed = [f"{r.provider} {r.shape} M={r.M} {r.mode}: {r.status} {r.error}" for r in rows if r.failed]
    return {"ok": not failed, "json": json_path, "plots": written, "failed": failed,
            "rows": len(rows), "timed": sum(r.timed for r in rows)}


def run_ledger(out_dir: str, timing_json: Optional[str], ceilings: Optional[dict]) -> dict:
    """Every timed row of the timing step beside the launch ledger's prediction for it, with this
    GPU's measured ceilings (``rows``) and with the H200 figures (``rows_h200``)."""
    from . import ledger

    if not timing_json or not os.path.exists(timing_json):
        return {"ok": False, "error": "the timing step wrote no results"}
    rows = report.rows_from_dicts(report.load_rows(timing_json))
    h200 = ledger.h200_model()
    payload = {"model_h200": ledger.model_dict(h200, "auto")}
    if ceilings and ceilings.get("tflops") and ceilings.get("gbps"):
        # This GPU's ceilings, on its own profile (SMs, L2, shared memory) by its name.
        measured = ledger.CostModel(ceilings["tflops"], ceilings["gbps"], h200.overhead_us,
                                    ledger.profile_for(ceilings.get("device_name", "")))
        payload["model"] = dict(ledger.model_dict(measured, "auto"),
                                source="the ceilings step of this run (ceilings.json)")
        pairs = ledger.measured_over_predicted(rows, measured)
    else:
        payload["model"] = dict(payload["model_h200"], source="the H200 figures (no ceilings "
                                "were measured in this run)")
        pairs = ledger.measured_over_predicted(rows, h200)
    payload["rows"] = pairs
    payload["rows_h200"] = ledger.measured_over_predicted(rows, h200)
    report.write_payload(os.path.join(out_dir, "ledger-vs-measured.json"), payload)
    print(ledger.format_measured(pairs))
    return {"ok": True, "rows": len(pairs), "ceilings": payload["model"]["source"]}


def run_model_parity(device, dtypes, variants: Sequence[str], sizes) -> List[dict]:
    """The logits of each model variant against the float64 model (the model benchmark's check)."""
    from . import model_bench
    from .progress import Progress

    out = []
    for dtype in dtypes:
        bench = model_bench.ModelBench(sizes, dtype, device, list(variants),
                                       Progress(0, enabled=False))
        for variant in variants:
            case = {"model": variant, "dtype": shapes.dtype_name(dtype)}
            try:
                model = model_bench.build_model(variant, sizes, dtype, device)
                ok, description = bench.parity(variant, model)
                del model
                case.update(ok=bool(ok), check=description)
            except Exception as err:
                case.update(ok=False, error=f"{type(err).__name__}: {err}")
            print(f"{'ok ' if case['ok'] else 'BAD'} model {variant:13s} {case['dtype']} "
                  f"{case.get('check', case.get('error', ''))}")
            out.append(case)
        del bench
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run_model_train(out_dir: str, device, stem: str, sizes, variants: Sequence[str]) -> dict:
    """The training step (forward, backward, AdamW) of each variant: ``<stem>.json`` rewritten
    after every variant."""
    import gc

    from . import model_bench

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = os.path.join(out_dir, f"{stem}.json")
    g = torch.Generator().manual_seed(0)
    high = model_bench.MODEL_FAMILIES[sizes.family].pad_token_id
    ids = torch.randint(0, high, (sizes.batch, sizes.seq), generator=g).to(device)
    tokens = sizes.batch * sizes.seq
    rows: List[dict] = []
    meta = {"what": "training step: forward, backward (labels = inputs), AdamW step",
            "sizes": vars(sizes), "dtype": shapes.dtype_name(dtype),
            "timing": "wall clock per step (CUDA-synchronized), 2 warm-up steps, median",
            "env": env.environment(device)}
    for variant in variants:
        row = {"variant": variant, "tokens": tokens}
        if variant in ("kphi3-triton", "kphi3-fused") and device.type != "cuda":
            row["status"] = "needs a GPU"
        else:
            try:
                model = model_bench.build_model(variant, sizes, dtype, device)
                model.train()
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

                def call():
                    model(input_ids=ids, labels=ids).loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                first: list = []
                median, p20, p80 = model_bench.time_calls(call, device, warmup=2,
                                                          reps=sizes.steps, first_call=first)
                row.update(status="ok", median_ms=median, p20_ms=p20, p80_ms=p80,
                           tokens_per_s=tokens / (median * 1e-3), first_call_s=first[0])
                del model, optimizer
            except Exception as err:
                row.update(status="error", error=f"{type(err).__name__}: {err}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        dense = next((r.get("median_ms") for r in rows if r["variant"] == "phi3-dense"), None)
        for r in rows:
            if dense and r.get("median_ms"):
                r["speedup_vs_dense"] = dense / r["median_ms"]
        report.write_payload(path, {"meta": meta, "results": rows,
                                    "complete": len(rows) == len(variants)})
        print(f"model train {variant:13s} {row['status']:8s} "
              + (f"{row['median_ms']:.2f} ms/step, {row['tokens_per_s']:.0f} tokens/s"
                 if row.get("median_ms") else row.get("error", "")))
    bad = [r for r in rows if r["status"] == "error"]
    return {"ok": not bad, "json": path, "rows": len(rows), "failed": len(bad)}


def _sanitizer_summary(text: str) -> str:
    lines = [line for line in text.splitlines() if "SUMMARY" in line]
    return lines[-1].strip() if lines else ""


def run_sanitizer(out_dir: str, tool_path: str, timeout_s: float) -> dict:
    """``compute-sanitizer --tool racecheck`` and ``--tool memcheck`` over
    ``python -m kphi3_bench.kernel_smoke`` (one small launch of every kernel). The caching
    allocator is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1): every tensor is its own allocation, so
    memcheck sees an overrun past it."""
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(PYTORCH_NO_CUDA_MEMORY_CACHING="1", **{FIRST_CHOICE_ENV: "1"})
    result: dict = {"tool": tool_path, "tools": {}}
    start = time.monotonic()
    for i, tool in enumerate(("racecheck", "memcheck")):
        left = timeout_s - (time.monotonic() - start)
        share = max(1, int(left / (2 - i)))  # racecheck may use half, memcheck what is left
        cmd = [tool_path, "--tool", tool, "--error-exitcode", "3", sys.executable, "-m",
               "kphi3_bench.kernel_smoke"]
        entry = {"command": " ".join(cmd)}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=share, env=child_env)
            text = proc.stdout + proc.stderr
            entry.update(returncode=proc.returncode, ok=proc.returncode == 0,
                         summary=_sanitizer_summary(text))
        except subprocess.TimeoutExpired as err:
            text = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
            text += f"\nTIMED OUT after {share} s\n"
            entry.update(ok=False, error=f"timed out after {share} s")
        write_text(os.path.join(out_dir, f"sanitizer-{tool}.txt"), text)
        result["tools"][tool] = entry
        write_json(os.path.join(out_dir, "sanitizer.json"), result)
        print(f"compute-sanitizer {tool}: {'ok' if entry['ok'] else 'FAILED'} "
              f"{entry.get('summary') or entry.get('error', '')}")
    result["ok"] = all(e["ok"] for e in result["tools"].values())
    return result


def run_variants(out_dir: str, device, rehearse: bool, with_compile: bool) -> dict:
    from . import variants

    dtype = torch.float32 if rehearse else torch.bfloat16
    roof = roofline.roofline_for(device, dtype, quick=rehearse)
    tflops, gbps = roof.peak_tflops, roof.peak_gbps
    released = [s for s in shapes.SHAPES.values() if s.family == "kphi3"]
    if rehearse and os.environ.get("TRITON_INTERPRET") != "1":
        rows = []  # the Triton variants need a GPU or the interpreter; floors are still written
    elif rehearse:
        # The interpreter stands in for the GPU: one tiny shape, so the logic is exercised.
        rows = variants.time_variants(device, dtype, DRY_SHAPES[:1], DRY_M[-1:], tflops, gbps,
                                      with_compile=False, budget_s=0.02)
    else:
        rows = variants.time_variants(device, dtype, released, VARIANT_M, tflops, gbps,
                                      with_compile=with_compile)
    # The MLP tail's three designs (training step), at down_proj's shape.
    tail_shapes = DRY_SHAPES[1:] if rehearse else [s for s in released if s.op == "down"]
    tail = ([] if rehearse and os.environ.get("TRITON_INTERPRET") != "1" else
            variants.time_mlp_tail(device, dtype, tail_shapes, DRY_M[-1:] if rehearse else
                                   VARIANT_M, budget_s=0.02 if rehearse else 1.0))
    predicted = variants.predicted_floors(released, 8192,
                                          torch.empty((), dtype=dtype).element_size(), tflops, gbps)
    report.write_payload(os.path.join(out_dir, "variants.json"),
                         {"roofline": {"tflops": tflops, "gbps": gbps, "source": roof.describe()},
                          "rows": rows, "mlp_tail_rows": tail,
                          "predicted_floors_m8192": predicted})
    print(variants.format_rows(rows))
    bad = [r for r in rows + tail
           if r["rel_error"] is not None and not r["rel_error"] < parity.tolerance(dtype)]
    return {"ok": not bad, "rows": len(rows) + len(tail), "parity_failed": len(bad)}


def run_compile_report(out_dir: str, rehearse: bool, arch: int, timeout_s: float) -> dict:
    path = os.path.join(out_dir, "compile-report.json")
    cmd = [sys.executable, "-m", "kphi3_bench.compile_report", "--shapes", "kphi3",
           "--dtypes", "bf16" if rehearse else "bf16,fp16", "--targets", str(arch),
           "--out", path] + (["--first-choice", "--ops", "gpc_io_fwd"] if rehearse else [])
    env_ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    timeout_s = max(1, int(timeout_s))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env_)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s} s", "command": " ".join(cmd)}
    write_text(os.path.join(out_dir, "compile-report.txt"), proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])
    summary_line = next((line for line in reversed(tail) if "property violations" in line), "")
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "summary": summary_line,
            "command": " ".join(cmd)}


def compare_autotuned(out_dir: str, first_json: Optional[str], tuned_json: str) -> dict:
    """Each Triton row timed with full autotuning beside its first-choice time (``autotune.json``)."""
    first = {}
    if first_json and os.path.exists(first_json):
        first = {(r["shape"], r["M"], r["mode"]): r.get("median_ms")
                 for r in report.load_rows(first_json) if r.get("provider") == "triton"}
    rows = []
    for r in report.load_rows(tuned_json):
        if r.get("provider") != "triton":
            continue
        before = first.get((r["shape"], r["M"], r["mode"]))
        after = r.get("median_ms")
        rows.append({"shape": r["shape"], "M": r["M"], "mode": r["mode"],
                     "first_choice_ms": before, "autotuned_ms": after,
                     "autotuned_over_first_choice": (after / before if before and after else None)})
    report.write_payload(os.path.join(out_dir, "autotune.json"), {"rows": rows})
    for row in rows:
        ratio = row["autotuned_over_first_choice"]
        print(f"autotune {row['shape']:14s} M={row['M']:<5d} {row['mode']:8s} "
              f"{'' if ratio is None else f'{ratio:.2f}x the first-choice time'}")
    return {"rows": len(rows)}


def run_model(out_dir: str, device, rehearse: bool, stem: str) -> dict:
    from . import model_bench

    path = os.path.join(out_dir, f"model-{stem}.json")
    argv = ["--out", path, "--no-progress"] + (["--quick", "--device", "cpu"] if rehearse else [])
    status = model_bench.main(argv)
    return {"ok": status == 0, "returncode": status, "json": path}


# ----------------------------------------------------------------------------------------------
# The steps
# ----------------------------------------------------------------------------------------------


class GpuCheck:
    """The steps of one run, in order of value, with their planners and bodies."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry, self.rehearse = args.dry_run, args.rehearse
        self.cpu = self.dry or self.rehearse
        self.device = torch.device("cpu" if self.cpu else "cuda")
        self.candidate = "torch" if self.rehearse else "triton"
        self.released = [s for s in shapes.SHAPES.values() if s.family == "kphi3"]
        self.out = args.out_dir
        arch = 90
        if not self.cpu:
            major, _ = torch.cuda.get_device_capability()
            arch = 90 if major >= 9 else 80
        self.arch = arch
        self.planner = Planner(arch)
        self.stem = ("<device>-<date>" if self.dry
                     else env.default_results_name(self.device)[: -len(".json")])
        self.ceilings: Optional[dict] = None
        self.roof = None
        self.results: Dict[str, dict] = {}
        self.sizes = model_sizes(cuda=not self.cpu)
        self.skip = [n.strip() for n in args.skip.split(",") if n.strip()]

    # -- helpers --------------------------------------------------------------------------------
    def _plan(self, make) -> Plan:
        """A step's plan; in a rehearsal nothing is estimated (the CPU is not the GPU)."""
        if self.rehearse:
            return Plan(detail={"rehearsal": "no GPU estimate on a CPU rehearsal"})
        plan = make()
        if self.planner.unavailable:
            plan.detail["compiles_note"] = ("kernel compiles not counted: "
                                            + self.planner.unavailable)
        return plan

    def _keys(self, *a, **kw) -> FrozenSet[str]:
        return self.planner.keys(*a, **kw)[0]

    def _timed(self, name: str, fn):
        def body(plan: Plan, remaining: float) -> dict:
            result = fn(plan, remaining)
            self.results[name] = result
            return result
        return body

    # -- planners -------------------------------------------------------------------------------
    def plan_pytest(self) -> Plan:
        keys, launches, _ = self.planner.keys(DRY_SHAPES, ["fp32", "bf16", "fp16"], DRY_M, None)
        return Plan(keys=keys, fixed_s=PROCESS_START_S + PYTEST_COLLECT_S
                    + PYTEST_GPU_TESTS * PYTEST_PER_TEST_S, max_s=self.args.pytest_timeout_s,
                    detail={"compiles_note": "approximate: every launcher at two tiny shapes in "
                            "fp32 / bf16 / fp16 (the tests' own shapes are not recorded)",
                            "launches_recorded": launches, "tests": PYTEST_GPU_TESTS})

    def plan_parity(self) -> Plan:
        dt = ["bf16", "fp16"]
        ops_keys, launches, _ = self.planner.keys(self.released, dt, PARITY_M, PARITY_OPS)
        model_tokens = min(self.sizes.seq, 64)
        model_keys, model_launches, _ = self.planner.keys(self.released, dt, [model_tokens], None)
        cases = 3 * len(dt) * len(self.released) * len(PARITY_M)
        builds = len(dt) * (2 + len(PARITY_MODELS))  # float64 oracle + torch backend + variants
        return Plan(keys=ops_keys | model_keys, run_s=cases * PARITY_CASE_S,
                    fixed_s=TRANSFORMERS_IMPORT_S + builds * MODEL_BUILD_S,
                    detail={"cases": cases, "model_builds": builds, "M": list(PARITY_M),
                            "model_tokens": model_tokens,
                            "launches_recorded": launches + model_launches})

    def plan_timing(self, ms, names, first_choice=True, extra_s=0.0) -> Plan:
        keys, launches, configs = self.planner.keys(self.released, ["bf16"], ms, IO_OPS,
                                                    first_choice)
        run_s, detail = timing_seconds(self.released, ms, names)
        if not first_choice:
            run_s += configs * AUTOTUNE_CONFIG_S
            detail["autotune_configs"] = configs
            detail["autotune_s_per_config"] = AUTOTUNE_CONFIG_S
        detail.update(M=list(ms), providers=list(names), launches_recorded=launches)
        if extra_s:
            detail["torch_compile_s"] = extra_s
        return Plan(keys=keys, run_s=run_s + extra_s, detail=detail)

    def plan_model_train(self) -> Plan:
        tokens = self.sizes.batch * self.sizes.seq
        keys, launches, _ = self.planner.keys(self.released, ["bf16"], [tokens], None)
        run_s, detail = model_train_seconds(self.sizes, MODEL_VARIANTS)
        detail.update(variants=list(MODEL_VARIANTS), launches_recorded=launches,
                      sizes=vars(self.sizes))
        return Plan(keys=keys, run_s=run_s,
                    fixed_s=TRANSFORMERS_IMPORT_S + len(MODEL_VARIANTS) * MODEL_BUILD_S,
                    detail=detail)

    def plan_sanitizer(self) -> Plan:
        if self.rehearse:
            raise SkipStep("needs a CUDA GPU")
        tool = find_compute_sanitizer()
        if tool is None and not self.dry:
            raise SkipStep("compute-sanitizer not found (PATH, $CUDA_HOME/bin, "
                           "/usr/local/cuda/bin)")
        from . import kernel_smoke

        try:
            n = len(kernel_smoke.smoke_launches())
        except Exception as err:  # the interpreter: nothing to record
            n, note = 0, f"{type(err).__name__}: {err}"
        else:
            note = ""
        keys = self._keys([shapes.SHAPES[kernel_smoke.SHAPE]], [kernel_smoke.DTYPE],
                          [kernel_smoke.M], None)
        detail = {"launches": n, "tools": ["racecheck", "memcheck"],
                  "compute_sanitizer_here": tool or "not found"}
        if note:
            detail["note"] = note
        return Plan(keys=keys, run_s=2 * n * SANITIZED_LAUNCH_S,
                    fixed_s=2 * (SANITIZER_START_S + PROCESS_START_S), detail=detail)

    def plan_variants(self) -> Plan:
        keys: FrozenSet[str] = frozenset()
        for design in ("split", "fused"):
            keys |= self._keys(self.released, ["bf16"], VARIANT_M, ["gpc_io_fwd", "interleave_fwd"],
                               io_forward=design)
        n_providers = 5 if not self.args.no_compile else 4
        # plus the MLP tail's three designs at down_proj's shape (a training step each)
        measurements = len(self.released) * len(VARIANT_M) * n_providers + len(VARIANT_M) * 3 * 3
        compile_s = 0.0 if self.args.no_compile else VARIANTS_COMPILE_S
        return Plan(keys=keys, run_s=measurements * DO_BENCH_S + compile_s,
                    detail={"measurements": measurements, "torch_compile_s": compile_s})

    def plan_compile_report(self) -> Plan:
        from . import compile_report

        try:
            n = len(compile_report.plan(["kphi3"], ["bf16", "fp16"], [self.arch], 8192, False))
        except compile_report.InterpreterError as err:
            n, note = 0, str(err).split(".")[0]
        else:
            note = ""
        jobs = min(8, GPU_HOST_CPUS if self.dry else (os.cpu_count() or 1))
        detail = {"kernels": n, "processes": jobs,
                  "core_s_per_kernel": COMPILE_REPORT_CORE_S,
                  "note": "compiled into the report's own cache, not the run's" + (
                      f"; {note}" if note else "")}
        return Plan(fixed_s=PROCESS_START_S + n * COMPILE_REPORT_CORE_S / jobs,
                    own_compiles=n, max_s=self.args.compile_timeout_s, detail=detail)

    def plan_model(self) -> Plan:
        keys = self._keys(self.released, ["bf16"],
                          [self.sizes.batch * self.sizes.seq, self.sizes.prompt, 1], None)
        return Plan(keys=keys, fixed_s=MODEL_BENCH_FIXED_S,
                    detail={"what": "kphi3_bench.model_bench at its CUDA sizes"})

    # -- the step list --------------------------------------------------------------------------
    def steps(self) -> List[Step]:
        a, out, dev, stem = self.args, self.out, self.device, self.stem
        rehearse = self.rehearse
        fp = torch.float32 if rehearse else torch.bfloat16
        core_shapes = DRY_SHAPES if rehearse else self.released
        core_m = DRY_M if rehearse else CORE_M
        core_names = ["torch", "reference", "nn.Linear"] if rehearse else list(CORE_PROVIDERS)
        full_names = ["triton", "torch", "reference", "torch.compile", "nn.Linear"]
        if a.no_compile:
            full_names.remove("torch.compile")
        if rehearse:
            full_names.remove("triton")  # on CPU it would only say "needs a GPU"

        def env_body(plan, left):
            info = env.environment(dev)
            write_json(os.path.join(out, "env.json"), info)
            return {"ok": True, **info}

        def ceilings_body(plan, left):
            self.ceilings, self.roof = measure_ceilings(out, dev)
            return dict(self.ceilings)

        def parity_body(plan, left):
            cases = parity_cases(dev, self.candidate, DRY_SHAPES if rehearse else self.released,
                                 DRY_M if rehearse else PARITY_M)
            limits = {"abs": parity.HALF_TOL, "ratio_to_torch": parity.HALF_RATIO,
                      "slack": parity.HALF_SLACK}
            path = os.path.join(out, "parity.json")
            report.write_payload(path, {"limits": limits, "cases": cases, "models": []})
            for c in cases:
                flag = "ok " if c["ok"] else "BAD"
                print(f"{flag} {c['op']:14s} {c['dtype']} {c['shape']:14s} M={c['M']:<5d} "
                      f"{self.candidate} {c.get('worst', float('nan')):.2e}  torch "
                      f"{c.get('torch_worst', float('nan')):.2e} {c.get('error', '')}")
            models: List[dict] = []
            note = "rehearsal: the Triton models need a GPU" if rehearse else ""
            if not rehearse:
                models = run_model_parity(dev, HALF_DTYPES, PARITY_MODELS, self.sizes)
                report.write_payload(path, {"limits": limits, "cases": cases, "models": models})
            bad = [c for c in cases + models if not c["ok"]]
            return {"ok": not bad, "cases": len(cases), "models": len(models),
                    "failed": len(bad), **({"note": note} if note else {})}

        def timing_body(plan, left):
            return run_timing(out, dev, fp, core_shapes, core_m, core_names, quick_budget=rehearse,
                              stem=f"timing-{stem}", roof=self.roof,
                              max_repeats=0 if rehearse else 1)

        def model_train_body(plan, left):
            sizes = self.sizes
            variants = MODEL_VARIANTS
            return run_model_train(out, dev, f"model-train-{stem}", sizes, variants)

        def ledger_body(plan, left):
            return run_ledger(out, self.results.get("timing", {}).get("json"), self.ceilings)

        def sanitizer_body(plan, left):
            return run_sanitizer(out, find_compute_sanitizer(), left)

        def sweep_body(plan, left):
            return run_timing(out, dev, fp, core_shapes, DRY_M if rehearse else TIMING_M,
                              full_names, quick_budget=rehearse, stem=stem, roof=self.roof,
                              plots=True, max_repeats=0 if rehearse else 1)

        def variants_body(plan, left):
            return run_variants(out, dev, rehearse, not a.no_compile)

        def compile_body(plan, left):
            return run_compile_report(out, rehearse, self.arch, min(a.compile_timeout_s, left))

        def autotune_body(plan, left):
            from kphi3_kernels.ops import launch

            previous = launch.FIRST_CHOICE
            launch.FIRST_CHOICE = False
            try:
                result = run_timing(out, dev, fp, core_shapes, core_m, ["triton"],
                                    quick_budget=False, stem=f"autotune-{stem}", roof=self.roof)
            finally:
                launch.FIRST_CHOICE = previous
            result.update(compare_autotuned(out, self.results.get("timing", {}).get("json"),
                                            result["json"]))
            return result

        def model_body(plan, left):
            return run_model(out, dev, rehearse, stem)

        def gpu_only(make):
            def plan():
                if rehearse:
                    raise SkipStep("needs a CUDA GPU")
                return self._plan(make)
            return plan

        P = self._plan
        steps = [
            Step("env", "device, versions, date", lambda: P(lambda: Plan(fixed_s=ENV_S)),
                 self._timed("env", env_body), ["env.json"]),
            Step("ceilings", "this GPU's bf16 matmul TFLOP/s and copy GB/s",
                 lambda: P(lambda: Plan(fixed_s=CEILINGS_S)),
                 self._timed("ceilings", ceilings_body), ["ceilings.json"]),
            Step("pytest -m gpu", "the GPU tests, first-choice configs",
                 lambda: P(self.plan_pytest),
                 self._timed("pytest -m gpu", lambda p, left: run_pytest_gpu(
                     out, rehearse, min(a.pytest_timeout_s, left))),
                 ["pytest-gpu.txt", "pytest-gpu.xml"]),
            Step("parity", "bf16/fp16 parity of every operator and of the op-level and fused "
                 "models against float64", lambda: P(self.plan_parity),
                 self._timed("parity", parity_body), ["parity.json"]),
            Step("timing", "released shapes at M = 16, 8192: triton, reference, nn.Linear",
                 lambda: P(lambda: self.plan_timing(CORE_M, CORE_PROVIDERS)),
                 self._timed("timing", timing_body),
                 [f"timing-{stem}.json", f"timing-{stem}.txt"]),
            Step("model train", "the training step of dense Phi-3 and KPhi-3 (torch, op-level "
                 "Triton, fused)", lambda: P(self.plan_model_train),
                 self._timed("model train", model_train_body), [f"model-train-{stem}.json"]),
            Step("ledger", "measured / predicted against the launch ledger, with the measured "
                 "ceilings", lambda: P(lambda: Plan(fixed_s=LEDGER_S)),
                 self._timed("ledger", ledger_body), ["ledger-vs-measured.json"],
                 needs=("timing",)),
            Step("sanitizer", "compute-sanitizer racecheck and memcheck over one small launch "
                 "of every kernel", gpu_only(self.plan_sanitizer),
                 self._timed("sanitizer", sanitizer_body),
                 ["sanitizer.json", "sanitizer-racecheck.txt", "sanitizer-memcheck.txt"]),
            Step("sweep", "the full sweep: M = 16, 2048, 8192, every provider",
                 lambda: P(lambda: self.plan_timing(
                     TIMING_M, full_names,
                     extra_s=0.0 if a.no_compile else TORCH_COMPILE_S)),
                 self._timed("sweep", sweep_body),
                 [f"{stem}.json", f"{stem}.txt", f"plots-{stem}/"]),
            Step("variants", "the IO block's forward designs and the MLP tail's, side by side",
                 lambda: P(self.plan_variants), self._timed("variants", variants_body),
                 ["variants.json"]),
            Step("compile report", "registers, spills, shared memory of every launch (bf16, "
                 "fp16)", lambda: P(self.plan_compile_report),
                 self._timed("compile report", compile_body),
                 ["compile-report.json", "compile-report.txt"]),
            Step("autotune", "the timing step's Triton rows with full autotuning",
                 gpu_only(lambda: self.plan_timing(CORE_M, ["triton"], first_choice=False)),
                 self._timed("autotune", autotune_body),
                 [f"autotune-{stem}.json", f"autotune-{stem}.txt", "autotune.json"]),
        ]
        if a.model:
            steps.append(Step("model", "the model-level benchmark (training and generate)",
                              lambda: P(self.plan_model), self._timed("model", model_body),
                              [f"model-{stem}.json"]))
        skip = set(self.skip)
        for step in steps:
            if step.name in skip:
                step.plan = _skipped_by_option
        return steps


def _skipped_by_option() -> Plan:
    raise SkipStep("--skip")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kphi3_bench.gpu_check",
        description="Check and time the kernels on a CUDA GPU within a time limit, the most "
                    "valuable steps first: environment, measured ceilings, the GPU tests, "
                    "half-precision parity, timings, the model's training step, measured / "
                    "predicted, compute-sanitizer; then the full sweep, the IO variants, the "
                    "compile report and full autotuning while time remains.",
        epilog="exit status: 0 when every step that ran passed (a step skipped for time is not a "
               "failure), 1 when one failed, 2 for bad arguments or no CUDA device")
    p.add_argument("--out-dir", default="gpu-check-out",
                   help="folder for every result file, created if missing (default: ./%(default)s)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, metavar="S",
                   help="time limit in seconds for the whole run: a step starts only if its "
                        "estimate fits in what is left, and one still running at the limit is "
                        "stopped (default %(default)g)")
    p.add_argument("--dry-run", action="store_true",
                   help="touch no GPU: print each step's distinct kernel compiles and estimated "
                        "GPU time, write the plan of each step that fits in --budget-s "
                        "(plan-<step>.json) and the summary, then exit")
    p.add_argument("--rehearse", action="store_true",
                   help="run the steps' logic on the CPU, torch backend instead of Triton, tiny "
                        "shapes, no pytest, no sanitizer (checks the script, not the GPU)")
    p.add_argument("--no-compile", action="store_true",
                   help="leave torch.compile out of the sweep and the variants")
    p.add_argument("--model", action="store_true",
                   help="add the model-level benchmark as a last step")
    p.add_argument("--skip", metavar="LIST", default="",
                   help="comma-separated steps not to run (names as in the summary: "
                        + ", ".join(STEP_NAMES) + ")")
    p.add_argument("--pytest-timeout-s", type=int, default=240,
                   help="stop `pytest -m gpu` after this long, or sooner at the time limit "
                        "(default %(default)s)")
    p.add_argument("--compile-timeout-s", type=int, default=240,
                   help="stop the compile report after this long, or sooner at the time limit "
                        "(default %(default)s)")
    return p


def _dry_run_elsewhere(argv: Sequence[str], budget_s: float) -> int:
    """The dry run records launches, which needs the real @triton.jit kernels: under
    TRITON_INTERPRET=1 (the test suite's CPU setting) it runs again in a process without it."""
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "kphi3_bench.gpu_check", *argv], env=child_env,
                          timeout=max(budget_s, 1) + 30)
    return proc.returncode


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dry_run and args.rehearse:
        parser.error("--dry-run and --rehearse exclude each other")
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s:g}")
    unknown = [n.strip() for n in args.skip.split(",") if n.strip() and n.strip() not in STEP_NAMES]
    if unknown:
        parser.error(f"--skip: unknown step {unknown[0]!r}; steps: {', '.join(STEP_NAMES)}")
    if args.dry_run and os.environ.get("TRITON_INTERPRET") == "1":
        return _dry_run_elsewhere(argv, args.budget_s)
    if not (args.dry_run or args.rehearse) and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; --dry-run plans the run without one, --rehearse "
              "exercises the steps on a CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    for name in os.listdir(args.out_dir):  # plans of an earlier dry run into the same folder
        if name.startswith("plan-") and name.endswith(".json"):
            os.remove(os.path.join(args.out_dir, name))
    check = GpuCheck(args)
    if not check.cpu:
        from kphi3_kernels.ops import launch

        launch.FIRST_CHOICE = True  # until the autotune step
    header = {"rehearsal": args.rehearse, "out_dir": os.path.abspath(args.out_dir),
              "command": "python -m kphi3_bench.gpu_check " + " ".join(argv),
              "device": "none (dry run)" if args.dry_run else env.device_name(check.device),
              "arch": check.arch}
    runner = Runner(args.out_dir, args.budget_s, dry_run=args.dry_run, hard_stop=not check.cpu,
                    header=header)
    summary = runner.run(check.steps())
    print()
    print(format_summary(summary))
    where = os.path.join(args.out_dir, "summary.json")
    if args.dry_run:
        print(f"gpu_check --dry-run: plans in {args.out_dir}; estimated GPU time of every step "
              f"in order: {summary['estimated_all_s']:.0f} s")
    else:
        print(f"gpu_check: {'every step that ran passed' if summary['ok'] else 'FAILED'}; see "
              f"{where}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
