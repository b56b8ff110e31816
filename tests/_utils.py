"""Shared test helpers: the float64 oracle, the numerics contract, random operands, spies.

Every parity check in the suite goes through ``check_op``: it runs one op on one backend, forward
and backward with a random upstream gradient, and compares the output and every gradient with
``reference.py`` evaluated in float64 on the same (already rounded) values, by relative Frobenius
error. The tolerances are the numerics contract of docs/numerics.md and are never loosened per test.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

import kphi3_kernels
from kphi3_kernels import (GroupedLinear, GroupedLinearFast, GroupedPointwiseConvolutionBlockIO,
                           InterleaveChannelsFast)
from kphi3_kernels import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The numerics contract (docs/numerics.md), the one source of the suite's tolerances: fp32 far
# under 1e-5; fp16 / bf16 within 1e-2 and no worse than the plain PyTorch path in the same dtype
# (2x its error plus a small absolute slack for the fp32 accumulation), or, for a result that
# rounds an intermediate by design, within its rounding bound instead of the ratio.
# benchmarks/parity.py states the same numbers (tests/test_contract_checks.py holds them equal).
FP32_TOL = 1e-5
HALF_TOL = 1e-2
HALF_RATIO = 2.0
HALF_SLACK = 1e-4

def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (absolute error when ``ref`` is all zeros).

    NaN anywhere in ``out`` (e.g. a poisoned element a kernel forgot to write) gives NaN, which
    fails every ``<`` comparison.
    """
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    num = torch.linalg.vector_norm(out64 - ref64).item()
    den = torch.linalg.vector_norm(ref64).item()
    return num / den if den > 0 else num


def tol_for(dtype: torch.dtype) -> float:
    return FP32_TOL if dtype == torch.float32 else HALF_TOL


# --------------------------------------------------------------------------------------------
# The contract as a verdict: every parity check in the suite ends here
# --------------------------------------------------------------------------------------------


def ratio_limit(baseline_err: float) -> float:
    """The most a half-precision result may err, given the plain PyTorch path's error."""
    return HALF_RATIO * baseline_err + HALF_SLACK


def contract_failure(err: float, dtype: torch.dtype, baseline_err: Optional[float] = None,
                     rounding_bound: Optional[float] = None) -> Optional[str]:
    """Why ``err`` breaks the contract for a result computed in ``dtype``; None if it meets it.

    fp32: ``err < FP32_TOL``. fp16 / bf16: ``err < HALF_TOL`` and ``err <= rounding_bound`` for
    a result that rounds an intermediate by design, else ``err <= ratio_limit(baseline_err)``.
    NaN fails every comparison.
    """
    if dtype == torch.float32:
        return None if err < FP32_TOL else f"err {err:.3g} not under {FP32_TOL:g}"
    if not err < HALF_TOL:
        return f"err {err:.3g} not under {HALF_TOL:g}"
    if rounding_bound is not None:
        limit, what = rounding_bound, "its rounding bound"
    elif baseline_err is None:
        raise ValueError("a half-precision result needs the plain PyTorch path's error")
    else:
        limit = ratio_limit(baseline_err)
        what = f"{HALF_RATIO:g}x the plain path's {baseline_err:.3g}"
    return None if err <= limit else f"err {err:.3g} over {what} ({limit:.3g})"


def contract_failures(errs: Dict[str, float], dtypes, baseline: Optional[Dict[str, float]] = None,
                      rounding: Optional[Dict[str, float]] = None) -> Dict[str, str]:
    """``contract_failure`` of every named error; ``dtypes`` one dtype or one per name."""
    baseline, rounding = baseline or {}, rounding or {}
    failures = {}
    for n, err in errs.items():
        dtype = dtypes[n] if isinstance(dtypes, dict) else dtypes
        why = contract_failure(err, dtype, baseline.get(n), rounding.get(n))
        if why is not None:
            failures[n] = why
    return failures


def assert_meets_contract(what: str, errs: Dict[str, float], dtypes,
                          baseline: Optional[Dict[str, float]] = None,
                          rounding: Optional[Dict[str, float]] = None) -> None:
    failures = contract_failures(errs, dtypes, baseline, rounding)
    assert not failures, f"{what}: {failures} (errors: {errs}, plain path: {baseline})"


def fused_model_failures(fused: Dict[str, float], unfused: Dict[str, float],
                         plain: Dict[str, float], dtype: torch.dtype) -> Dict[str, str]:
    """Each of the fused and the op-level model's errors under the contract, against the plain
    PyTorch path (the model on the torch backend, same dtype); the fused model's also against
    the op-level model it replaces."""
    checks = {"fused": (fused, plain), "op-level": (unfused, plain),
              "fused vs op-level": (fused, unfused)}
    return {f"{label} {n}": why for label, (errs, base) in checks.items()
            for n, why in contract_failures(errs, dtype, base).items()}


# --------------------------------------------------------------------------------------------
# Random operands
# --------------------------------------------------------------------------------------------


def make_input(lead: Sequence[int], channels: int, dtype: torch.dtype, layout: str = "contig",
               device: str = DEVICE) -> torch.Tensor:
    """A leaf-backed input ``[*lead, channels]`` with the requested memory layout.

    ``contig``: plain. ``sliced``: ``base[..., ::2]`` (column stride 2, row stride 2C > C).
    ``transposed``: the first two dims swapped in memory (for 2-D: column-major, row stride 1).
    ``expanded``: one row broadcast over every leading dim (row stride 0).
    The returned tensor is a non-leaf view of a leaf that requires grad, so gradients with
    respect to it can be taken with ``torch.autograd.grad``.
    """
    lead = tuple(lead)
    if layout == "contig":
        base = torch.randn(*lead, channels, device=device).to(dtype)
        base.requires_grad_(True)
        return base.view(base.shape)
    if layout == "sliced":
        base = torch.randn(*lead, 2 * channels, device=device).to(dtype).requires_grad_(True)
        return base[..., ::2]
    if layout == "transposed":
        if len(lead) == 1:
            base = torch.randn(channels, lead[0], device=device).to(dtype).requires_grad_(True)
            return base.t()
        swapped = (lead[1], lead[0], *lead[2:], channels)
        base = torch.randn(*swapped, device=device).to(dtype).requires_grad_(True)
        return base.transpose(0, 1)
    if layout == "expanded":
        base = torch.randn(*(1 for _ in lead), channels, device=device).to(dtype)
        return base.requires_grad_(True).expand(*lead, channels)
    raise ValueError(layout)


def make_weight(G: int, k: int, n: int, dtype: torch.dtype, transposed: bool = False,
                device: str = DEVICE) -> torch.Tensor:
    """A ``[G, k, n]`` weight with entries of size ~1/sqrt(k) (outputs stay O(1) in fp16)."""
    scale = 1.0 / math.sqrt(k)
    if transposed:
        base = (torch.randn(G, n, k, device=device) * scale).to(dtype)
        return base.transpose(1, 2).requires_grad_(True)
    return (torch.randn(G, k, n, device=device) * scale).to(dtype).requires_grad_(True)


def make_bias(G: int, n: int, dtype: torch.dtype, device: str = DEVICE) -> torch.Tensor:
    return (torch.randn(G, n, device=device) * 0.5).to(dtype).requires_grad_(True)


@dataclass
class Case:
    """One parity case: op geometry, leading shape, memory layout, bias, weight layout."""

    G: int
    s: int  # input channels per group (for interleave: the channel count C)
    og: int  # output channels per group (for interleave: the step)
    lead: Tuple[int, ...]
    layout: str = "contig"
    bias: bool = True
    second: bool = True  # gpc_block only: pass weight2
    weight_t: bool = False  # weights as transposed (non-contiguous) views
    _interleave: bool = False  # an interleave case: s is the channel count C, og the step

    @property
    def id(self) -> str:
        if self._interleave:
            return f"C{self.s}-step{self.og}-M" + "x".join(map(str, self.lead)) + f"-{self.layout}"
        parts = [f"G{self.G}", f"s{self.s}", f"og{self.og}", "M" + "x".join(map(str, self.lead)),
                 self.layout, "bias" if self.bias else "nobias"]
        if not self.second:
            parts.append("now2")
        if self.weight_t:
            parts.append("wT")
        return "-".join(parts)


@dataclass
class Operands:
    x: torch.Tensor
    params: Dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    step: int = 0  # interleave only

    def grad_targets(self) -> List[Tuple[str, torch.Tensor]]:
        out = [("x", self.x)]
        out += [(k, v) for k, v in self.params.items() if v is not None]
        return out


def interleave_case(C: int, step: int, lead: Tuple[int, ...], layout: str = "contig") -> Case:
    return Case(1, C, step, lead, layout, bias=False, _interleave=True)


def make_operands(op: str, case: Case, dtype: torch.dtype, device: str = DEVICE) -> Operands:
    if op == "interleave":
        x = make_input(case.lead, case.s, dtype, case.layout, device)
        return Operands(x, {}, step=case.og)
    G, s, og = case.G, case.s, case.og
    x = make_input(case.lead, G * s, dtype, case.layout, device)
    params: Dict[str, Optional[torch.Tensor]] = {}
    params["weight1"] = make_weight(G, s, og, dtype, case.weight_t, device)
    if op == "gpc_io":
        params["weight2"] = make_weight(G, s, og, dtype, case.weight_t, device)
    elif op == "gpc_block":
        params["weight2"] = make_weight(G, og, og, dtype, case.weight_t, device) if case.second else None
    params["bias1"] = make_bias(G, og, dtype, device) if case.bias else None
    if op in ("gpc_io", "gpc_block"):
        params["bias2"] = (make_bias(G, og, dtype, device)
                           if case.bias and params.get("weight2") is not None else None)
    return Operands(x, params, step=0)


# --------------------------------------------------------------------------------------------
# Running an op: the package (functional API), and the reference
# --------------------------------------------------------------------------------------------


def call_package(op: str, ops: Operands, x: torch.Tensor, params: Dict, backend: Optional[str]):
    p = params
    if op == "grouped_linear":
        return kphi3_kernels.grouped_linear(x, p["weight1"], p["bias1"], backend=backend)
    if op == "gpc_io":
        return kphi3_kernels.gpc_io(x, p["weight1"], p["weight2"], p["bias1"], p["bias2"],
                                    backend=backend)
    if op == "gpc_block":
        return kphi3_kernels.gpc_block(x, p["weight1"], p["weight2"], p["bias1"], p["bias2"],
                                       backend=backend)
    if op == "interleave":
        return kphi3_kernels.interleave(x, ops.step, backend=backend)
    raise ValueError(op)


def call_reference(op: str, ops: Operands, x: torch.Tensor, params: Dict):
    p = params
    if op == "grouped_linear":
        return R.grouped_linear(x, p["weight1"], p["bias1"])
    if op == "gpc_io":
        return R.gpc_io(x, p["weight1"], p["weight2"], p["bias1"], p["bias2"])
    if op == "gpc_block":
        return R.gpc_block(x, p["weight1"], p["weight2"], p["bias1"], p["bias2"])
    if op == "interleave":
        return R.interleave(x, ops.step)
    raise ValueError(op)


def forward_backward(fn: Callable, targets: Sequence[torch.Tensor], dy: Optional[torch.Tensor]):
    """``y = fn()``; the gradients of ``<y, dy>`` with respect to every target (None if unused)."""
    y = fn()
    if dy is None:
        return y, [None] * len(targets)
    grads = torch.autograd.grad(y, list(targets), dy, allow_unused=True)
    return y, list(grads)


def _detached_copy(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().to(dtype).requires_grad_(True)


def reference_operands(ops: Operands, dtype: torch.dtype):
    """Leaf copies of the operands in ``dtype``: ``(x, params, targets)`` (targets as in
    ``ops.grad_targets()``)."""
    x = _detached_copy(ops.x, dtype)
    params = {k: _detached_copy(v, dtype) for k, v in ops.params.items()}
    targets = [x] + [v for v in params.values() if v is not None]
    return x, params, targets


def run_reference(op: str, ops: Operands, dtype: torch.dtype, dy: Optional[torch.Tensor]):
    """The reference on copies of the operands cast to ``dtype`` (float64: the oracle)."""
    x, params, targets = reference_operands(ops, dtype)
    return forward_backward(lambda: call_reference(op, ops, x, params), targets,
                            None if dy is None else dy.to(dtype))


def run_package(op: str, ops: Operands, backend: str, dy: Optional[torch.Tensor]):
    targets = [t for _, t in ops.grad_targets()]
    return forward_backward(lambda: call_package(op, ops, ops.x, ops.params, backend), targets, dy)


# (op, backend, result) whose design rounds an intermediate in fp16 / bf16 (docs/numerics.md,
# "Rounded intermediates"): the IO block's dx on Triton, from dxi = dy_n W2[n]^T.
ROUNDED_INTERMEDIATES = {("gpc_io", "triton", "x")}


def io_second_term(ops: Operands, dy: torch.Tensor) -> torch.Tensor:
    """The IO block's dx through W2 alone (``dxi`` interleaved back), in float64."""
    x, params, _ = reference_operands(ops, torch.float64)
    params = dict(params, weight1=torch.zeros_like(params["weight1"]), bias1=None, bias2=None)
    _, (dxi,) = forward_backward(lambda: call_reference("gpc_io", ops, x, params), [x],
                                 dy.to(torch.float64))
    return dxi


def rounded_intermediate_bound(dtype: torch.dtype, result64: torch.Tensor,
                               intermediate64: torch.Tensor) -> float:
    """The error bound of a result summed in fp32 from an intermediate rounded to ``dtype``:
    ``u (||result|| + ||intermediate||) / ||result|| + HALF_SLACK`` (u the unit roundoff: one
    rounding of the intermediate, one of the result; the slack covers fp32 accumulation)."""
    u = torch.finfo(dtype).eps / 2
    norm = result64.norm().item()
    return u * (norm + intermediate64.norm().item()) / max(norm, 1e-30) + HALF_SLACK


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def run_with_grads(fn, inputs, douts):
    """``fn(*inputs)``'s outputs and the gradients of ``sum <out, dout>`` over the outputs with
    a ``dout`` (None: that output is not used) with respect to every input requiring grad
    (None where none reaches it)."""
    outs = _outputs(fn(*inputs))
    targets = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    # An output no target reaches (the oracle's h when only the weight requires grad) has no
    # graph; the library's counterpart may have one, and then no gradient reaches a target.
    used = [(o, d) for o, d in zip(outs, douts) if d is not None and o.requires_grad]
    if not used:
        return list(outs), [None] * len(targets)
    grads = torch.autograd.grad([o for o, _ in used], targets,
                                [d.to(o.dtype) for o, d in used], allow_unused=True)
    return list(outs), list(grads)


def as_float64(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad)
            if isinstance(t, torch.Tensor) else t for t in inputs]


def check_parity(what, fn, oracle, baseline, inputs, douts, names, bound, extra_limits=None):
    """Every output and gradient of ``fn`` against ``oracle`` in float64, under the contract.

    ``bound[name]``: the dtype whose bound the result meets (fp32: FP32_TOL; fp16 / bf16:
    HALF_TOL and no worse than HALF_RATIO x ``baseline``'s error + HALF_SLACK, ``baseline``
    being the plain PyTorch path in the same dtypes). ``extra_limits(inputs64, douts, want)``:
    the rounding bounds of results that round an intermediate by design (docs/numerics.md,
    "Rounded intermediates"), which replace the ratio for those results. Returns the results
    by name.
    """
    outs, grads = run_with_grads(fn, inputs, douts)
    outs64, grads64 = run_with_grads(oracle, as_float64(inputs), douts)
    got, want = dict(zip(names, outs + grads)), dict(zip(names, outs64 + grads64))
    assert len(names) == len(outs + grads) == len(outs64 + grads64)
    errs = {}
    for n in names:
        if want[n] is None:
            assert got[n] is None, f"{what}: a gradient reaches {n}, none in the oracle"
            continue
        assert got[n] is not None, f"{what}: no gradient for {n}"
        errs[n] = rel_error(got[n], want[n])
    base, rounding = {}, {}
    if any(bound[n] != torch.float32 for n in errs):
        outs_b, grads_b = run_with_grads(baseline, inputs, douts)
        base = {n: rel_error(b, want[n]) for n, b in zip(names, outs_b + grads_b) if n in errs}
        if extra_limits is not None:
            rounding = extra_limits(as_float64(inputs), douts, want)
    assert_meets_contract(what, errs, {n: bound[n] for n in errs}, base, rounding)
    return got


def check_op(op: str, ops: Operands, backend: str, dtype: torch.dtype, backward: bool = True) -> Dict:
    """Parity of one op on one backend with the float64 oracle, output and every gradient.

    fp32: every error under FP32_TOL. fp16/bf16: every error under HALF_TOL and no worse than
    HALF_RATIO x the error of the plain PyTorch path in the same dtype + HALF_SLACK (for the
    ``torch`` backend that path is ``reference.py``; for ``triton`` it is the ``torch`` backend),
    except a result in ROUNDED_INTERMEDIATES, which meets its rounding bound instead.
    Returns the errors by name, for the record.
    """
    names = ["out"] + [n for n, _ in ops.grad_targets()]
    out_shape = call_reference(op, ops, ops.x.detach(), {k: None if v is None else v.detach()
                                                       for k, v in ops.params.items()}).shape
    dy = torch.randn(out_shape, device=ops.x.device).to(dtype) if backward else None

    y, grads = run_package(op, ops, backend, dy)
    assert y.dtype == dtype and y.shape == out_shape and y.device == ops.x.device
    y64, grads64 = run_reference(op, ops, torch.float64, dy)
    errs = {n: rel_error(a, b) for n, a, b in zip(names, [y] + grads, [y64] + grads64)
            if b is not None}
    for n, g, g64 in zip(names[1:], grads, grads64):
        if g64 is not None:
            assert g is not None, f"no gradient for {n}"
            assert g.dtype == dtype, f"gradient of {n} has dtype {g.dtype}, expected {dtype}"
            assert g.shape == g64.shape, f"gradient of {n}: shape {g.shape} != {g64.shape}"
    base, rounding = {}, {}
    if dtype != torch.float32:
        base = plain_path_errors(op, ops, backend, dtype, dy, names, [y64] + grads64)
        if (op, backend, "x") in ROUNDED_INTERMEDIATES and "x" in errs:
            rounding["x"] = rounded_intermediate_bound(dtype, grads64[0], io_second_term(ops, dy))
    assert_meets_contract(f"{op}/{backend}/{dtype}", errs, dtype, base, rounding)
    return errs


def plain_path_errors(op: str, ops: Operands, backend: str, dtype: torch.dtype,
                      dy: Optional[torch.Tensor], names, want64) -> Dict[str, float]:
    """The plain PyTorch path's errors in ``dtype``: ``reference.py`` for the torch backend, the
    torch backend for Triton."""
    if backend == "triton":
        yb, gb = run_package(op, ops, "torch", dy)
    else:
        yb, gb = run_reference(op, ops, dtype, dy)
    return {n: rel_error(a, b) for n, a, b in zip(names, [yb] + gb, want64) if b is not None}


def module_reference(module, x, p):
    """A module's function by reference.py, from ``p`` (its parameters by state-dict name)."""
    a = getattr(module, "activation", None)
    act = (lambda t: t) if a is None else a
    if isinstance(module, GroupedLinearFast):
        return R.grouped_linear(x, p["weight"], p.get("bias"))
    if isinstance(module, GroupedLinear):
        G = module.num_groups
        return R.grouped_linear_modules(x, [p[f"group_layers.{n}.weight"] for n in range(G)],
                                        [p.get(f"group_layers.{n}.bias") for n in range(G)])
    if isinstance(module, InterleaveChannelsFast):
        return R.interleave(x, module.step_size)
    if module.num_groups == 1:
        return act(torch.nn.functional.linear(x, p["first_pointwise_conv.group_layers.0.weight"],
                                              p.get("first_pointwise_conv.group_layers.0.bias")))
    w1, b1 = p["first_pointwise_conv.weight"], p.get("first_pointwise_conv.bias")
    w2, b2 = p.get("second_pointwise_conv.weight"), p.get("second_pointwise_conv.bias")
    if isinstance(module, GroupedPointwiseConvolutionBlockIO):
        return R.gpc_io(x, w1, w2, b1, b2, activation=a)
    return R.gpc_block(x, w1, w2, b1, b2, activation=a)


# --------------------------------------------------------------------------------------------
# Spies
# --------------------------------------------------------------------------------------------


def impl_modules():
    from kphi3_kernels.ops import torch_impl, triton_impl
    return {"torch": torch_impl, "triton": triton_impl}


def forbid_launch(monkeypatch) -> None:
    """Make every launcher (both backends) and the Triton kernels' entry points raise if called."""
    import kphi3_kernels.ops.grouped_gemm as gg
    import kphi3_kernels.ops.interleave as il

    def boom(*args, **kwargs):
        raise AssertionError("a kernel / launcher ran although the input should have been rejected")

    for mod in impl_modules().values():
        for name in mod.__all__:
            monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(gg, "grouped_gemm", boom)
    monkeypatch.setattr(il, "interleave_fwd", boom)
    from kphi3_kernels.ops import triton_impl
    monkeypatch.setattr(triton_impl, "grouped_gemm", boom)


def spy_impls(monkeypatch) -> List[Tuple[str, str]]:
    """Record ``(backend, launcher)`` for every launcher called; the launchers still run."""
    calls: List[Tuple[str, str]] = []
    for backend, mod in impl_modules().items():
        for name in mod.__all__:
            original = getattr(mod, name)

            def wrapper(*args, __b=backend, __n=name, __f=original, **kwargs):
                calls.append((__b, __n))
                return __f(*args, **kwargs)

            monkeypatch.setattr(mod, name, wrapper)
    return calls


def force_gemm_config(monkeypatch, config) -> List[str]:
    """Run every launch of the grouped GEMM kernel with ``config`` (the interpreter asks
    ``launch.FORCE_CONFIG`` of each); returns the list the forced launches' names go to."""
    from kphi3_kernels.ops import launch

    forced: List[str] = []

    def force(spec):
        if spec.kernel.__name__ != "_grouped_gemm_kernel":
            return None
        forced.append(spec.name)
        return config

    monkeypatch.setattr(launch, "FORCE_CONFIG", force)
    return forced


requires_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="needs Triton's CPU interpreter (TRITON_INTERPRET=1, no GPU)")


# --------------------------------------------------------------------------------------------
# Multi-process tests (gloo on CPU)
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_process_group(rank: int, world_size: int, port: int, timeout_s: float):
    """A worker's gloo process group on loopback (one thread per rank), torn down on the way out.

    On a normal exit every rank passes a barrier first: a rank whose peer has already torn gloo
    down can hang in its own teardown (seen about once in ten DDP runs on torch 2.11)."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


TEARDOWN_GRACE_S = 30.0


def run_spawned(worker, args: tuple, nprocs: int, timeout_s: float, what: str):
    """Run ``worker(rank, *args, result_path)`` in ``nprocs`` spawned processes and return what
    rank 0 saved to ``result_path`` with ``torch.save``; fail the test after ``timeout_s``."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "rank0.pt")
        context = mp.start_processes(worker, args=(*args, result_path), nprocs=nprocs, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + timeout_s
        saved_at = None
        try:
            while not context.join(timeout=1.0):
                now = time.monotonic()
                if saved_at is None and os.path.exists(result_path):
                    saved_at = now
                # Rank 0 saves its result after the last collective, before the teardown: a
                # worker still alive well after that hangs in gloo's teardown (a known gloo
                # issue on CPU, about one run in ten), not in the work being tested.
                if saved_at is not None and now - saved_at > TEARDOWN_GRACE_S:
                    break
                if now > deadline:
                    pytest.fail(f"{what} workers did not finish within {timeout_s} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return torch.load(result_path)
