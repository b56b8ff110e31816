"""The parity gate: a provider is timed only after it matched the reference on the row's inputs.

The oracle is ``kphi3_kernels.reference.gpc_io`` in float64 on the very inputs the provider
gets (rounded to the sweep's dtype, then widened), so input rounding is not counted as error.
Each output is compared by ``||out - ref|| / ||ref||`` (the package's numerics contract):
the forward always, and ``dx``, ``dw1``, ``dw2`` when a backward mode is to be timed.
A NaN or Inf where the oracle has none is a failure. In fp16 / bf16 each error must also be no
worse than the plain PyTorch path's (``reference.gpc_io`` in the same dtype), as the contract
says, except a result named in ``rounded``, which meets its rounding bound instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from kphi3_kernels import reference

# The numerics contract (docs/numerics.md); the test suite states the same numbers in
# tests/_utils.py and tests/test_contract_checks.py holds the two equal. fp32: far under 1e-5.
# fp16 / bf16: within 1e-2 and no worse than 2x the plain PyTorch path's error in the same dtype
# plus 1e-4 (the fp32 accumulation), or, for a result that rounds an intermediate by design,
# within its rounding bound instead of that ratio.
FP32_TOL = 1e-5
HALF_TOL = 1e-2
HALF_RATIO = 2.0
HALF_SLACK = 1e-4
FP64_TOL = 1e-12
HALF_DTYPES = (torch.float16, torch.bfloat16)
TOLERANCES = {torch.float32: FP32_TOL, torch.float16: HALF_TOL, torch.bfloat16: HALF_TOL,
              torch.float64: FP64_TOL}
DENSE_BASELINE = "n/a (dense baseline)"


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def contract_failure(err: float, dtype: torch.dtype, baseline_err: Optional[float] = None,
                     rounding_bound: Optional[float] = None,
                     tol: Optional[float] = None) -> Optional[str]:
    """Why ``err`` breaks the contract for a result computed in ``dtype``; None if it meets it.

    ``err < tol`` (default: the dtype's tolerance); in fp16 / bf16 also ``err <=
    rounding_bound`` for a result that rounds an intermediate by design, else ``err <=
    HALF_RATIO x baseline_err + HALF_SLACK`` (``baseline_err``: the plain PyTorch path's error).
    NaN fails every comparison.
    """
    tol = tolerance(dtype) if tol is None else tol
    if not err < tol:
        return f"err {err:.3g} not under {tol:g}"
    if dtype not in HALF_DTYPES:
        return None
    if rounding_bound is not None:
        limit, what = rounding_bound, "its rounding bound"
    elif baseline_err is None:
        raise ValueError("a half-precision result needs the plain PyTorch path's error")
    else:
        limit = HALF_RATIO * baseline_err + HALF_SLACK
        what = f"{HALF_RATIO:g}x the plain path's {baseline_err:.3g}"
    return None if err <= limit else f"err {err:.3g} over {what} ({limit:.3g})"


def rounded_intermediate_bound(dtype: torch.dtype, result64: torch.Tensor,
                               intermediate64: torch.Tensor) -> float:
    """The bound of a result summed in fp32 from an intermediate rounded to ``dtype``:
    ``u (||result|| + ||intermediate||) / ||result|| + HALF_SLACK`` (docs/numerics.md)."""
    u = torch.finfo(dtype).eps / 2
    norm = float(torch.linalg.vector_norm(result64.double()))
    return (u * (norm + float(torch.linalg.vector_norm(intermediate64.double()))) / max(norm, 1e-30)
            + HALF_SLACK)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when ``out`` has a NaN/Inf that ``ref`` lacks."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if out.shape != ref.shape:
        return math.inf
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        if not bool((bad == ~torch.isfinite(ref)).all()):
            return math.inf
        out, ref = out[~bad], ref[~bad]
    denom = float(torch.linalg.vector_norm(ref))
    diff = float(torch.linalg.vector_norm(out - ref))
    return diff / denom if denom > 0 else diff


@dataclass
class Oracle:
    """The float64 reference output and gradients of one input set, computed on first use."""

    x: torch.Tensor
    params: Sequence[torch.Tensor]
    dy: torch.Tensor
    _forward: Optional[torch.Tensor] = None
    _grads: Optional[List[torch.Tensor]] = None
    _plain: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def _leaves(self):
        x = self.x.detach().to(torch.float64).requires_grad_()
        params = [p.detach().to(torch.float64).requires_grad_() for p in self.params]
        return x, params

    def forward(self) -> torch.Tensor:
        if self._forward is None:
            x, params = self._leaves()
            with torch.no_grad():
                self._forward = reference.gpc_io(x, *params)
        return self._forward

    def grads(self) -> List[torch.Tensor]:
        """``[dx, dw1, dw2]`` for the upstream gradient ``dy``."""
        if self._grads is None:
            x, params = self._leaves()
            y = reference.gpc_io(x, *params)
            y.backward(self.dy.to(torch.float64))
            self._forward = y.detach()
            self._grads = [x.grad] + [p.grad for p in params]
        return self._grads

    def rounding_bounds(self, dtype: torch.dtype) -> Dict[str, float]:
        """``dx``'s bound when its term through W2 (``dxi``) is rounded to ``dtype`` before the
        sum (docs/numerics.md, "Rounded intermediates")."""
        x, (w1, w2, *rest) = self._leaves()
        y = reference.gpc_io(x, torch.zeros_like(w1), w2)
        (dxi,) = torch.autograd.grad(y, [x], self.dy.to(torch.float64))
        return {"dx": rounded_intermediate_bound(dtype, self.grads()[0], dxi)}

    def plain_errors(self, grads: bool) -> Dict[str, float]:
        """The errors of the plain PyTorch path (``reference.gpc_io`` in the inputs' dtype):
        ``y``, and with ``grads`` also ``dx``, ``dw1``, ``dw2``."""
        key = "grads" if grads else "fwd"
        if key not in self._plain:
            x = self.x.detach().clone().requires_grad_(grads)
            params = [p.detach().clone().requires_grad_(grads) for p in self.params]
            with torch.set_grad_enabled(grads):
                y = reference.gpc_io(x, *params)
            errors = {"y": rel_err(y, self.forward())}
            if grads:
                got = torch.autograd.grad(y, [x] + params, self.dy)
                names = ["dx"] + [f"dw{i + 1}" for i in range(len(params))]
                errors.update({n: rel_err(g, w) for n, g, w in zip(names, got, self.grads())})
            self._plain[key] = errors
        return self._plain[key]


@dataclass
class ParityResult:
    """``forward_ok`` gates the forward row; ``grads_ok`` (None: not checked) the backward rows."""

    tol: float
    errors: Dict[str, float] = field(default_factory=dict)
    failures: Dict[str, str] = field(default_factory=dict)  # why a result breaks the contract
    forward_ok: Optional[bool] = None
    grads_ok: Optional[bool] = None
    dense: bool = False

    @classmethod
    def dense_baseline(cls) -> "ParityResult":
        return cls(tol=math.nan, dense=True)

    def ok_for(self, mode: str) -> Optional[bool]:
        """True/False for the mode's outputs; None for the dense baseline (nothing to check)."""
        if self.dense:
            return None
        return self.forward_ok if mode == "fwd" else bool(self.forward_ok and self.grads_ok)

    def worst(self, mode: str) -> Optional[float]:
        keys = ["y"] if mode == "fwd" else list(self.errors)
        values = [self.errors[k] for k in keys if k in self.errors]
        return max(values) if values else None

    def describe(self, mode: str) -> str:
        if self.dense:
            return DENSE_BASELINE
        keys = ["y"] if mode == "fwd" else list(self.errors)
        detail = ", ".join(f"{k} {self.errors[k]:.1e}" for k in keys if k in self.errors)
        verdict = "ok" if self.ok_for(mode) else "FAILED"
        return f"{verdict} (rel err {detail}; tol {self.tol:.0e})"


def check(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          params: Sequence[torch.Tensor], dy: torch.Tensor, oracle: Oracle, tol: float,
          grads: bool, rounded: Sequence[str] = ()) -> ParityResult:
    """Run ``fn`` on ``x`` (and backward with ``dy`` when ``grads``) and compare with the oracle.

    Each error must be under ``tol`` and, in fp16 / bf16, no worse than the plain PyTorch path's
    (``contract_failure``). ``rounded`` names the results that round an intermediate by design
    (the Triton IO block's ``dx``, docs/numerics.md): their rounding bound replaces that ratio.
    """
    result = ParityResult(tol=tol)
    x_leaf = x.detach().clone().requires_grad_(grads)
    for p in params:
        p.grad = None
    if not grads:
        with torch.no_grad():
            y = fn(x_leaf)
        result.errors["y"] = rel_err(y, oracle.forward())
        result.forward_ok = _meets(result, ["y"], x.dtype, oracle, grads, rounded)
        return result
    wanted = oracle.grads()  # also computes the oracle's forward
    y = fn(x_leaf)
    result.errors["y"] = rel_err(y, oracle.forward())
    y.backward(dy)
    names = ["dx"] + [f"dw{i + 1}" for i in range(len(params))]
    for name, got, want in zip(names, [x_leaf.grad] + [p.grad for p in params], wanted):
        result.errors[name] = math.inf if got is None else rel_err(got, want)
    for p in params:
        p.grad = None
    result.forward_ok = _meets(result, ["y"], x.dtype, oracle, grads, rounded)
    result.grads_ok = _meets(result, names, x.dtype, oracle, grads, rounded)
    return result


def _meets(result: ParityResult, names: Sequence[str], dtype: torch.dtype, oracle: Oracle,
           grads: bool, rounded: Sequence[str]) -> bool:
    """Every named error meets the contract; the reasons of those that do not are recorded."""
    half = dtype in HALF_DTYPES
    plain = oracle.plain_errors(grads) if half else {}
    bounds = oracle.rounding_bounds(dtype) if half and grads and rounded else {}
    for n in names:
        bound = bounds.get(n) if n in rounded else None
        why = contract_failure(result.errors[n], dtype, plain.get(n), bound, tol=result.tol)
        if why is not None:
            result.failures[n] = why
    return not any(n in result.failures for n in names)
