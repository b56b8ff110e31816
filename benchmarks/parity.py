"""The parity gate: a provider is timed only after it matched the reference on the row's inputs.

The oracle is ``kphi3_kernels.reference.gpc_io`` in float64 on the very inputs the provider
gets (rounded to the sweep's dtype, then widened), so input rounding is not counted as error.
Each output is compared by ``||out - ref|| / ||ref||`` (the package's numerics contract):
the forward always, and ``dx``, ``dw1``, ``dw2`` when a backward mode is to be timed.
A NaN or Inf where the oracle has none is a failure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from kphi3_kernels import reference

# The numerics contract: fp32 lands far under 1e-5; fp16/bf16 within about 1e-2 (2e-2 leaves
# room for the backward's long reductions at M = 16384).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}
DENSE_BASELINE = "n/a (dense baseline)"


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


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


@dataclass
class ParityResult:
    """``forward_ok`` gates the forward row; ``grads_ok`` (None: not checked) the backward rows."""

    tol: float
    errors: Dict[str, float] = field(default_factory=dict)
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
          grads: bool) -> ParityResult:
    """Run ``fn`` on ``x`` (and backward with ``dy`` when ``grads``) and compare with the oracle."""
    result = ParityResult(tol=tol)
    x_leaf = x.detach().clone().requires_grad_(grads)
    for p in params:
        p.grad = None
    if not grads:
        with torch.no_grad():
            y = fn(x_leaf)
        result.errors["y"] = rel_err(y, oracle.forward())
        result.forward_ok = result.errors["y"] <= tol
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
    result.forward_ok = result.errors["y"] <= tol
    result.grads_ok = all(result.errors[n] <= tol for n in names)
    return result
