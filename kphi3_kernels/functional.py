"""Functional entry points: validate, apply autocast, flatten to 2-D, pick the backend, and call
the registered operator of that backend (``ops/custom_ops.py``, ``torch.ops.kphi3``).

The checks (``_checks.py``, shared with ``fused.py``) are the one validation layer of the
package, for both backends: every check runs before any operator is called (so before any
kernel launches), also under ``FakeTensorMode`` and while ``torch.compile`` traces, and each
error names the argument and the problem.
Zero-size dimensions: any number of rows (``M = 0`` included) works like ``nn.Linear``; zero
groups or zero channels per group are refused with a ValueError. ``interleave`` of a tensor with
no channels returns the empty result (any step divides 0), like torch's own ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from .ops import custom_ops

# The checks live in ``_checks.py`` (shared with ``fused.py``); the names ``modules.py`` uses:
_check_input, _channels, _flatten = C.check_input, C.channel_count, C.flatten


def grouped_linear(x, weight, bias=None, *, backend: Optional[str] = None) -> torch.Tensor:
    """GroupedLinearFast's function: ``weight`` ``[G, in/G, out/G]``, ``bias`` ``[G, out/G]``."""
    op = "grouped_linear"
    G, s, og = C.check_weight(weight, op)
    C.check_input(x, G * s, op)
    C.check_bias(bias, G, og, op)
    name = C.backend_for(x, backend, op)
    x, (weight, bias) = C.cast_params(x, (weight, bias), op)
    y = custom_ops.grouped_linear(C.flatten(x), weight, bias, backend=name)
    return y.reshape(*x.shape[:-1], G * og)


def gpc_io(x, weight1, weight2, bias1=None, bias2=None, *, backend: Optional[str] = None):
    """The IO block for G > 1: ``first(x) + second(interleave(x, s))`` in one fused op."""
    op = "gpc_io"
    G, s, og = C.check_weight(weight1, op, "weight1")
    C.check_param(weight2, "weight2", op)
    if tuple(weight2.shape) != (G, s, og):
        raise ValueError(
            f"{op}: both weights must have one shape, got {tuple(weight1.shape)} and "
            f"{tuple(weight2.shape)}"
        )
    C.check_input(x, G * s, op)
    C.check_bias(bias1, G, og, op, "bias1")
    C.check_bias(bias2, G, og, op, "bias2")
    name = C.backend_for(x, backend, op)
    x, params = C.cast_params(x, (weight1, weight2, bias1, bias2), op)
    y = custom_ops.gpc_io(C.flatten(x), *params, backend=name)
    return y.reshape(*x.shape[:-1], G * og)


def gpc_block(x, weight1, weight2=None, bias1=None, bias2=None, *, backend: Optional[str] = None):
    """The non-IO block for G > 1 without activation; ``weight2`` is None when in < out."""
    op = "gpc_block"
    G, s, og = C.check_weight(weight1, op, "weight1")
    C.check_param(weight2, "weight2", op, optional=True)
    if weight2 is not None and tuple(weight2.shape) != (G, og, og):
        raise ValueError(
            f"{op}: second weight (weight2) must have shape {(G, og, og)}, got "
            f"{tuple(weight2.shape)}"
        )
    C.check_input(x, G * s, op)
    C.check_bias(bias1, G, og, op, "bias1")
    C.check_bias(bias2, G, og, op, "bias2")
    if bias2 is not None and weight2 is None:
        raise ValueError(
            f"{op}: bias2 is given but weight2 is None; bias2 is the bias of the second GEMM, "
            "which exists only with weight2 (pass both, or neither)"
        )
    name = C.backend_for(x, backend, op)
    x, params = C.cast_params(x, (weight1, weight2, bias1, bias2), op)
    y = custom_ops.gpc_block(C.flatten(x), *params, backend=name)
    return y.reshape(*x.shape[:-1], G * og)


def interleave(x, step: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """InterleaveChannelsFast's function: ``out[..., a*step + b] = x[..., b*(C/step) + a]``."""
    op = "interleave"
    channels = C.channel_count(x, op)
    step = C.interleave_step(step, op)
    if step <= 0 or channels % step != 0:
        raise ValueError(
            f"{op}: step {step!r} must be a positive integer divisor of the last dimension "
            f"{channels}"
        )
    name = C.backend_for(x, backend, op)
    if channels == 0:
        # Nothing to permute (and [M, 0] has no 2-D form for every M): the empty result, still
        # a fresh tensor connected to x for autograd.
        return x.clone(memory_format=torch.contiguous_format)
    y = custom_ops.interleave(C.flatten(x), step, backend=name)
    return y.reshape(x.shape)
