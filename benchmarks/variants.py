"""The IO block's forward variants side by side, with the roofline floor of each.

Two designs compute ``first(x) + second(interleave(x))`` on the Triton backend
(``kphi3_kernels.ops.triton_impl.IO_FORWARD``):

- ``split`` (the default above M = 64, and wherever ``xi`` is kept for the backward): a
  de-interleave pass writes ``xi`` (group n = ``x[:, n::G]``), then one
  grouped GEMM with K = 2s reads ``x`` and ``xi`` with 16-byte pipelined loads. Its least
  traffic is the floor plus three passes over x: the pre-pass reads x and writes xi, and the
  GEMM reads xi besides x.
- ``fused`` (the default at M <= 64 without a backward): one launch reading ``x[:, n::G]``
  in place. Its least traffic is the floor (DRAM
  reads x once; the G re-reads of each row hit L2), but the strided operand is fetched with
  2-byte loads, so its time depends on load throughput that only a GPU run measures.

``time_variants`` times both next to ``nn.Linear``, the plain reference and ``torch.compile`` of
the reference, all in one run, forward only (the variants differ only there), and returns tidy
rows with each variant's FLOPs, bytes and predicted floor at the roofline given.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Sequence

import torch

from kphi3_kernels import reference

from . import parity
from . import shapes as shape_table
from .shapes import Shape
from .timing import bench_many

VARIANTS = ("split", "fused")


def variant_bytes(shape: Shape, M: int, variant: str, elem_size: int) -> int:
    """Least DRAM traffic of one forward of ``variant``: ``"split"``, ``"fused"``, ``"floor"`` (any
    one-pass computation, e.g. the reference's) or ``"dense"`` (nn.Linear)."""
    if variant == "dense":
        return shape_table.min_bytes(shape, M, "fwd", elem_size, dense=True)
    floor = shape_table.min_bytes(shape, M, "fwd", elem_size)
    extra_x_passes = {"split": 3, "fused": 0, "floor": 0}[variant]
    return floor + extra_x_passes * M * shape.in_features * elem_size


def floor_ms(flops: int, nbytes: int, tflops: float, gbps: float) -> float:
    """max(compute time, memory time) of one launch at the ceilings, in ms."""
    return max(flops / (tflops * 1e12), nbytes / (gbps * 1e9)) * 1e3


def variant_floor_ms(shape: Shape, M: int, variant: str, elem_size: int, tflops: float,
                     gbps: float) -> float:
    """The floor of one forward of ``variant``. ``split`` is two launches that cannot overlap:
    the pre-pass (read x, write xi: bandwidth only) and the GEMM (its FLOPs; the floor bytes
    plus the read of xi)."""
    dense = variant == "dense"
    flops = shape_table.flops(shape, M, "fwd", dense=dense)
    if variant != "split":
        return floor_ms(flops, variant_bytes(shape, M, variant, elem_size), tflops, gbps)
    x_bytes = M * shape.in_features * elem_size
    prepass = floor_ms(0, 2 * x_bytes, tflops, gbps)
    gemm = floor_ms(flops, shape_table.min_bytes(shape, M, "fwd", elem_size) + x_bytes,
                    tflops, gbps)
    return prepass + gemm


@contextlib.contextmanager
def io_forward(variant: str) -> Iterator[None]:
    from kphi3_kernels.ops import triton_impl

    previous = triton_impl.IO_FORWARD
    triton_impl.IO_FORWARD = variant
    try:
        yield
    finally:
        triton_impl.IO_FORWARD = previous


def _callables(shape: Shape, M: int, dtype: torch.dtype, device: torch.device,
               with_compile: bool) -> Dict[str, object]:
    from kphi3_kernels.ops import triton_impl

    g = torch.Generator(device=device).manual_seed(0)
    G, s, og = shape.groups, shape.in_per_group, shape.out_per_group
    x = torch.randn(M, shape.in_features, generator=g, device=device).to(dtype)
    w1 = (torch.randn(G, s, og, generator=g, device=device) * (2 * s) ** -0.5).to(dtype)
    w2 = (torch.randn(G, s, og, generator=g, device=device) * (2 * s) ** -0.5).to(dtype)
    dense = torch.nn.Linear(shape.in_features, shape.out_features, bias=False,
                            device=device, dtype=dtype)

    def variant(name):
        def run():
            with io_forward(name):
                return triton_impl.gpc_io_fwd(x, w1, w2)[0]
        return run

    fns = {f"triton-{v}": variant(v) for v in VARIANTS}
    fns["reference"] = lambda: reference.gpc_io(x, w1, w2)
    if with_compile:
        compiled = torch.compile(reference.gpc_io)
        fns["torch.compile"] = lambda: compiled(x, w1, w2)
    fns["nn.Linear"] = lambda: dense(x)
    return fns, (x, w1, w2)


def time_variants(device: torch.device, dtype: torch.dtype, shapes_: Sequence[Shape],
                  Ms: Sequence[int], tflops: float, gbps: float, with_compile: bool = True,
                  budget_s: float = 1.0) -> List[dict]:
    """One row per (shape, M, provider): median/p20/p80 ms, ratio to nn.Linear, parity of each
    Triton variant with the reference (relative error), FLOPs, bytes and floor."""
    from kphi3_kernels.ops import triton_impl

    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for shape in shapes_:
        for M in Ms:
            fns, (x, w1, w2) = _callables(shape, M, dtype, device, with_compile)
            with torch.no_grad():
                want = reference.gpc_io(x.double(), w1.double(), w2.double())
                errors = {}
                for v in VARIANTS:
                    with io_forward(v):
                        got = triton_impl.gpc_io_fwd(x, w1, w2)[0].double()
                    errors[f"triton-{v}"] = float((got - want).norm() / want.norm())
                timings = bench_many(fns, device, {}, budget_s=budget_s)
            dense_ms = timings["nn.Linear"].median_ms
            for name, t in timings.items():
                kind = ("dense" if name == "nn.Linear"
                        else name.split("-", 1)[1] if name.startswith("triton-") else "floor")
                flops = shape_table.flops(shape, M, "fwd", dense=(kind == "dense"))
                nbytes = variant_bytes(shape, M, kind, elem)
                rows.append(dict(
                    shape=shape.name, M=M, provider=name, dtype=str(dtype).replace("torch.", ""),
                    median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                    vs_linear=t.median_ms / dense_ms if dense_ms else None,
                    rel_error=errors.get(name), flops=flops, bytes=nbytes,
                    floor_ms=variant_floor_ms(shape, M, kind, elem, tflops, gbps),
                    method=t.method,
                ))
            del fns
    return rows


def predicted_floors(shapes_: Sequence[Shape], M: int, elem_size: int, tflops: float,
                     gbps: float) -> List[dict]:
    """Each variant's floor as a fraction of nn.Linear's floor: a prediction, not a measurement."""
    out = []
    for shape in shapes_:
        dense = variant_floor_ms(shape, M, "dense", elem_size, tflops, gbps)
        for v in VARIANTS:
            f = variant_floor_ms(shape, M, v, elem_size, tflops, gbps)
            out.append(dict(shape=shape.name, M=M, variant=v, floor_ms=f, dense_floor_ms=dense,
                            fraction_of_linear=f / dense))
    return out


def format_rows(rows: List[dict]) -> str:
    lines = [f"{'shape':<14}{'M':>6}  {'provider':<15}{'median ms':>10}{'p20':>9}{'p80':>9}"
             f"{'x Linear':>9}{'floor ms':>10}{'rel err':>10}"]
    for r in rows:
        err = "" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
        ratio = "" if r["vs_linear"] is None else f"{r['vs_linear']:.3f}"
        lines.append(f"{r['shape']:<14}{r['M']:>6}  {r['provider']:<15}{r['median_ms']:>10.4f}"
                     f"{r['p20_ms']:>9.4f}{r['p80_ms']:>9.4f}{ratio:>9}{r['floor_ms']:>10.4f}{err:>10}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The MLP tail: down_proj(up * silu(gate)) from gate_up_proj's output, three designs
# --------------------------------------------------------------------------------------------
# - ``op-level``: ``silu(gate) * up`` in channel order, then the IO block (``gpc_io``): its forward
#   de-interleaves the input, its backward gathers the interleaved half of the gradient back.
# - ``two-operators``: the producer writes the block-residue layout (``silu_mul_to_layout``) and
#   the consumer reads it (``gpc_io_from_layout``); in the backward the layout's gradient is
#   written whole (``gpc_io_layout_bwd_dt_second`` + ``gpc_io_layout_bwd_dt``) and read back by
#   the activation's own backward (``silu_mul_layout_bwd``): the composable form, for a layer
#   whose activation and block are separate modules.
# - ``one-operator``: ``silu_mul_gpc_io``, what the fused decoder runs: the layout's gradient is
#   never written; the activation's backward runs in the input gradient's epilogue.
MLP_TAIL_DESIGNS = ("op-level", "two-operators", "one-operator")


def mlp_tail_callables(shape: Shape, M: int, dtype: torch.dtype, device: torch.device,
                       backend: str = "auto"):
    """``({design: forward}, inputs)``: each forward maps ``(gate_up, W1, W2)`` to down_proj's
    output; ``shape`` is a down_proj shape (its input is the MLP's intermediate width)."""
    import torch.nn.functional as F

    from kphi3_kernels import fused, gpc_io

    g = torch.Generator(device=device).manual_seed(0)
    G, s, og = shape.groups, shape.in_per_group, shape.out_per_group
    gate_up = torch.randn(M, 2 * shape.in_features, generator=g, device=device).to(dtype)
    w1 = (torch.randn(G, s, og, generator=g, device=device) * (2 * s) ** -0.5).to(dtype)
    w2 = (torch.randn(G, s, og, generator=g, device=device) * (2 * s) ** -0.5).to(dtype)

    def op_level(gu, a, b):
        gate, up = gu.chunk(2, dim=-1)
        return gpc_io(up * F.silu(gate), a, b, backend=backend)

    def two_operators(gu, a, b):
        return fused.gpc_io_from_layout(fused.silu_mul_to_layout(gu, G, backend=backend), a, b,
                                        backend=backend)

    def one_operator(gu, a, b):
        return fused.silu_mul_gpc_io(gu, a, b, backend=backend)

    designs = dict(zip(MLP_TAIL_DESIGNS, (op_level, two_operators, one_operator)))
    return designs, (gate_up, w1, w2)


def time_mlp_tail(device: torch.device, dtype: torch.dtype, shapes_: Sequence[Shape],
                  Ms: Sequence[int], budget_s: float = 1.0, backend: str = "auto") -> List[dict]:
    """One row per (shape, M, design): the training step's MLP tail (forward and backward of
    gate_up and both weights), median/p20/p80 ms, ratio to the op-level design, and each
    design's relative error against the float64 op-level composition (forward output and the
    gate_up gradient)."""
    rows = []
    for shape in shapes_:
        for M in Ms:
            designs, inputs = mlp_tail_callables(shape, M, dtype, device, backend)
            leaves = [t.detach().requires_grad_() for t in inputs]
            dy = torch.randn(M, shape.out_features, device=device, dtype=dtype)
            oracle = [t.detach().double().requires_grad_() for t in inputs]
            want = _float64_tail(*oracle)
            want.backward(dy.double())
            errors = {}
            for name, fn in designs.items():
                got = fn(*leaves)
                got.backward(dy)
                errors[name] = max(parity.rel_err(got, want),
                                   parity.rel_err(leaves[0].grad, oracle[0].grad))
                for t in leaves:
                    t.grad = None

            def step(fn):
                def run():
                    fn(*leaves).backward(dy)
                return run

            timings = bench_many({n: step(f) for n, f in designs.items()}, device,
                                 {n: leaves for n in designs}, budget_s=budget_s)
            base = timings["op-level"].median_ms
            for name, t in timings.items():
                rows.append(dict(
                    shape=shape.name, M=M, provider=name, dtype=str(dtype).replace("torch.", ""),
                    median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                    vs_op_level=t.median_ms / base if base else None, rel_error=errors[name],
                    method=t.method,
                ))
    return rows


def _float64_tail(gate_up, w1, w2):
    gate, up = gate_up.chunk(2, dim=-1)
    return reference.gpc_io(up * torch.nn.functional.silu(gate), w1, w2)
