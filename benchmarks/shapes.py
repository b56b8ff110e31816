"""The shape table of the sweep and what each shape costs: FLOPs, minimum bytes, parameters.

A *shape* is one grouped projection of a model family (``kphi3-qkv`` is the released KPhi-3's
qkv projection, 1280 -> 3840 with G = 5). ``M`` is the number of tokens (rows of ``x``).

Counts follow docs/performance.md: the IO block's forward is ``4 * M * in * out / G`` FLOPs (two grouped
GEMMs of K = s = in/G each, i.e. one GEMM of K = 2s), a dense ``nn.Linear(in, out)`` is
``2 * M * in * out``; a backward computes both the input and the weight gradients, twice the
forward's FLOPs. Bytes are the minimum traffic: every operand read once and every result written
once (what a perfectly fused kernel moves); real kernels move more, which is what the
roofline fraction shows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from kphi3_kernels import group_count

MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` (``fp64`` for the oracle)."""
    names = {v: k for k, v in DTYPES.items()}
    names[torch.float64] = "fp64"
    return names.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True)
class Family:
    """A model family's projection sizes (Phi-3 layout: q, k and v with as many heads as kv heads)."""

    name: str
    hidden: int
    intermediate: int
    min_channels_per_group: int
    description: str


FAMILIES: Dict[str, Family] = {
    f.name: f
    for f in (
        Family("kphi3", 1280, 5120, 256,
               "the released KPhi-3 checkpoints (config.json: hidden 1280, intermediate 5120, min 256)"),
        Family("phi3-mini", 3072, 8192, 256,
               "a Phi-3-mini-sized KPhi-3 (hidden 3072, intermediate 8192, min 256)"),
    )
}


@dataclass(frozen=True)
class Shape:
    """One grouped projection: the IO block ``in_features -> out_features`` of a family."""

    name: str
    family: str
    op: str
    in_features: int
    out_features: int
    min_channels_per_group: int

    @property
    def groups(self) -> int:
        return group_count(self.in_features, self.out_features, self.min_channels_per_group)

    @property
    def in_per_group(self) -> int:
        return self.in_features // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_features // self.groups

    def describe(self) -> str:
        return f"{self.in_features}->{self.out_features} G={self.groups}"


def family_shapes(family: Family) -> List[Shape]:
    """qkv, o, gate_up and down of one family, in the order data flows through a decoder layer."""
    h, i, m = family.hidden, family.intermediate, family.min_channels_per_group
    return [
        Shape(f"{family.name}-{op}", family.name, op, cin, cout, m)
        for op, cin, cout in (("qkv", h, 3 * h), ("o", h, h), ("gate_up", h, 2 * i), ("down", i, h))
    ]


SHAPES: Dict[str, Shape] = {s.name: s for f in FAMILIES.values() for s in family_shapes(f)}

# Token counts: decode (1, 16) to training sizes. A 2-core CPU stops at 2048 unless asked.
DEFAULT_M_CUDA = (1, 16, 2048, 8192, 16384)
DEFAULT_M_CPU = (1, 16, 2048)

# --quick: G = 5 and G = 20 at the released shapes, a decode and a small prefill size.
QUICK_SHAPES = ("kphi3-qkv", "kphi3-down")
QUICK_M_CPU = (16, 256)
QUICK_M_CUDA = (16, 2048)
QUICK_MODES = ("fwd", "fwd+bwd")

_BACKWARD_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def resolve_shapes(names) -> List[Shape]:
    """Shape names or family names (``kphi3`` means its four shapes), in table order, no repeats.

    Raises a ValueError naming the unknown entry and listing the valid ones.
    """
    chosen: List[Shape] = []
    for raw in names:
        name = raw.strip()
        if name in FAMILIES:
            found = [s for s in SHAPES.values() if s.family == name]
        elif name in SHAPES:
            found = [SHAPES[name]]
        else:
            raise ValueError(
                f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}; "
                f"families: {', '.join(FAMILIES)}"
            )
        chosen.extend(s for s in found if s not in chosen)
    return chosen


def check_mode(mode: str) -> str:
    if mode not in _BACKWARD_FACTOR:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def flops(shape: Shape, M: int, mode: str, dense: bool = False) -> int:
    """FLOPs of one call: the IO block (``dense=False``) or ``nn.Linear(in, out)`` (``dense=True``)."""
    cin, cout = shape.in_features, shape.out_features
    forward = 2 * M * cin * cout if dense else 4 * M * cin * cout // shape.groups
    return forward * _BACKWARD_FACTOR[check_mode(mode)]


def params(shape: Shape, dense: bool = False) -> int:
    """Weights of the IO block (two ``[G, s, og]`` tensors) or of ``nn.Linear(in, out, bias=False)``."""
    cin, cout = shape.in_features, shape.out_features
    return cin * cout if dense else 2 * cin * cout // shape.groups


def min_bytes(shape: Shape, M: int, mode: str, elem_size: int, dense: bool = False) -> int:
    """The least memory traffic of one call, in bytes (each operand read once, each result written once).

    forward: read x, the weights; write y. backward: read dy, x, the weights; write dx and the
    weight gradients. fwd+bwd: both.
    """
    x, y, w = M * shape.in_features, M * shape.out_features, params(shape, dense)
    forward = x + w + y
    backward = y + x + w + x + w
    count = {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[check_mode(mode)]
    return count * elem_size


def ideal_speedup(shape: Shape) -> float:
    """nn.Linear time / IO-block time when both run at the roofline: G / 2 (docs/performance.md)."""
    return shape.groups / 2
