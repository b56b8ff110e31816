"""A differential fuzz test of the fused operators (``kphi3_kernels.fused``) on both backends.

Every case is drawn by its own ``random.Random(seed)``: the operator, the group count and the
per-group widths (never powers of two), a leading shape of rank 0-4 (zero rows and single rows
included), each tensor's memory layout (``tests/_utils.make_input``: contiguous, sliced,
transposed, expanded), the dtypes (fp32, fp16, some bf16; a residual of x's dtype or an fp32
stream with a half-precision branch), biases, eps, pad, the norm head's layout, which inputs
require grad and which outputs get an upstream gradient. bf16 runs Triton only on CUDA (the
interpreter's bf16 tl.dot is wrong and its bf16 stores truncate); on a CPU a bf16 case checks
the torch backend alone. The case id starts with ``seed<N>-``, so
``pytest tests/test_fused_fuzz.py -k seed17-`` reruns one case exactly.

The oracle is written here from the definitions (docs/layers.md, ``layout.py``'s docstring),
not taken from the library: the IO block as ``y[:, n*og:(n+1)*og] = x[:, n*s:(n+1)*s] @ W1[n] +
x[:, n::G] @ W2[n]``, the block-residue layout from its slot formula, RMSNorm and SiLU from their
formulas. It runs with autograd on float64 copies of the operands (forward and gradients with a
random upstream gradient), and each backend's output and gradients meet docs/numerics.md's
contract against it, judged by the suite's one verdict (``tests/_utils.contract_failures``):
fp32 under 1e-5; fp16 / bf16 under 1e-2 and no worse than 2x the plain path + 1e-4 (the plain
path, as ``check_parity`` picks it: this composition in the working dtypes for the ``torch``
backend, the ``torch`` backend for ``triton``), or, for a rounded intermediate numerics.md
names, its rounding bound instead of the ratio. Output shapes, dtypes and ``requires_grad``
(as torch's own ops give it) must agree between the backends and with the oracle, and the
residual stream's ``h`` is exactly torch's ``residual + x``.

Three kinds of case: ``parity`` (the above), ``dtype-error`` (a norm head whose normalized
``h = residual + x``, in the promoted dtype, and parameters differ in dtype, e.g. an fp32
residual with fp16 x and fp16 weights: a TypeError on both backends) and ``overflow`` (fp32 SiLU
products with a very negative gate and a huge up: where torch's ``up * F.silu(gate)`` and its
gradient are finite, the backend's are too, and the results match that product).

``KPHI3_FUZZ_CASES=N`` runs N cases instead of the default; ``KPHI3_FUZZ_SEED=S`` starts the
seeds at S.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from kphi3_kernels import fused

from _utils import (DEVICE, INTERPRETING, contract_failures, make_input, rel_error,
                    rounded_intermediate_bound)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
HALF = (F16, BF16)
DEFAULT_CASES = 500
CASE_COUNT = int(os.environ.get("KPHI3_FUZZ_CASES", DEFAULT_CASES))
FIRST_SEED = int(os.environ.get("KPHI3_FUZZ_SEED", 0))

HAVE_TRITON = INTERPRETING or torch.cuda.is_available()

# NumPy's warnings from the interpreter, on lanes the kernels discard or as torch's order has
# them: exp(-gate) overflowing to inf in the overflow cases (silu(gate) = gate / (1 + inf) = -0),
# inf * 0 in their gradients where torch's is not finite either, and rsqrt(0) of the masked
# rows past the last one with eps = 0.
pytestmark = [pytest.mark.filterwarnings(f"ignore:{what}:RuntimeWarning") for what in (
    "overflow encountered", "invalid value encountered", "divide by zero encountered")]

# Draw weights: the block operators cost the most under the interpreter and hold the most.
OP_WEIGHTS = {"silu_mul_to_layout": 1.5, "gpc_io_from_layout": 2.0, "silu_mul_gpc_io": 3.0,
              "rms_norm_gpc_io": 3.0, "rms_norm": 1.0, "add_rms_norm": 1.5}
BLOCK_OPS = ("gpc_io_from_layout", "silu_mul_gpc_io", "rms_norm_gpc_io")
SILU_OPS = ("silu_mul_to_layout", "silu_mul_gpc_io")
LAYOUTS = {"contig": 4, "sliced": 2, "transposed": 2, "expanded": 2}
NOT_POWERS_OF_TWO = [n for n in range(3, 320) if n & (n - 1)]
# (gate, up) pairs whose fp32 product up * silu(gate) is finite in torch while gate * up is not.
OVERFLOW_PAIRS = ((-88.0, 1e37), (-88.5, 3e38), (-1e20, 1e20), (-1e20, 1e37), (-100.0, 3e38))
# The interpreter's cost grows with G times the rows: caps on the rows of one case.
MAX_BLOCK_ROWS, MAX_NORM_ROWS = 24, 48


# --------------------------------------------------------------------------------------------
# Drawing a case
# --------------------------------------------------------------------------------------------


@dataclass
class FuzzCase:
    seed: int
    op: str
    kind: str = "parity"                  # "parity", "dtype-error" or "overflow"
    G: int = 1                            # groups (the norms: 1, C = s)
    s: int = 3                            # channels per group (the norms: all channels)
    og: int = 3                           # output channels per group
    lead: Tuple[int, ...] = ()
    dtype: torch.dtype = F32              # the main input: gate_up, t or x
    param_dtype: torch.dtype = F32        # block weights, biases, a norm head's norm weight
    norm_dtype: torch.dtype = F32         # rms_norm / add_rms_norm's weight
    residual_dtype: Optional[torch.dtype] = None   # None: no residual
    layouts: Dict[str, str] = field(default_factory=dict)  # memory layout by input name
    weight_t: bool = False                # block weights as transposed views
    bias: Tuple[bool, bool] = (False, False)
    eps: float = 1e-5
    pad: int = 8
    head_layout: str = "auto"
    frozen: Tuple[str, ...] = ()          # inputs that do not require grad
    used: Tuple[bool, ...] = (True,)      # which outputs get an upstream gradient
    scale: float = 1.0                    # the norms' input scale

    @property
    def C(self) -> int:
        return self.G * self.s

    @property
    def run(self) -> int:
        """R of the block-residue layout for this case's pad."""
        longest = -(-self.s // self.G)
        return -(-longest // self.pad) * self.pad

    def __str__(self) -> str:
        short = {F16: "fp16", BF16: "bf16", F32: "fp32"}
        parts = [f"seed{self.seed}", self.op]
        if self.kind != "parity":
            parts.append(self.kind)
        if self.op in ("rms_norm", "add_rms_norm"):
            parts.append(f"C{self.C}")
        else:
            parts.append(f"G{self.G}s{self.s}" + (f"og{self.og}" if self.op in BLOCK_OPS else ""))
        parts.append("M" + ("x".join(map(str, self.lead)) or "none"))
        parts.append(short[self.dtype])
        if self.residual_dtype is not None:
            parts.append("r" + short[self.residual_dtype])
        if self.op in BLOCK_OPS and self.param_dtype != self.dtype:
            parts.append("w" + short[self.param_dtype])
        if self.op in ("rms_norm", "add_rms_norm") and self.norm_dtype != self.dtype:
            parts.append("w" + short[self.norm_dtype])
        parts += [f"{k}-{v}" for k, v in self.layouts.items() if v != "contig"]
        return "-".join(parts)


def _draw_groups(rng: random.Random) -> int:
    # G > 1 mostly; large G rarely (its interpreted cost grows with G).
    u = rng.random()
    if u < 0.1:
        return 1
    if u < 0.75:
        return rng.randint(2, 6)
    if u < 0.9:
        return rng.randint(7, 12)
    return rng.randint(13, 20)


def _draw_width(rng: random.Random, most: int) -> int:
    """A width in 3..max(3, most) that is not a power of two."""
    choices = [n for n in NOT_POWERS_OF_TWO if n <= max(3, most)]
    return rng.choice(choices)


def _draw_lead(rng: random.Random, max_rows: int) -> Tuple[int, ...]:
    """Leading dims of rank 0-4 (0: a 1-D input), with zero rows or one row now and then."""
    rank = rng.choices((0, 1, 2, 3, 4), weights=(1, 8, 6, 3, 2))[0]
    if rank == 0:
        return ()
    u = rng.random()
    if u < 0.08:
        dims = [rng.randint(0, 3) for _ in range(rank)]
        dims[rng.randrange(rank)] = 0
        return tuple(dims)
    if u < 0.18:
        return (1,) * rank
    dims = [rng.randint(1, 7) for _ in range(rank)]
    while math.prod(dims) > max_rows:
        dims[dims.index(max(dims))] -= 1
    return tuple(dims)


def _draw_layout(rng: random.Random, lead) -> str:
    layout = rng.choices(list(LAYOUTS), weights=list(LAYOUTS.values()))[0]
    # make_input transposes the first two dims: a 1-D input has none to swap.
    return "contig" if layout == "transposed" and not lead else layout


def _draw_eps(rng: random.Random) -> float:
    return 0.0 if rng.random() < 0.05 else 10 ** rng.uniform(-8, 0)


def draw_case(seed: int) -> FuzzCase:
    rng = random.Random(seed)
    op = rng.choices(list(OP_WEIGHTS), weights=list(OP_WEIGHTS.values()))[0]
    case = FuzzCase(seed, op)
    case.dtype = rng.choices((F32, F16, BF16), weights=(45, 45, 10))[0]
    if op in SILU_OPS and rng.random() < 0.12:
        case.kind, case.dtype = "overflow", F32
    case.param_dtype = case.norm_dtype = case.dtype
    if op in ("rms_norm", "add_rms_norm"):
        case.s = _draw_width(rng, 319)
        case.lead = _draw_lead(rng, MAX_NORM_ROWS)
        if case.dtype in HALF and rng.random() < 0.3:
            case.norm_dtype = F32
    else:
        case.G = _draw_groups(rng)
        case.s = _draw_width(rng, min(24, 150 // case.G))
        case.og = _draw_width(rng, min(20, 200 // case.G))
        case.lead = _draw_lead(rng, MAX_BLOCK_ROWS)
        case.pad = 8 if rng.random() < 0.6 else rng.choice((1, 2, 3, 4, 5, 16))
        case.weight_t = rng.random() < 0.2
        case.bias = rng.choice(((False, False), (False, False), (True, False), (False, True),
                                (True, True), (True, True)))
    if op == "add_rms_norm" or (op in ("silu_mul_gpc_io", "rms_norm_gpc_io")
                                and rng.random() < 0.6):
        stream32 = case.dtype in HALF and rng.random() < 0.5
        case.residual_dtype = F32 if stream32 else case.dtype
    if op == "rms_norm_gpc_io":
        case.head_layout = rng.choice(("auto", "block-residue", "split"))
        if case.residual_dtype == F32 and case.dtype in HALF:
            case.param_dtype = F32  # h = residual + x is fp32, and so are the parameters
        if rng.random() < 0.12:
            # (x, residual, parameters) whose normalized h and parameters differ in dtype.
            case.kind = "dtype-error"
            case.dtype, case.residual_dtype, case.param_dtype = rng.choice(
                ((F16, F32, F16), (F16, F32, F16), (F32, None, F16), (F16, F16, F32),
                 (F16, None, F32)))
    if op in ("rms_norm", "add_rms_norm", "rms_norm_gpc_io"):
        case.eps = _draw_eps(rng)
        case.scale = 10 ** rng.uniform(-1, 1)
    names = input_names(case)
    case.layouts = {n: _draw_layout(rng, case.lead) for n in names if n in ACTIVATIONS}
    case.frozen = tuple(n for n in names if rng.random() < 0.15)
    if len(output_names(case)) == 2:
        case.used = rng.choice(((True, True), (True, True), (True, False), (False, True)))
    return case


# --------------------------------------------------------------------------------------------
# Operands and calls
# --------------------------------------------------------------------------------------------


# Inputs with leading dims (drawn memory layouts); the rest are parameters.
ACTIVATIONS = ("gate_up", "t", "x", "residual")


def input_names(case: FuzzCase) -> List[str]:
    """The op's tensor inputs, in call order (None-valued ones dropped)."""
    b1, b2 = case.bias
    block = ["weight1", "weight2"] + (["bias1"] if b1 else []) + (["bias2"] if b2 else [])
    res = ["residual"] if case.residual_dtype is not None else []
    return {
        "silu_mul_to_layout": ["gate_up"],
        "gpc_io_from_layout": ["t"] + block,
        "silu_mul_gpc_io": ["gate_up"] + block + res,
        "rms_norm_gpc_io": ["x", "norm_weight"] + block + res,
        "rms_norm": ["x", "weight"],
        "add_rms_norm": ["residual", "x", "weight"],
    }[case.op]


def output_names(case: FuzzCase) -> List[str]:
    if case.op == "rms_norm_gpc_io" and case.residual_dtype is not None:
        return ["h", "y"]
    return {"silu_mul_to_layout": ["t"], "rms_norm": ["n"],
            "add_rms_norm": ["h", "n"]}.get(case.op, ["y"])


def _input_shape(case: FuzzCase, name: str) -> Tuple[int, ...]:
    G, s, og, lead = case.G, case.s, case.og, case.lead
    return {"gate_up": (*lead, 2 * G * s), "t": (*lead, G * G * case.run), "x": (*lead, G * s),
            "residual": (*lead, G * og) if case.op == "silu_mul_gpc_io" else (*lead, G * s),
            "weight1": (G, s, og), "weight2": (G, s, og), "bias1": (G, og), "bias2": (G, og),
            "norm_weight": (G * s,), "weight": (G * s,)}[name]


def _input_dtype(case: FuzzCase, name: str) -> torch.dtype:
    if name == "residual":
        return case.residual_dtype
    if name == "weight":
        return case.norm_dtype
    if name in ("gate_up", "t", "x"):
        return case.dtype
    return case.param_dtype


def _param(shape, dtype, scale, offset=0.0, transposed=False) -> torch.Tensor:
    """A leaf parameter ``randn * scale + offset``; ``transposed``: a view of its last two dims
    swapped in memory (as tests/_utils.make_weight)."""
    if not transposed:
        return (torch.randn(*shape, device=DEVICE) * scale + offset).to(dtype).requires_grad_(True)
    base = torch.randn(*shape[:-2], shape[-1], shape[-2], device=DEVICE) * scale + offset
    return base.to(dtype).transpose(-1, -2).requires_grad_(True)


def _activation(case: FuzzCase, name: str) -> torch.Tensor:
    """make_input with the drawn layout, scaled for the norms (a view of a scaled leaf)."""
    x = make_input(case.lead, _input_shape(case, name)[-1], _input_dtype(case, name),
                   case.layouts[name])
    if case.scale == 1.0:
        return x
    with torch.no_grad():
        (x._base if x._base is not None else x).mul_(case.scale)
    return x


def make_operands(case: FuzzCase) -> Dict[str, torch.Tensor]:
    """The case's inputs by name; those in ``case.frozen`` do not require grad."""
    inputs = {}
    for name in input_names(case):
        shape, dtype = _input_shape(case, name), _input_dtype(case, name)
        if name in ACTIVATIONS:
            t = _activation(case, name)
            if case.kind == "overflow" and name == "gate_up":
                _plant_overflow_pairs(case, t)
        elif name in ("weight1", "weight2"):
            t = _param(shape, dtype, shape[1] ** -0.5, transposed=case.weight_t)
        elif name in ("bias1", "bias2"):
            t = _param(shape, dtype, 0.5)
        else:  # a norm weight around 1
            t = _param(shape, dtype, 0.5, offset=1.0)
        inputs[name] = t.detach() if name in case.frozen else t
    return inputs


def _plant_overflow_pairs(case: FuzzCase, gate_up: torch.Tensor) -> None:
    """Puts OVERFLOW_PAIRS in a few channels of every row (through the leaf: an expanded view
    cannot be written)."""
    rng = random.Random(case.seed + 1)
    C = case.C
    target = gate_up._base if case.layouts["gate_up"] == "expanded" else gate_up
    with torch.no_grad():
        for gate, up in OVERFLOW_PAIRS:
            c = rng.randrange(C)
            target[..., c] = gate
            target[..., C + c] = up


def call_op(case: FuzzCase, inputs: Dict[str, torch.Tensor], backend: str):
    """The library's operator on ``inputs``, its outputs as a tuple."""
    p = {n: inputs.get(n) for n in ("weight1", "weight2", "bias1", "bias2")}
    r = inputs.get("residual")
    if case.op == "silu_mul_to_layout":
        return (fused.silu_mul_to_layout(inputs["gate_up"], case.G, case.pad, backend=backend),)
    if case.op == "gpc_io_from_layout":
        return (fused.gpc_io_from_layout(inputs["t"], *p.values(), backend=backend),)
    if case.op == "silu_mul_gpc_io":
        return (fused.silu_mul_gpc_io(inputs["gate_up"], *p.values(), case.pad, residual=r,
                                      backend=backend),)
    if case.op == "rms_norm_gpc_io":
        out = fused.rms_norm_gpc_io(inputs["x"], inputs["norm_weight"], case.eps, *p.values(),
                                    case.pad, residual=r, layout=case.head_layout,
                                    backend=backend)
        return tuple(out) if r is not None else (out,)
    if case.op == "rms_norm":
        return (fused.rms_norm(inputs["x"], inputs["weight"], case.eps, backend=backend),)
    return tuple(fused.add_rms_norm(r, inputs["x"], inputs["weight"], case.eps,
                                    backend=backend))


# --------------------------------------------------------------------------------------------
# The definitions, composed here (any dtype: float64 for the oracle, the working dtypes for the
# plain path)
# --------------------------------------------------------------------------------------------


def silu(g: torch.Tensor) -> torch.Tensor:
    return g * torch.sigmoid(g)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``up * silu(gate)`` for ``gate_up = [gate | up]``."""
    C = gate_up.shape[-1] // 2
    return gate_up[..., C:] * silu(gate_up[..., :C])


def io_block(x, w1, w2, b1=None, b2=None) -> torch.Tensor:
    """``y[:, n*og:(n+1)*og] = x[:, n*s:(n+1)*s] @ W1[n] + x[:, n::G] @ W2[n]`` (+ biases)."""
    G, s, _ = w1.shape
    parts = []
    for n in range(G):
        y = x[..., n * s:(n + 1) * s] @ w1[n] + x[..., n::G] @ w2[n]
        if b1 is not None:
            y = y + b1[n]
        if b2 is not None:
            y = y + b2[n]
        parts.append(y)
    return torch.cat(parts, dim=-1)


def residue_slots(G: int, s: int, R: int) -> torch.Tensor:
    """Channel c's slot in the block-residue layout: ``(b*G + n)*R + r`` with ``b = c // s``,
    ``n = c % G``, ``r = (c % s) // G`` (layout.py's docstring)."""
    c = torch.arange(G * s, device=DEVICE)
    return ((c // s) * G + c % G) * R + (c % s) // G


def to_layout(x: torch.Tensor, G: int, s: int, R: int) -> torch.Tensor:
    out = x.new_zeros(*x.shape[:-1], G * G * R)
    return out.index_copy(-1, residue_slots(G, s, R), x)


def from_layout(t: torch.Tensor, G: int, s: int, R: int) -> torch.Tensor:
    return t[..., residue_slots(G, s, R)]


def rms_norm_def(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Phi-3's RMSNorm: statistics in fp32 at least, the normalized input rounded to x's dtype
    before the scale (a no-op in float64)."""
    acc = x.to(torch.promote_types(x.dtype, F32))
    normalized = acc * torch.rsqrt(acc.pow(2).mean(-1, keepdim=True) + eps)
    return w * normalized.to(x.dtype)


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """torch's own ``up * F.silu(gate)``: what the overflow cases hold the SiLU product to."""
    C = gate_up.shape[-1] // 2
    return gate_up[..., C:] * F.silu(gate_up[..., :C])


def definition(case: FuzzCase, inputs: Dict[str, torch.Tensor], silu_mul=silu_mul):
    """The op's outputs composed from the definitions, in the dtypes of ``inputs``
    (``silu_mul``: how the SiLU product is computed from gate_up)."""
    i = inputs
    block = (i["weight1"], i["weight2"], i.get("bias1"), i.get("bias2")) if "weight1" in i else ()
    r = i.get("residual")
    if case.op == "silu_mul_to_layout":
        return (to_layout(silu_mul(i["gate_up"]), case.G, case.s, case.run),)
    if case.op == "gpc_io_from_layout":
        return (io_block(from_layout(i["t"], case.G, case.s, case.run), *block),)
    if case.op == "silu_mul_gpc_io":
        y = io_block(silu_mul(i["gate_up"]), *block)
        return (y if r is None else r + y,)
    if case.op == "rms_norm_gpc_io":
        h = i["x"] if r is None else r + i["x"]
        y = io_block(rms_norm_def(h, i["norm_weight"], case.eps), *block)
        return (y,) if r is None else (h, y)
    if case.op == "rms_norm":
        return (rms_norm_def(i["x"], i["weight"], case.eps),)
    h = r + i["x"]
    return h, rms_norm_def(h, i["weight"], case.eps)


# --------------------------------------------------------------------------------------------
# The contract: dtypes, bounds
# --------------------------------------------------------------------------------------------


def stream_dtype(case: FuzzCase) -> torch.dtype:
    """The dtype of ``h = residual + x``, as ``+`` promotes it."""
    if case.residual_dtype is None:
        return case.dtype
    return torch.promote_types(case.residual_dtype, case.dtype)


def output_dtypes(case: FuzzCase) -> List[torch.dtype]:
    if case.op == "silu_mul_gpc_io" and case.residual_dtype is not None:
        return [torch.promote_types(case.dtype, case.residual_dtype)]
    if case.op == "rms_norm_gpc_io":
        return [stream_dtype(case), case.param_dtype][-len(output_names(case)):]
    if case.op == "rms_norm":
        return [torch.promote_types(case.dtype, case.norm_dtype)]
    if case.op == "add_rms_norm":
        h = stream_dtype(case)
        return [h, torch.promote_types(h, case.norm_dtype)]
    return [case.dtype]


def output_shapes(case: FuzzCase) -> List[Tuple[int, ...]]:
    width = {"silu_mul_to_layout": case.G * case.G * case.run, "rms_norm": case.C,
             "add_rms_norm": case.C}.get(case.op, case.G * case.og)
    shapes = [(*case.lead, width)]
    if len(output_names(case)) == 2:
        shapes.insert(0, (*case.lead, case.C))  # h
    return shapes


def compute_dtype(case: FuzzCase) -> torch.dtype:
    """The dtype every result's computation rounds to on the way: the block's operands, or the
    norm's input (the torch backend rounds the normalized input to it)."""
    if case.op in ("rms_norm_gpc_io", "add_rms_norm"):
        return stream_dtype(case)
    return case.dtype


def rounded_intermediate_names(case: FuzzCase) -> Tuple[str, ...]:
    """Triton results with a rounded intermediate (numerics.md): the input gradients of the
    fused blocks in half precision, whose W2 term is written in the operand dtype."""
    if case.param_dtype not in HALF:
        return ()
    return {"gpc_io_from_layout": ("dt",), "silu_mul_gpc_io": ("dgate_up",),
            "rms_norm_gpc_io": ("dx", "dnorm_weight", "dresidual")}.get(case.op, ())


# --------------------------------------------------------------------------------------------
# Running: outputs and gradients
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    outs: List[torch.Tensor]
    grads: Dict[str, Optional[torch.Tensor]]   # "d<input>" -> gradient (None: none reaches it)

    def results(self, case: FuzzCase) -> Dict[str, Optional[torch.Tensor]]:
        return {**dict(zip(output_names(case), self.outs)), **self.grads}


def forward_backward(fn, inputs: Dict[str, torch.Tensor], douts) -> Run:
    """``fn(inputs)`` and the gradients of ``sum <out, dout>`` over the outputs that have a
    ``dout`` and a graph, with respect to every input that requires grad."""
    outs = list(fn(inputs))
    targets = [(n, t) for n, t in inputs.items() if t.requires_grad]
    used = [(o, d) for o, d in zip(outs, douts) if d is not None and o.requires_grad]
    grads = {f"d{n}": None for n, _ in targets}
    if targets and used:
        got = torch.autograd.grad([o for o, _ in used], [t for _, t in targets],
                                  [d.to(o.dtype) for o, d in used], allow_unused=True)
        grads = {f"d{n}": g for (n, _), g in zip(targets, got)}
    return Run(outs, grads)


def float64_copies(inputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {n: t.detach().to(F64).requires_grad_(t.requires_grad) for n, t in inputs.items()}


def second_term_gradients(case: FuzzCase, inputs: Dict[str, torch.Tensor], douts):
    """The input gradients through W2 alone (W1 zero, no biases, only y's upstream gradient):
    the term the Triton backward rounds to the operand dtype, in float64."""
    copies = float64_copies(inputs)
    copies["weight1"] = torch.zeros_like(copies["weight1"])
    copies = {n: t for n, t in copies.items() if n not in ("bias1", "bias2")}
    douts = [None] * (len(douts) - 1) + [douts[-1]]
    return forward_backward(lambda i: definition(case, i), copies,
                            [None if d is None else d.to(F64) for d in douts]).grads


def draw_douts(case: FuzzCase) -> List[Optional[torch.Tensor]]:
    return [torch.randn(shape, device=DEVICE).to(dtype) if use else None
            for shape, dtype, use in zip(output_shapes(case), output_dtypes(case), case.used)]


# --------------------------------------------------------------------------------------------
# Checks (each returns a list of problems, so that one case reports everything it found)
# --------------------------------------------------------------------------------------------


def check_metadata(case: FuzzCase, inputs, run: Run, want: Run) -> List[str]:
    problems = []
    if len(run.outs) != len(output_names(case)):
        return [f"{len(run.outs)} outputs, expected {len(output_names(case))}"]
    for name, out, out64, dtype, shape in zip(output_names(case), run.outs, want.outs,
                                              output_dtypes(case), output_shapes(case)):
        if out.dtype != dtype or tuple(out.shape) != shape:
            problems.append(f"{name}: {out.dtype} {tuple(out.shape)}, expected {dtype} {shape}")
        # requires_grad as torch's own ops give it (numerics.md): the oracle's.
        if out.requires_grad != out64.requires_grad:
            problems.append(f"{name}: requires_grad {out.requires_grad}, torch's ops give "
                            f"{out64.requires_grad}")
    for name, g in run.grads.items():
        g64 = want.grads[name]
        if (g is None) != (g64 is None):
            problems.append(f"{name}: no gradient, the oracle has one" if g is None else
                            f"{name}: a gradient, none in the oracle")
        elif g is not None:
            t = inputs[name[1:]]
            if g.dtype != t.dtype or g.shape != t.shape:
                problems.append(f"{name}: {g.dtype} {tuple(g.shape)}, expected the input's "
                                f"{t.dtype} {tuple(t.shape)}")
    return problems


def result_dtype(case: FuzzCase, inputs, name: str) -> torch.dtype:
    if name.startswith("d"):
        return inputs[name[1:]].dtype
    return output_dtypes(case)[output_names(case).index(name)]


def bound_dtype(case: FuzzCase, result_dtype: torch.dtype) -> torch.dtype:
    """The dtype whose bound a result meets: fp32, or the half-precision dtype it is computed
    in or rounded to (an fp32 output of an fp16 block, an fp32 weight gradient of an fp16
    norm: the half bound)."""
    for dtype in (compute_dtype(case), result_dtype):
        if dtype in HALF:
            return dtype
    return F32


def check_errors(case: FuzzCase, inputs, douts, backend: str, run: Run, want: Run,
                 baseline: Optional[Run]) -> List[str]:
    """Every result against the reference (the float64 oracle) by the suite's one verdict,
    ``contract_failure``: the plain path's error for the ratio, or a rounded intermediate's
    bound instead of it."""
    got, ref = run.results(case), want.results(case)
    errs = {n: rel_error(got[n], ref[n]) for n in ref
            if ref[n] is not None and got.get(n) is not None}
    dtypes = {n: bound_dtype(case, result_dtype(case, inputs, n)) for n in errs}
    half = [n for n in errs if dtypes[n] != F32]
    base_results = baseline.results(case) if baseline is not None else {}
    # No plain path to compare with (the torch backend failed, reported apart): 1e-2 alone.
    base = {n: rel_error(base_results[n], ref[n]) if base_results.get(n) is not None
            else math.inf for n in half}
    rounding = {}
    if backend == "triton" and douts[-1] is not None:
        names = [n for n in rounded_intermediate_names(case) if n in errs]
        terms = second_term_gradients(case, inputs, douts) if names else {}
        rounding = {n: rounded_intermediate_bound(case.param_dtype, ref[n], terms[n])
                    for n in names}
    failures = contract_failures(errs, dtypes, base, rounding)
    return [f"{n}: {why}" for n, why in failures.items()]


def check_exact_parts(case: FuzzCase, inputs, douts, run: Run) -> List[str]:
    """What is exact by contract: ``h`` is ``residual + x`` as ``+`` rounds it, the MLP tail's
    residual gradient is the upstream gradient, the layout's padding (and its gradient) zero."""
    problems = []
    names = output_names(case)
    if "h" in names:
        h = run.outs[names.index("h")]
        want = (inputs["residual"] + inputs["x"]).detach()
        if h.dtype == want.dtype and not torch.equal(h.detach(), want):
            problems.append(f"h differs from residual + x (max abs diff "
                            f"{(h.detach().double() - want.double()).abs().max().item():.3g})")
    if case.op == "silu_mul_gpc_io" and run.grads.get("dresidual") is not None:
        dr, dy = run.grads["dresidual"], douts[0]
        if dr.dtype == inputs["residual"].dtype and not torch.equal(dr, dy.to(dr.dtype)):
            problems.append("dresidual is not the upstream gradient")
    padding = torch.ones(case.G * case.G * case.run, dtype=torch.bool, device=DEVICE)
    padding[residue_slots(case.G, case.s, case.run)] = False
    for what, t in (("t's padding", run.outs[0] if case.op == "silu_mul_to_layout" else None),
                    ("dt's padding", run.grads.get("dt"))):
        if t is not None and t[..., padding].numel() and bool((t[..., padding] != 0).any()):
            problems.append(f"{what} is not all zeros")
    return problems


def check_overflow(case: FuzzCase, inputs, run: Run, torch32: Run) -> List[str]:
    """Where torch's fp32 ``up * F.silu(gate)`` composition (``torch32``) is finite, the
    backend's outputs and gate_up's gradient are finite too."""
    problems = []
    gu = inputs["gate_up"].detach()
    for name, got, want in [*zip(output_names(case), run.outs, torch32.outs),
                            ("dgate_up", run.grads.get("dgate_up"), torch32.grads.get("dgate_up"))]:
        if got is None or want is None:
            continue
        bad = torch.isfinite(want) & ~torch.isfinite(got.detach())
        if bad.any():
            problems.append(f"overflow: {name} has {bad.sum().item()} non-finite elements where "
                            f"torch's is finite{_overflow_example(case, name, gu, got, bad)}")
    return problems


def _overflow_example(case: FuzzCase, name: str, gate_up, got, bad) -> str:
    """One offending element, with its gate and up where it maps to one channel."""
    idx = tuple(bad.nonzero()[0].tolist())
    text = f" (e.g. {name}[{', '.join(map(str, idx))}] = {got.detach()[idx].item()}"
    channel = None
    if name == "t":
        hit = (residue_slots(case.G, case.s, case.run) == idx[-1]).nonzero()
        channel = hit[0].item() if hit.numel() else None
    elif name == "dgate_up":
        channel = idx[-1] % case.C
    if channel is not None:
        row = idx[:-1]
        text += (f": gate {gate_up[(*row, channel)].item():g}, "
                 f"up {gate_up[(*row, case.C + channel)].item():g}")
    return text + ")"


def compare_backends(case: FuzzCase, runs: Dict[str, Run]) -> List[str]:
    """Outputs' shapes, dtypes, requires_grad, and which gradients exist, backend for backend."""
    a, b = runs["torch"], runs["triton"]
    problems = []
    for name, x, y in zip(output_names(case), a.outs, b.outs):
        meta_x = (tuple(x.shape), x.dtype, x.requires_grad)
        meta_y = (tuple(y.shape), y.dtype, y.requires_grad)
        if meta_x != meta_y:
            problems.append(f"{name}: torch (shape, dtype, requires_grad) {meta_x}, triton "
                            f"{meta_y}")
    for name in a.grads:
        x, y = a.grads[name], b.grads[name]
        meta_x = None if x is None else (tuple(x.shape), x.dtype)
        meta_y = None if y is None else (tuple(y.shape), y.dtype)
        if meta_x != meta_y:
            problems.append(f"{name}: torch {meta_x}, triton {meta_y}")
    return problems


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def backends_for(case: FuzzCase) -> Tuple[str, ...]:
    """Both backends, except Triton in bf16 off CUDA: the interpreter's bf16 tl.dot is wrong
    (docs/numerics.md) and its fp32 -> bf16 stores truncate instead of rounding to nearest.
    The torch backend's bf16 contract is still checked."""
    if not HAVE_TRITON or (case.dtype == BF16 and not torch.cuda.is_available()):
        return ("torch",)
    return ("torch", "triton")


def check_dtype_error(case: FuzzCase) -> List[str]:
    """A norm head whose normalized input (h = residual + x, promoted) and parameters differ
    in dtype: a TypeError on every backend."""
    problems = []
    for backend in backends_for(case):
        inputs = make_operands(case)
        try:
            call_op(case, inputs, backend)
        except TypeError:
            continue
        except Exception as err:  # noqa: BLE001 - reported, not raised
            problems.append(f"{backend}: {type(err).__name__} instead of TypeError: {err}")
            continue
        problems.append(f"{backend}: no TypeError for h = {case.residual_dtype} + {case.dtype} "
                        f"with {case.param_dtype} weights")
    return problems


def check_case(case: FuzzCase) -> List[str]:
    """A parity or overflow case on every backend: what breaks the contract, as text."""
    inputs = make_operands(case)
    douts = draw_douts(case)
    douts64 = [None if d is None else d.to(F64) for d in douts]
    want = forward_backward(lambda i: definition(case, i), float64_copies(inputs), douts64)
    plain = forward_backward(lambda i: definition(case, i), inputs, douts)
    reference = want
    if case.kind == "overflow":
        # Held to torch's fp32 product (float64's differs where fp32's sigmoid underflows),
        # taken as a constant: gate_up's gradient is checked for finiteness alone.
        torch32 = forward_backward(lambda i: definition(case, i, torch_silu_mul), inputs, douts)
        product = torch_silu_mul(inputs["gate_up"].detach()).to(F64)
        reference = forward_backward(lambda i: definition(case, i, lambda _: product),
                                     float64_copies(inputs), douts64)
    runs: Dict[str, Run] = {}
    problems = []
    for backend in backends_for(case):
        try:
            run = forward_backward(lambda i: call_op(case, i, backend), inputs, douts)
        except Exception as err:  # noqa: BLE001 - reported with the case
            problems.append(f"{backend}: raised {type(err).__name__}: {err}")
            continue
        runs[backend] = run
        found = check_metadata(case, inputs, run, want)
        baseline = plain if backend == "torch" else runs.get("torch")
        if not found:
            found = check_errors(case, inputs, douts, backend, run, reference, baseline)
            found += check_exact_parts(case, inputs, douts, run)
        if case.kind == "overflow":
            found = check_overflow(case, inputs, run, torch32) + found
        problems += [f"{backend}: {p}" for p in found]
    if len(runs) == 2:
        problems += [f"backends: {p}" for p in compare_backends(case, runs)]
    return problems


CASES = [draw_case(seed) for seed in range(FIRST_SEED, FIRST_SEED + CASE_COUNT)]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_operator_matches_its_definition(case: FuzzCase):
    torch.manual_seed(case.seed)
    if case.kind == "dtype-error":
        problems = check_dtype_error(case)
    else:
        problems = check_case(case)
    assert not problems, f"{case}:\n  " + "\n  ".join(problems)


def test_the_draws_cover_every_kind_of_case():
    """The default draw holds every operator, every dtype, residuals of each dtype, every
    memory layout, G = 1 and large G, zero and single rows, and each case kind."""
    if CASE_COUNT < DEFAULT_CASES:
        pytest.skip("fewer cases than the default draw")
    seen = set()
    for c in CASES:
        seen |= {c.op, c.kind, c.dtype, ("residual", c.residual_dtype, c.dtype),
                 *c.layouts.values()}
        if c.op in BLOCK_OPS:
            seen.add(("G1",) if c.G == 1 else ("G>1",))
        if c.op == "rms_norm_gpc_io" and c.kind == "parity" and c.param_dtype != c.dtype:
            seen.add("norm head on an fp32 stream")
        rows = math.prod(c.lead)
        seen.add("zero rows" if rows == 0 else "one row" if rows == 1 else "rows")
        if c.G >= 13:
            seen.add("large G")
    need = {*OP_WEIGHTS, "parity", "dtype-error", "overflow", F32, F16, BF16, *LAYOUTS,
            ("residual", F32, F16), ("residual", F16, F16), ("residual", F32, F32),
            ("G1",), ("G>1",), "zero rows", "one row", "large G", "norm head on an fp32 stream"}
    assert need <= seen, need - seen
