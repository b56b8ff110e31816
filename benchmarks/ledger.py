"""The launch ledger: a speed-of-light cost model of each op's data flow, launch by launch.

    python -m kphi3_bench.ledger                                  # the summary: per op, per layer
    python -m kphi3_bench.ledger --detail                         # ... then every row and launch
    python -m kphi3_bench.ledger --shapes kphi3 --M 8192 --dtype bf16
    python -m kphi3_bench.ledger --out ledger.json --markdown ledger.md
    python -m kphi3_bench.ledger --check-budget benchmarks/results/ledger-budget.json
    python -m kphi3_bench.ledger --triton-only --write-budget benchmarks/results/ledger-budget.json

Nothing is timed and nothing runs on a GPU: every number is arithmetic on what each launch reads,
writes and computes, so the ledger is the same on any machine. For every op (``grouped_linear``,
``gpc_io``, ``gpc_block``, ``interleave``), shape, M, mode and dtype it counts four things:

* **triton**: the launches of ``kphi3_kernels.ops.triton_impl``. The launchers are called on
  ``meta`` tensors (shapes and strides, no memory) with ``ops.launch.RECORDER`` set, so each
  ``KernelLaunch`` is seen and none is run. A launch's FLOPs are those its first-choice config
  (``configs[0]``) issues, tile padding included: ``2 * programs * BLOCK_P * BLOCK_Q * BLOCK_K *
  (cdiv(K, BLOCK_K) + cdiv(K2, BLOCK_K))`` for the grouped GEMM, 0 for the interleave (a pure
  data-movement kernel). Its bytes are the sizes of the distinct tensors among its arguments
  (a tensor passed twice, e.g. as an unused bias placeholder, counts once; an output the kernel
  accumulates into, named in ``KernelLaunch.restore``, counts twice: read and write).
* **reference**: ``kphi3_kernels.reference`` (the original's einsum chain), recorded as an aten
  graph on ``meta`` tensors with a ``TorchDispatchMode``. Every aten op that moves data is a
  launch (copies, clones, ``bmm``, ``add``...); views and other metadata-only ops (``view``,
  ``permute``, ``t``, ``_unsafe_view``...) and bare allocations are skipped. FLOPs come from
  ``torch.utils.flop_counter``'s formulas, bytes are the op's distinct tensor inputs plus its
  outputs (the operand of an in-place op such as ``add_`` is read and written; the destination
  of ``copy_``, ``fill_`` or an ``out=`` variant is written only).
* **dense**: ``F.linear(x, W)`` of the same in/out (what a user would run instead), recorded the
  same way. The interleave has no dense counterpart.
* **floor**: one launch that does the op's true FLOPs (``2 * M * in * out / G`` per grouped
  GEMM, twice that backward) and moves the least bytes: forward reads x and the weights and
  writes y; backward reads dy, x and the weights and writes dx and the weight gradients.

``bwd`` is the backward alone, given the upstream gradient: every input gradient and every weight
gradient (no bias). Each launch costs ``max(FLOPs / peak FLOP/s, bytes / peak bytes/s) +
overhead``; an op costs the sum of its launches. The defaults are the H200 ceilings of
``kphi3_bench.roofline`` (790 TFLOP/s bf16, 4.3 TB/s copy; fp16 assumed the same) and 2 us per
launch. These are predictions, not measurements: a kernel can only be slower than its ledger line
(it ignores L2 re-reads, load widths, occupancy and tails), so the ledger says what a design can
at best achieve and where its bytes go, not how fast it runs.

The budget (``--write-budget`` / ``--check-budget``, and ``tests/test_ledger.py``) holds the
Triton path's launches and bytes per row: a change that adds a launch or moves more bytes than
the committed budget fails until the budget is rewritten on purpose.

Python API: ``triton_launches``, ``reference_launches``, ``dense_launches``, ``floor``,
``triton_launch_cost``, ``AtenRecorder``, ``build_ledger``, ``budget_from_rows``,
``check_budget``, ``format_table``, ``markdown``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from .cli import LAUNCH_OVERHEAD_US, LEDGER_DEFAULT_DTYPES as DEFAULT_DTYPES
from .cli import LEDGER_DEFAULT_M as DEFAULT_M, LEDGER_DEFAULT_SHAPES as DEFAULT_SHAPES
from .cli import LEDGER_MODES, LEDGER_OPS as OPS

SCHEMA = "kphi3_bench.ledger/1"
BUDGET_SCHEMA = "kphi3_bench.ledger-budget/1"
DEFAULT_BUDGET = "benchmarks/results/ledger-budget.json"


# ----------------------------------------------------------------------------------------------
# The cost model
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """``time = max(flops / peak_flops, bytes / peak_bytes_per_s) + overhead_s`` per launch."""

    peak_tflops: float
    peak_gbps: float
    overhead_us: float = LAUNCH_OVERHEAD_US

    def time_us(self, flops: float, nbytes: float) -> float:
        return (max(flops / (self.peak_tflops * 1e12), nbytes / (self.peak_gbps * 1e9)) * 1e6
                + self.overhead_us)

    def bound(self, flops: float, nbytes: float) -> str:
        compute = flops / (self.peak_tflops * 1e12)
        memory = nbytes / (self.peak_gbps * 1e9)
        return "compute" if compute >= memory else "memory"


def h200_model(overhead_us: float = LAUNCH_OVERHEAD_US) -> CostModel:
    """The H200 ceilings of ``kphi3_bench.roofline`` (bf16; fp16 assumed the same)."""
    from .roofline import H200_BF16_TFLOPS, H200_COPY_GBPS

    return CostModel(H200_BF16_TFLOPS, H200_COPY_GBPS, overhead_us)


@dataclass
class LaunchCost:
    """One launch: what it is, what it computes and what it moves."""

    name: str
    flops: int
    bytes: int
    config: str = ""

    def to_dict(self, model: CostModel) -> Dict[str, Any]:
        out = {"name": self.name, "flops": self.flops, "bytes": self.bytes,
               "time_us": round(model.time_us(self.flops, self.bytes), 4),
               "bound": model.bound(self.flops, self.bytes)}
        if self.config:
            out["config"] = self.config
        return out


@dataclass
class PathCost:
    """The launches of one way to compute one op call."""

    launches: List[LaunchCost] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.launches)

    @property
    def flops(self) -> int:
        return sum(l.flops for l in self.launches)

    @property
    def bytes(self) -> int:
        return sum(l.bytes for l in self.launches)

    def time_us(self, model: CostModel) -> float:
        return sum(model.time_us(l.flops, l.bytes) for l in self.launches)

    def to_dict(self, model: CostModel) -> Dict[str, Any]:
        return {"launches": self.count, "flops": self.flops, "bytes": self.bytes,
                "time_us": round(self.time_us(model), 4),
                "kernels": [l.to_dict(model) for l in self.launches]}


# ----------------------------------------------------------------------------------------------
# Bytes of a set of tensors
# ----------------------------------------------------------------------------------------------


def _storage_key(t) -> int:
    # The StorageImpl's address: equal for every view of one storage (meta tensors included,
    # whose data pointers are all 0).
    return t.untyped_storage()._cdata


def _view_bytes(t) -> int:
    """Bytes a tensor (view) spans: its elements, or fewer where strides overlap (``expand``)."""
    n = t.numel()
    if n == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(n, span) * t.element_size()


def distinct_bytes(tensors: Iterable[Any]) -> int:
    """The bytes of the distinct tensors among ``tensors``.

    One tensor passed twice counts once; distinct views of one storage add up, but never to more
    than the storage holds.
    """
    import torch

    views: Dict[Any, Dict[tuple, int]] = {}
    caps: Dict[Any, int] = {}
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = _storage_key(t)
        caps[key] = t.untyped_storage().nbytes()
        views.setdefault(key, {})[(t.storage_offset(), tuple(t.shape), tuple(t.stride()))] = \
            _view_bytes(t)
    return sum(min(caps[key], sum(v.values())) for key, v in views.items())


# ----------------------------------------------------------------------------------------------
# The Triton path: KernelLaunch records
# ----------------------------------------------------------------------------------------------

# The block-size names of the kernels' configs (kphi3_kernels/ops/grouped_gemm.py, interleave.py).
_GEMM_BLOCKS = ("BLOCK_P", "BLOCK_Q", "BLOCK_K")
_MOVE_BLOCKS = {"BLOCK_M", "BLOCK_A", "BLOCK_B"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _config_text(config) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw}, num_warps={config.num_warps}, num_stages={config.num_stages}"


# A pass over rows x columns with no matmul (the fused activation of ``ops/layout_act.py``).
_ELEMENTWISE_BLOCKS = {"BLOCK_M", "BLOCK_C"}


def _k_steps(spec, bk: int) -> int:
    """K-loop steps of one program of a GEMM launch: the grouped GEMM's ``K`` (+ ``K2``), the
    layout GEMMs' (``ops/layout_gemm.py``) two products of ``G*R``, ``og`` or ``M``."""
    a = spec.args
    if "K" in a:
        return _cdiv(a["K"], bk) + _cdiv(a.get("K2", 0), bk)
    if spec.name == "gpc_io_layout_fwd":
        return 2 * _cdiv(a["GROUPS"] * a["RUN"], bk)
    if spec.name.startswith("gpc_io_layout_bwd_dt"):
        return _cdiv(a["OG"], bk)
    if spec.name == "gpc_io_layout_bwd_dw":
        return _cdiv(a["M"], bk)
    raise ValueError(f"launch {spec.name!r}: no reduction length known; teach the ledger")


def triton_launch_cost(spec) -> LaunchCost:
    """FLOPs (first-choice config, tile padding included) and bytes of one ``KernelLaunch``."""
    import torch

    config = spec.configs[0]
    kw = dict(config.kwargs)
    if all(k in kw for k in _GEMM_BLOCKS):
        bp, bq, bk = (kw[k] for k in _GEMM_BLOCKS)
        programs = 1
        for n in spec.grid(dict(spec.args, **kw)):
            programs *= n
        steps = _k_steps(spec, bk)
        flops = 2 * programs * bp * bq * bk * steps
    elif set(kw) in (_MOVE_BLOCKS, _ELEMENTWISE_BLOCKS):
        flops = 0
    else:
        raise ValueError(
            f"launch {spec.name!r}: config {sorted(kw)} is neither a GEMM's {_GEMM_BLOCKS} "
            f"nor a data pass's {sorted(_MOVE_BLOCKS)} / {sorted(_ELEMENTWISE_BLOCKS)}; teach the ledger "
            "what this kernel computes")
    tensors = [v for v in spec.args.values() if isinstance(v, torch.Tensor)]
    nbytes = distinct_bytes(tensors)
    # An output the kernel accumulates into is read and written.
    nbytes += distinct_bytes(spec.args[name] for name in spec.restore)
    return LaunchCost(spec.name, int(flops), int(nbytes), _config_text(config))


@dataclass(frozen=True)
class Problem:
    """One op call: the op, a shape of ``kphi3_bench.shapes``, M tokens and a dtype name."""

    op: str
    shape: Any   # shapes.Shape
    m: int
    dtype: str

    @property
    def has_second(self) -> bool:
        """gpc_block has its second GEMM only when in >= out."""
        return self.shape.in_features >= self.shape.out_features

    def torch_dtype(self):
        from .shapes import DTYPES

        return DTYPES[self.dtype]


def _meta(*size, dtype, requires_grad=False):
    import torch

    return torch.empty(*size, dtype=dtype, device="meta", requires_grad=requires_grad)


def _operands(p: Problem, requires_grad: bool = False) -> Dict[str, Any]:
    """x, the weights and dy of ``p`` on the meta device (``[M, C]``, weights ``[G, s, og]``)."""
    sh, dt = p.shape, p.torch_dtype()
    G, s, og = sh.groups, sh.in_per_group, sh.out_per_group
    out = {"x": _meta(p.m, sh.in_features, dtype=dt, requires_grad=requires_grad)}
    if p.op in ("grouped_linear", "gpc_io", "gpc_block"):
        out["w1"] = _meta(G, s, og, dtype=dt, requires_grad=requires_grad)
    if p.op == "gpc_io":
        out["w2"] = _meta(G, s, og, dtype=dt, requires_grad=requires_grad)
    if p.op == "gpc_block" and p.has_second:
        out["w2"] = _meta(G, og, og, dtype=dt, requires_grad=requires_grad)
    width = sh.in_features if p.op == "interleave" else sh.out_features
    out["dy"] = _meta(p.m, width, dtype=dt)
    return out


def _triton_call(p: Problem, mode: str) -> Callable[[], Any]:
    from kphi3_kernels.ops import triton_impl as T

    t = _operands(p)
    x, dy, w1, w2 = t["x"], t["dy"], t.get("w1"), t.get("w2")
    s = p.shape.in_per_group
    calls = {
        ("grouped_linear", "fwd"): lambda: T.grouped_linear_fwd(x, w1),
        ("grouped_linear", "bwd"): lambda: T.grouped_linear_bwd(dy, x, w1),
        ("gpc_io", "fwd"): lambda: T.gpc_io_fwd(x, w1, w2),
        # xi (x de-interleaved) is saved by a forward whose backward needs dW2, as here.
        ("gpc_io", "bwd"): lambda: T.gpc_io_bwd(dy, x, _meta(*x.shape, dtype=x.dtype), w1, w2),
        ("gpc_block", "fwd"): lambda: T.gpc_block_fwd(x, w1, w2),
        # h (first(x) interleaved, saved by the forward) is read only by the second GEMM's dW2.
        ("gpc_block", "bwd"): lambda: T.gpc_block_bwd(
            dy, x, _meta(p.m, p.shape.out_features, dtype=p.torch_dtype()) if w2 is not None
            else None, w1, w2),
        ("interleave", "fwd"): lambda: T.interleave_fwd(x, s),
        # The interleave's backward is the interleave with the inverse step C / s (= G).
        ("interleave", "bwd"): lambda: T.interleave_fwd(dy, p.shape.in_features // s),
    }
    return calls[(p.op, mode)]


def triton_launches(p: Problem, mode: str, io_forward: str = "auto") -> PathCost:
    """The Triton path's launches for ``p`` in ``mode``: recorded, not run."""
    from kphi3_kernels.ops import triton_impl as T

    previous_io = T.IO_FORWARD
    try:
        T.IO_FORWARD = io_forward
        return PathCost(record_costs(_triton_call(p, mode)))
    finally:
        T.IO_FORWARD = previous_io


def record_costs(call: Callable[[], Any]) -> List[LaunchCost]:
    """The cost of each launch ``call`` makes, recorded through ``ops/launch.py``, none run."""
    from kphi3_kernels.ops import launch as launch_mod

    seen: List[Any] = []
    previous = launch_mod.RECORDER
    try:
        launch_mod.RECORDER = seen.append
        call()
        # Counted while the launches' tensors are alive (storage identity decides duplicates).
        return [triton_launch_cost(spec) for spec in seen]
    finally:
        launch_mod.RECORDER = previous


# ----------------------------------------------------------------------------------------------
# The reference and dense paths: aten graphs
# ----------------------------------------------------------------------------------------------

# Ops that the schema does not mark as views but that move no bytes: aliases without an alias
# annotation, allocations without a fill, and queries.
_NO_BYTES = {
    "_unsafe_view", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty",
    "new_empty_strided", "resize_", "set_",
}
# In-place ops that overwrite their destination without reading it.
_WRITE_ONLY = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_",
               "exponential_"}


def _tensor_leaves(tree) -> List[Any]:
    import torch
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def aten_op_cost(func, args, kwargs, out) -> Optional[LaunchCost]:
    """One aten op as a launch (None for views, metadata-only ops and bare allocations)."""
    from torch.utils.flop_counter import flop_registry

    name = func._overloadpacket.__name__
    outputs = _tensor_leaves(out)
    if not outputs or getattr(func, "is_view", False) or name in _NO_BYTES:
        return None
    inputs = _tensor_leaves((args, kwargs))
    if func._overloadname.startswith("out") or name in _WRITE_ONLY:
        # ``out=`` tensors and the destination of copy_ / fill_ are written, not read.
        written = {_storage_key(t) for t in outputs}
        inputs = [t for t in inputs if _storage_key(t) not in written]
    formula = flop_registry.get(func._overloadpacket)
    flops = int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0
    # Inputs once each, outputs once each: an in-place op's operand (add_) is read and written.
    nbytes = distinct_bytes(inputs) + distinct_bytes(outputs)
    return LaunchCost(f"aten.{name}.{func._overloadname}", flops, int(nbytes))


_RECORDER_CLASS = None


def _aten_recorder_class():
    """``AtenRecorder``, defined on first use so that importing this module does not import torch."""
    global _RECORDER_CLASS
    if _RECORDER_CLASS is None:
        from torch.utils._python_dispatch import TorchDispatchMode

        class AtenRecorder(TorchDispatchMode):
            """A ``TorchDispatchMode`` that keeps every data-moving aten op run while it is
            active as a ``LaunchCost``: ``with AtenRecorder() as rec: ...``, then
            ``rec.launches``."""

            def __init__(self):
                super().__init__()
                self.launches: List[LaunchCost] = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                cost = aten_op_cost(func, args, kwargs, out)
                if cost is not None:
                    self.launches.append(cost)
                return out

        AtenRecorder.__module__ = __name__
        _RECORDER_CLASS = AtenRecorder
    return _RECORDER_CLASS


def __getattr__(name: str):
    if name == "AtenRecorder":
        return _aten_recorder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def record_aten(forward: Callable[..., Any], inputs: Sequence[Any], mode: str,
                dy: Any) -> PathCost:
    """The aten launches of ``forward(*inputs)`` (``fwd``) or of its backward alone (``bwd``:
    ``torch.autograd.grad`` of the output with respect to every input, given ``dy``)."""
    import torch

    if mode == "fwd":
        with torch.no_grad(), _aten_recorder_class()() as rec:
            forward(*inputs)
        return PathCost(rec.launches)
    y = forward(*inputs)
    with _aten_recorder_class()() as rec:
        torch.autograd.grad(y, list(inputs), dy)
    return PathCost(rec.launches)


def reference_launches(p: Problem, mode: str) -> PathCost:
    """``kphi3_kernels.reference``'s aten graph for ``p`` (forward, or backward alone)."""
    from kphi3_kernels import reference as R

    t = _operands(p, requires_grad=(mode == "bwd"))
    x, w1, w2, dy = t["x"], t.get("w1"), t.get("w2"), t["dy"]
    s = p.shape.in_per_group
    if p.op == "grouped_linear":
        return record_aten(R.grouped_linear, [x, w1], mode, dy)
    if p.op == "gpc_io":
        return record_aten(R.gpc_io, [x, w1, w2], mode, dy)
    if p.op == "gpc_block":
        if w2 is None:
            return record_aten(lambda a, b: R.gpc_block(a, b), [x, w1], mode, dy)
        return record_aten(R.gpc_block, [x, w1, w2], mode, dy)
    return record_aten(lambda a: R.interleave(a, s), [x], mode, dy)


def dense_launches(p: Problem, mode: str) -> Optional[PathCost]:
    """``F.linear(x, W)`` with ``W`` ``[out, in]`` (None for the interleave: no dense form)."""
    import torch.nn.functional as F

    if p.op == "interleave":
        return None
    sh, dt = p.shape, p.torch_dtype()
    grad = mode == "bwd"
    x = _meta(p.m, sh.in_features, dtype=dt, requires_grad=grad)
    w = _meta(sh.out_features, sh.in_features, dtype=dt, requires_grad=grad)
    return record_aten(F.linear, [x, w], mode, _meta(p.m, sh.out_features, dtype=dt))


# ----------------------------------------------------------------------------------------------
# The floor
# ----------------------------------------------------------------------------------------------


def floor(p: Problem, mode: str) -> LaunchCost:
    """One launch with the op's true FLOPs and the least bytes (each operand once).

    Forward: read x and the weights, write y. Backward: read dy, x and the weights, write dx and
    the weight gradients (twice the forward's FLOPs). gpc_block's dW2 needs ``h``, a function of
    x and W1: the floor counts neither reading it nor recomputing it, so it is a lower bound of
    both designs.
    """
    sh = p.shape
    G, s, og = sh.groups, sh.in_per_group, sh.out_per_group
    elem = {"fp32": 4, "bf16": 2, "fp16": 2}[p.dtype]
    M, cin, cout = p.m, sh.in_features, sh.out_features
    if p.op == "interleave":
        gemm_flops, weights = 0, 0
        cout = cin
    elif p.op == "grouped_linear":
        gemm_flops, weights = 2 * M * cin * cout // G, G * s * og
    elif p.op == "gpc_io":
        gemm_flops, weights = 4 * M * cin * cout // G, 2 * G * s * og
    else:  # gpc_block
        gemm_flops, weights = 2 * M * cin * cout // G, G * s * og
        if p.has_second:
            gemm_flops += 2 * M * cout * cout // G
            weights += G * og * og
    if mode == "fwd":
        flops, count = gemm_flops, M * cin + weights + M * cout
    elif p.op == "interleave":
        flops, count = 0, 2 * M * cin
    else:
        flops, count = 2 * gemm_flops, M * cout + M * cin + weights + M * cin + weights
    return LaunchCost("floor", flops, count * elem)


# ----------------------------------------------------------------------------------------------
# The ledger
# ----------------------------------------------------------------------------------------------


@dataclass
class LedgerRow:
    op: str
    shape: Any   # shapes.Shape
    m: int
    mode: str
    dtype: str
    triton: PathCost
    floor: LaunchCost
    reference: Optional[PathCost] = None
    dense: Optional[PathCost] = None

    @property
    def key(self) -> str:
        return row_key(self.op, self.shape.name, self.m, self.mode, self.dtype)

    def times(self, model: CostModel) -> Dict[str, Optional[float]]:
        return {
            "triton": self.triton.time_us(model),
            "reference": self.reference.time_us(model) if self.reference else None,
            "dense": self.dense.time_us(model) if self.dense else None,
            "floor": model.time_us(self.floor.flops, self.floor.bytes),
        }

    def to_dict(self, model: CostModel) -> Dict[str, Any]:
        t = self.times(model)

        def ratio(other):
            return None if t[other] is None else round(t["triton"] / t[other], 4)

        sh = self.shape
        return {
            "op": self.op, "shape": sh.name, "family": sh.family, "in": sh.in_features,
            "out": sh.out_features, "groups": sh.groups, "M": self.m, "mode": self.mode,
            "dtype": self.dtype,
            "triton": self.triton.to_dict(model),
            "reference": self.reference.to_dict(model) if self.reference else None,
            "dense": self.dense.to_dict(model) if self.dense else None,
            "floor": self.floor.to_dict(model),
            "triton_over_reference": ratio("reference"), "triton_over_dense": ratio("dense"),
            "triton_over_floor": ratio("floor"),
        }


def row_key(op: str, shape: str, m: int, mode: str, dtype: str) -> str:
    return f"{op} {shape} M={m} {mode} {dtype}"


def build_ledger(shapes: Sequence[Any], ms: Sequence[int], modes: Sequence[str] = LEDGER_MODES,
                 dtypes: Sequence[str] = DEFAULT_DTYPES, ops: Sequence[str] = OPS,
                 io_forward: str = "auto", baselines: bool = True,
                 on_row: Optional[Callable[[List["LedgerRow"]], None]] = None) -> List[LedgerRow]:
    """Every (op, shape, M, mode, dtype) row; ``baselines=False`` skips reference and dense.
    ``on_row`` is called with the rows so far after each one (``--out`` is rewritten)."""
    rows = []
    for op in ops:
        for sh in shapes:
            for m in ms:
                for mode in modes:
                    for dtype in dtypes:
                        p = Problem(op, sh, m, dtype)
                        rows.append(LedgerRow(
                            op, sh, m, mode, dtype, triton_launches(p, mode, io_forward),
                            floor(p, mode),
                            reference_launches(p, mode) if baselines else None,
                            dense_launches(p, mode) if baselines else None))
                        if on_row is not None:
                            on_row(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _us(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if v >= 100 else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _ratio(a: float, b: Optional[float]) -> str:
    return "-" if not b else f"{a / b:.2f}"


TABLE_HEADERS = ("op", "shape", "G", "M", "mode", "dtype", "triton launches", "triton MB",
                 "triton us", "reference launches", "reference us", "dense us", "floor us",
                 "triton/reference", "triton/dense", "triton/floor")


def table_body(rows: Sequence[LedgerRow], model: CostModel) -> List[List[str]]:
    body = []
    for r in rows:
        t = r.times(model)
        body.append([
            r.op, r.shape.name, str(r.shape.groups), str(r.m), r.mode, r.dtype,
            str(r.triton.count), f"{r.triton.bytes / 1e6:.2f}", _us(t["triton"]),
            str(r.reference.count) if r.reference else "-", _us(t["reference"]), _us(t["dense"]),
            _us(t["floor"]), _ratio(t["triton"], t["reference"]), _ratio(t["triton"], t["dense"]),
            _ratio(t["triton"], t["floor"]),
        ])
    return body


def format_table(rows: Sequence[LedgerRow], model: CostModel) -> str:
    """A fixed-width text table, one line per row: op .. dtype left-aligned, numbers right."""
    from .report import render

    return render(TABLE_HEADERS, table_body(rows, model), right=range(6, len(TABLE_HEADERS)))


def model_dict(model: CostModel, io_forward: str) -> Dict[str, Any]:
    return {
        "peak_tflops": model.peak_tflops, "peak_gbps": model.peak_gbps,
        "launch_overhead_us": model.overhead_us,
        "time": "sum over launches of max(flops / peak_tflops, bytes / peak_gbps) + overhead",
        "triton_flops": "first-choice config (configs[0]), tile padding included",
        "bytes": ("distinct tensors a launch reads or writes, each once; an accumulated output "
                  "(KernelLaunch.restore, the operand of an in-place aten op such as add_) read "
                  "and written; copy_ / fill_ / out= destinations written only"),
        "io_forward": io_forward,
        "note": "a prediction from FLOP and byte counts, not a measurement",
    }


def to_json(rows: Sequence[LedgerRow], model: CostModel, io_forward: str) -> Dict[str, Any]:
    import torch
    import triton

    return {"schema": SCHEMA, "tool": "python -m kphi3_bench.ledger",
            "model": model_dict(model, io_forward),
            "versions": {"torch": torch.__version__, "triton": triton.__version__},
            "rows": [r.to_dict(model) for r in rows]}


MARKDOWN_INTRO = """\
Predicted with `python -m kphi3_bench.ledger` on an H200 cost model: **a prediction from FLOP and
byte counts, not a measurement.** Each launch costs `max(FLOPs / {tflops:g} TFLOP/s, bytes /
{gbps:g} GB/s) + {overhead:g} us`; a path costs the sum of its launches.

- **triton**: the launches of `kphi3_kernels.ops.triton_impl` (IO forward design `{io}`),
  recorded through `ops.launch.RECORDER` on meta tensors, never run. FLOPs are those of the
  first-choice tile config, padding included; bytes are the distinct tensors each launch reads
  or writes.
- **reference**: `kphi3_kernels.reference` (the original's einsum chain) as an aten graph on meta
  tensors: every data-moving aten op is a launch, views are free.
- **dense**: `F.linear(x, W)` of the same in/out, recorded the same way (none for the interleave).
- **floor**: one launch with the op's true FLOPs that reads every input and writes every output
  once.
- **bwd** is the backward alone (every input and weight gradient, given dy). Ratios are
  triton time over the other path's time (below 1: the Triton path is predicted faster).

A kernel can only be slower than its line here: the model ignores L2 re-reads, load widths,
occupancy and wave tails.
"""


def _summary(rows: Sequence[LedgerRow], model: CostModel, dtype: str) -> Optional[str]:
    """gpc_io (the block the model runs) at the largest M: forward and backward side by side."""
    from .report import markdown_table

    io = [r for r in rows if r.op == "gpc_io" and r.dtype == dtype]
    if not io:
        return None
    m = max(r.m for r in io)
    by = {(r.shape.name, r.mode): r for r in io if r.m == m}
    body = []
    for name in dict.fromkeys(r.shape.name for r in io):
        cells = [name, ""]
        for mode in LEDGER_MODES:
            r = by.get((name, mode))
            if r is None:
                cells += ["-"] * 4
                continue
            cells[1] = str(r.shape.groups)
            t = r.times(model)
            cells += [_us(t["triton"]), _us(t["reference"]), _us(t["dense"]), _us(t["floor"])]
        body.append(cells)
    headers = ["shape", "G"] + [f"{mode} {path} us" for mode in LEDGER_MODES
                                for path in ("triton", "reference", "dense", "floor")]
    return (f"### gpc_io at M = {m} ({dtype})\n\n"
            + markdown_table(headers, body, right=range(1, len(headers))) + "\n"
            + "".join(f"\n{line}\n" for line in layer_totals(io, model, m)))


def layer_totals(rows: Sequence[LedgerRow], model: CostModel, m: int) -> List[str]:
    """Per family, its projections' fwd + bwd summed (one decoder layer's grouped layers) for
    each path, and the Triton path's ratio to the others: one line each."""
    lines = []
    for family in dict.fromkeys(r.shape.family for r in rows):
        chosen = [r for r in rows if r.shape.family == family and r.m == m]
        if {r.mode for r in chosen} != set(LEDGER_MODES):
            continue
        sums = {path: sum(r.times(model)[path] or 0.0 for r in chosen)
                for path in ("triton", "reference", "dense", "floor")}
        lines.append(
            f"{family}, its {len(chosen) // len(LEDGER_MODES)} projections' fwd + bwd: triton "
            f"{_us(sums['triton'])} us, reference {_us(sums['reference'])} us "
            f"({_ratio(sums['triton'], sums['reference'])}x), dense {_us(sums['dense'])} us "
            f"({_ratio(sums['triton'], sums['dense'])}x), floor {_us(sums['floor'])} us.")
    return lines


def markdown(rows: Sequence[LedgerRow], model: CostModel, io_forward: str,
             dtypes: Sequence[str] = ("bf16",)) -> str:
    """The generated section: the model in a few lines, a gpc_io summary at the largest M, then
    one table per op (rows of ``dtypes``)."""
    from .report import markdown_table

    parts = ["## Launch ledger (predicted)", "",
             "<!-- generated by python -m kphi3_bench.ledger --markdown; do not edit by hand -->",
             "", MARKDOWN_INTRO.format(tflops=model.peak_tflops, gbps=model.peak_gbps,
                                       overhead=model.overhead_us, io=io_forward)]
    for dtype in dtypes:
        summary = _summary(rows, model, dtype)
        if summary:
            parts.append(summary)
    # One table per op: its name is the heading, the dtype too.
    keep = [1, 2, 3, 4] + list(range(6, len(TABLE_HEADERS)))
    headers = [TABLE_HEADERS[i] for i in keep]
    right = [1, 2] + list(range(4, len(headers)))
    for op in OPS:
        chosen = [r for r in rows if r.op == op and r.dtype in dtypes]
        if not chosen:
            continue
        body = [[b[i] for i in keep] for b in table_body(chosen, model)]
        parts += [f"### {op} ({', '.join(dtypes)})", "", markdown_table(headers, body, right), ""]
    return "\n".join(parts)


def dump_json(data: Dict[str, Any]) -> str:
    """Indented JSON with each ledger row on one line (small files, one diff line per row)."""
    head = {k: v for k, v in data.items() if k != "rows"}
    text = json.dumps(head, indent=1)[:-2]
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in data.get("rows", []))
    return text + ',\n "rows": [\n' + rows + "\n ]\n}\n"


# ----------------------------------------------------------------------------------------------
# The budget
# ----------------------------------------------------------------------------------------------


def budget_command(grid: Dict[str, Any], path: str, io_forward: str = "auto") -> str:
    """The command that rewrites a budget file of ``grid`` (the grid spelled out)."""
    parts = ["python -m kphi3_bench.ledger --triton-only"]
    for flag, key in (("--shapes", "shapes"), ("--ops", "ops"), ("--m", "m"),
                      ("--modes", "modes"), ("--dtypes", "dtypes")):
        parts.append(f"{flag} {','.join(map(str, grid[key]))}")
    if io_forward != "auto":
        parts.append(f"--io-forward {io_forward}")
    parts.append(f"--write-budget {path}")
    return " ".join(parts)


def _grid_of(rows: Sequence[LedgerRow]) -> Dict[str, List[Any]]:
    return {
        "shapes": list(dict.fromkeys(r.shape.name for r in rows)),
        "ops": sorted({r.op for r in rows}, key=OPS.index),
        "m": sorted({r.m for r in rows}),
        "modes": sorted({r.mode for r in rows}, key=LEDGER_MODES.index),
        "dtypes": list(dict.fromkeys(r.dtype for r in rows)),
    }


def budget_from_rows(rows: Sequence[LedgerRow], io_forward: str,
                     path: str = DEFAULT_BUDGET) -> Dict[str, Any]:
    """The Triton path's launches and bytes of every row, as a budget file's content."""
    grid = _grid_of(rows)
    return {
        "schema": BUDGET_SCHEMA,
        "note": ("the Triton path's launches and bytes per row, counted by "
                 "python -m kphi3_bench.ledger (nothing run); tests/test_ledger.py fails when a "
                 "row makes more launches or moves more bytes. Rewrite it on purpose with the "
                 "command below."),
        "command": budget_command(grid, path, io_forward),
        "io_forward": io_forward,
        "grid": grid,
        "rows": {r.key: {"launches": r.triton.count, "bytes": r.triton.bytes} for r in rows},
    }


def check_budget(rows: Sequence[LedgerRow], budget: Dict[str, Any],
                 budget_path: str = DEFAULT_BUDGET) -> List[str]:
    """What is over budget (or has no budget), one message per problem; empty when all is in."""
    grid = budget.get("grid") or _grid_of(rows)
    fix = ("if this is intended, rewrite the budget: "
           + budget_command(grid, budget_path, budget.get("io_forward", "auto")))
    limits = budget.get("rows", {})
    problems = []
    for r in rows:
        limit = limits.get(r.key)
        if limit is None:
            problems.append(f"{r.key}: no budget in {budget_path} (counted {r.triton.count} "
                            f"launches, {r.triton.bytes:,} bytes); {fix}")
            continue
        if r.triton.count > limit["launches"]:
            names = ", ".join(l.name for l in r.triton.launches)
            problems.append(f"{r.key}: the Triton path makes {r.triton.count} launches ({names}), "
                            f"over its budget of {limit['launches']} in {budget_path}; {fix}")
        if r.triton.bytes > limit["bytes"]:
            problems.append(f"{r.key}: the Triton path moves {r.triton.bytes:,} bytes, over its "
                            f"budget of {limit['bytes']:,} bytes in {budget_path}; {fix}")
    return problems


def budget_grid(budget: Dict[str, Any]):
    """The (shapes, M, modes, dtypes, ops) a budget file covers, as ``build_ledger`` arguments."""
    from .shapes import resolve_shapes

    g = budget["grid"]
    return dict(shapes=resolve_shapes(g["shapes"]), ms=g["m"], modes=g["modes"],
                dtypes=g["dtypes"], ops=g["ops"])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser(prog: str = "python -m kphi3_bench.ledger") -> argparse.ArgumentParser:
    """The ledger's options: ``cli.build_ledger_parser`` (one family with the other commands)."""
    from .cli import build_ledger_parser

    return build_ledger_parser(prog)


def _write(path: str, text: str) -> None:
    """Written to a temporary file that then replaces ``path``: never half a file."""
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------
# What is printed: a summary first (per op and for the layer), every row and launch on request
# ----------------------------------------------------------------------------------------------


def _signature(row: LedgerRow, model: CostModel) -> tuple:
    """What a row predicts: equal signatures print once (bf16 and fp16 are the same numbers)."""
    t = row.times(model)
    return (row.triton.count, row.triton.bytes, tuple(round(v or 0.0, 6) for v in t.values()))


def dedupe(rows: Sequence[LedgerRow], model: CostModel) -> List[tuple]:
    """(dtype label, row) once per op, shape, M and mode whose dtypes predict the same: the label
    joins those dtypes (``bf16/fp16``)."""
    groups: Dict[tuple, List[LedgerRow]] = {}
    for r in rows:
        groups.setdefault((r.op, r.shape.name, r.m, r.mode), []).append(r)
    out = []
    for same_point in groups.values():
        by_signature: Dict[tuple, List[LedgerRow]] = {}
        for r in same_point:
            by_signature.setdefault(_signature(r, model), []).append(r)
        for equal in by_signature.values():
            out.append(("/".join(r.dtype for r in equal), equal[0]))
    return out


SUMMARY_HEADERS = ("family", "M", "op", "dtype", "triton", "reference", "dense", "floor",
                   "triton/dense", "triton/floor")


def summary_body(rows: Sequence[LedgerRow], model: CostModel) -> List[List[str]]:
    """Per family, M, op and dtype: the family's projections summed, forward + backward (what
    one decoder layer's grouped layers cost), for each path and the floor."""
    sums: Dict[tuple, Dict[str, float]] = {}
    for label, r in dedupe(rows, model):
        key = (r.shape.family, r.m, r.op, label)
        total = sums.setdefault(key, {"triton": 0.0, "reference": 0.0, "dense": 0.0,
                                      "floor": 0.0})
        for path, value in r.times(model).items():
            total[path] = None if value is None or total[path] is None else total[path] + value
    body = []
    for (family, m, op, label), t in sums.items():
        body.append([family, str(m), op, label, _us(t["triton"]), _us(t["reference"] or None),
                     _us(t["dense"] or None), _us(t["floor"]),
                     _ratio(t["triton"], t["dense"]), _ratio(t["triton"], t["floor"])])
    return body


def summary_text(rows: Sequence[LedgerRow], model: CostModel) -> str:
    """The summary printed first: every op per family and M, then the layer's lines."""
    from .report import render, wrap_lines

    body = sorted(summary_body(rows, model), key=lambda b: (b[0], int(b[1]), OPS.index(b[2])))
    headers = list(SUMMARY_HEADERS)
    labels = {b[3] for b in body}
    one_label = len(labels) == 1
    if one_label:  # every dtype predicts the same: say so once, not on every line
        body = [b[:3] + b[4:] for b in body]
        del headers[3]
    lines = wrap_lines([
        "Predicted H200 time in us per family, M and op: the family's four projections summed, "
        "forward + backward" + (f" ({labels.pop()}: the same prediction)" if one_label else
                                " (dtypes that predict the same share a line)") + ":"])
    lines.append(render(headers, body, right=range(3 if one_label else 4, len(headers))))
    io = [r for label, r in dedupe(rows, model) if r.op == "gpc_io"]
    layer = layer_totals(io, model, max(r.m for r in io)) if io else []
    if layer:  # it needs both modes
        lines += ["", "One decoder layer (gpc_io, the block the model runs) at the largest M:"]
        lines += wrap_lines(layer)
    return "\n".join(lines)


def detail_text(rows: Sequence[LedgerRow], model: CostModel) -> str:
    """Every row (equal dtypes once), then every launch of each row's Triton path."""
    from .report import render

    shown = dedupe(rows, model)
    body = table_body([r for _, r in shown], model)
    for cells, (label, _) in zip(body, shown):
        cells[5] = label
    lines = ["Every row:", render(TABLE_HEADERS, body, right=range(6, len(TABLE_HEADERS))), "",
             "Every launch of the Triton path (MB moved, predicted us):"]
    for label, r in shown:
        lines.append(row_key(r.op, r.shape.name, r.m, r.mode, label))
        for launch in r.triton.launches:
            config = f" [{launch.config}]" if launch.config else ""
            lines.append(f"  {launch.name}: {launch.bytes / 1e6:.2f} MB, "
                         f"{_us(model.time_us(launch.flops, launch.bytes))} us{config}")
    return "\n".join(lines)


WRITE_INTERVAL_S = 1.0  # the --out file is rewritten at most this often while rows are counted


class ThrottledWriter:
    """Rewrites ``path`` with the rows so far at most once a second (and always at the end), so
    that an interrupted run keeps what it counted without rewriting the file per row."""

    def __init__(self, path: str, model: CostModel, io_forward: str,
                 interval_s: Optional[float] = None):
        self.path, self.model, self.io_forward = path, model, io_forward
        self.interval_s = WRITE_INTERVAL_S if interval_s is None else interval_s
        self.last = 0.0

    def __call__(self, rows: Sequence[LedgerRow], force: bool = False) -> None:
        import time

        now = time.monotonic()
        if force or now - self.last >= self.interval_s:
            data = to_json(rows, self.model, self.io_forward)
            data["complete"] = force
            _write(self.path, dump_json(data))
            self.last = now


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m kphi3_bench.ledger") -> int:
    from .cli import UsageError, check_ledger_args, usage_error

    parser = build_parser(prog)
    args = parser.parse_args(argv)  # --help and argparse's own errors exit here, as always
    try:
        ms = check_ledger_args(args)  # before torch and the kernels are imported
        from . import shapes as shape_table

        chosen = shape_table.resolve_shapes(_csv(args.shapes))
    except (UsageError, ValueError) as err:
        return usage_error(parser, err)
    base = h200_model(args.launch_overhead_us)
    model = CostModel(args.peak_tflops or base.peak_tflops, args.peak_gbps or base.peak_gbps,
                      args.launch_overhead_us)

    status = 0
    if args.check_budget:
        with open(args.check_budget) as f:
            budget = json.load(f)
        rows = build_ledger(**budget_grid(budget), io_forward=budget.get("io_forward", "auto"),
                            baselines=False)
        problems = check_budget(rows, budget, args.check_budget)
        for msg in problems:
            print(f"over budget: {msg}", file=sys.stderr)
        print(f"budget {args.check_budget}: {len(rows)} rows, {len(problems)} over budget")
        status = 1 if problems else 0
        if not (args.json or args.markdown or args.write_budget):
            return status

    writer = ThrottledWriter(args.json, model, args.io_forward) if args.json else None
    try:
        rows = build_ledger(chosen, ms, _csv(args.modes), _csv(args.dtypes), _csv(args.ops),
                            args.io_forward, baselines=not args.triton_only, on_row=writer)
    except KeyboardInterrupt:
        kept = f"; the rows counted so far are in {args.json}" if writer else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    if not args.quiet:
        from .report import wrap_lines

        print(f"Cost model: max(FLOPs / {model.peak_tflops:g} TFLOP/s, bytes / "
              f"{model.peak_gbps:g} GB/s) + {model.overhead_us:g} us per launch:")
        print(f"a prediction, not a measurement. {len(rows)} rows "
              f"({', '.join(_csv(args.dtypes))}); --detail prints each, launch by launch.")
        print(summary_text(rows, model))
        if args.detail:
            print()
            print(detail_text(rows, model))
    if writer:
        writer(rows, force=True)
        print(f"wrote {args.json}")
    if args.markdown:
        dtypes = _csv(args.dtypes)
        shown = ["bf16"] if "bf16" in dtypes else dtypes[:1]
        _write(args.markdown, markdown(rows, model, args.io_forward, shown))
        print(f"wrote {args.markdown}")
    if args.write_budget:
        budget = budget_from_rows(rows, args.io_forward, args.write_budget)
        _write(args.write_budget, json.dumps(budget, indent=1, sort_keys=False) + "\n")
        print(f"wrote {args.write_budget} ({len(rows)} rows)")
    return status


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------------------------
# Measured against predicted (gpu_check)
# ----------------------------------------------------------------------------------------------

# The sweep's providers that the ledger models, and the ledger's path for each.
PROVIDER_PATHS = {"triton": "triton", "reference": "reference", "nn.Linear": "dense"}


def measured_over_predicted(rows: Sequence[Any], model: Optional[CostModel] = None
                            ) -> List[Dict[str, Any]]:
    """Each timed sweep row (``report.Row``) of a provider the ledger models, its measured median
    beside the ledger's prediction for the same op, shape, M, mode and dtype (``fwd+bwd`` is the
    sum of the two). The ratio measured / predicted is what a GPU run calibrates the model with."""
    from . import shapes as shape_table

    model = model or h200_model()
    cache: Dict[tuple, Dict[str, Optional[float]]] = {}
    out = []
    for r in rows:
        path = PROVIDER_PATHS.get(r.provider)
        if path is None or r.median_ms is None:
            continue
        # The sweep times the IO block (its ``op`` names the projection); a shape outside the
        # table (gpu_check's dry-run shapes) is rebuilt from the row, min = in / G giving G.
        shape = shape_table.SHAPES.get(r.shape) or shape_table.Shape(
            r.shape, r.family, r.op, r.in_features, r.out_features, r.in_features // r.groups)
        predicted = 0.0
        for mode in (LEDGER_MODES if r.mode == "fwd+bwd" else (r.mode,)):
            key = (r.shape, r.M, mode, r.dtype)
            if key not in cache:
                (row,) = build_ledger([shape], [r.M], [mode], [r.dtype], ["gpc_io"])
                cache[key] = row.times(model)
            t = cache[key][path]
            predicted = None if t is None or predicted is None else predicted + t
        if predicted is None:
            continue
        measured_us = r.median_ms * 1e3
        out.append({"provider": r.provider, "op": "gpc_io", "shape": r.shape, "M": r.M,
                    "mode": r.mode, "dtype": r.dtype, "measured_us": round(measured_us, 3),
                    "predicted_us": round(predicted, 3),
                    "measured_over_predicted": round(measured_us / predicted, 3)})
    return out


def format_measured(pairs: Sequence[Dict[str, Any]]) -> str:
    from .report import render

    head = ["provider", "shape", "M", "mode", "dtype", "measured us", "predicted us",
            "measured/predicted"]
    body = [[p["provider"], p["shape"], str(p["M"]), p["mode"], p["dtype"],
             _us(p["measured_us"]), _us(p["predicted_us"]),
             f"{p['measured_over_predicted']:.2f}"] for p in pairs]
    return render(head, body, right=range(5, len(head)))
