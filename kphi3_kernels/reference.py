"""Plain PyTorch semantics of every KPhi-3 grouped op (docs/layers.md), written for clarity, not speed.

These functions are the oracle of the test suite: every faster path (the Triton kernels behind
``ops/triton_impl.py`` and the fast torch formulation in ``ops/torch_impl.py``) is checked
against them. They work on any leading shape: the last dimension holds the channels.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch


def as_int(value, name: str) -> int:
    """``value`` as a Python int. Integer-like values (numpy integers, anything with
    ``__index__``) are accepted through ``operator.index``, as torch accepts sizes; a bool (an int
    to Python, but never a count) and a non-integer (``3.0``, ``"3"``) are a TypeError."""
    if type(value) is int:
        return value
    # Asked of the type rather than by catching operator.index's TypeError: torch.compile's
    # dynamo (torch 2.11) turns that TypeError into an internal error.
    if isinstance(value, bool) or getattr(type(value), "__index__", None) is None:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return operator.index(value)


def group_count(in_features: int, out_features: int, min_channels_per_group: int) -> int:
    """The largest d <= max(1, min(in, out, in // min)) dividing both ``in`` and ``out``."""
    in_features = as_int(in_features, "in_features")
    out_features = as_int(out_features, "out_features")
    min_channels_per_group = as_int(min_channels_per_group, "min_channels_per_group")
    if min_channels_per_group == 0:
        raise ValueError("min_channels_per_group must be non-zero (it divides in_features)")
    if in_features <= 0 or out_features <= 0:
        raise ValueError(
            f"in_features and out_features must be positive, got {in_features} and {out_features}"
        )
    return get_max_acceptable_common_divisor(
        in_features, out_features, in_features // min_channels_per_group
    )


def get_max_acceptable_common_divisor(a: int, b: int, max_acceptable: int = 1_000_000) -> int:
    """The original helper: the largest common divisor of ``a`` and ``b`` not above ``max_acceptable``."""
    divisor = max(1, min(a, b, max_acceptable))
    while divisor > 0:
        if a % divisor == 0 and b % divisor == 0:
            return divisor
        divisor -= 1
    return 0


def interleave(x: torch.Tensor, step: int) -> torch.Tensor:
    """``out[..., a*step + b] = x[..., b*(C/step) + a]`` for ``a < C/step``, ``b < step``."""
    channels = x.shape[-1]
    return (
        x.reshape(*x.shape[:-1], step, channels // step)
        .transpose(-1, -2)
        .reshape(x.shape)
    )


def grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """GroupedLinearFast: ``weight`` is ``[G, in/G, out/G]``, ``bias`` is ``[G, out/G]``."""
    groups, in_per_group, out_per_group = weight.shape
    xg = x.reshape(*x.shape[:-1], groups, in_per_group)
    y = torch.einsum("...gi,gio->...go", xg, weight)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], groups * out_per_group)


def grouped_linear_modules(x: torch.Tensor, weights, biases) -> torch.Tensor:
    """GroupedLinear: G ``nn.Linear`` layers (weights ``[out/G, in/G]``) on contiguous channel slices."""
    chunks = x.chunk(len(weights), dim=-1)
    outs = [
        torch.nn.functional.linear(chunk, w, b) for chunk, w, b in zip(chunks, weights, biases)
    ]
    return torch.cat(outs, dim=-1)


def gpc_io(
    x: torch.Tensor,
    weight1: torch.Tensor,
    weight2: torch.Tensor,
    bias1: Optional[torch.Tensor] = None,
    bias2: Optional[torch.Tensor] = None,
    activation: Optional[Callable] = None,
) -> torch.Tensor:
    """GroupedPointwiseConvolutionBlockIO with G > 1: ``first(x) + second(interleave(x, s))``."""
    in_per_group = weight1.shape[1]
    y = grouped_linear(x, weight1, bias1) + grouped_linear(
        interleave(x, in_per_group), weight2, bias2
    )
    return activation(y) if activation is not None else y


def gpc_block(
    x: torch.Tensor,
    weight1: torch.Tensor,
    weight2: Optional[torch.Tensor] = None,
    bias1: Optional[torch.Tensor] = None,
    bias2: Optional[torch.Tensor] = None,
    activation: Optional[Callable] = None,
) -> torch.Tensor:
    """GroupedPointwiseConvolutionBlock with G > 1 (``weight2`` is None when in < out)."""
    out_per_group = weight1.shape[2]
    act = activation if activation is not None else (lambda t: t)
    h = act(grouped_linear(x, weight1, bias1))
    residual = h
    if out_per_group > 1:
        h = interleave(h, out_per_group)
    if weight2 is not None:
        h = act(grouped_linear(h, weight2, bias2)) + residual
    return h


def signed_square_root1(x: torch.Tensor) -> torch.Tensor:
    """The original KPhi-3 activation: ``sqrt(x)`` for ``x > 1``, ``sqrt(-x)`` (positive) for
    ``x < -1``, ``x`` for ``-1 <= x <= 1``; NaN stays NaN and -0.0 stays -0.0.

    The original writes ``torch.where(x > 1, torch.sqrt(x), torch.where(x < -1, torch.sqrt(-x),
    x))``. The values here are that expression's, bit for bit; only each square root sees the
    inputs of its own branch (and 1 elsewhere). In the original the branch not taken still takes
    the square root of negative numbers, and autograd's zero gradient through that NaN is NaN
    (``0 / (2 * NaN)``), so every input gets a NaN gradient. Here the gradient is the derivative
    of the branch taken: ``1 / (2 sqrt(x))``, ``-1 / (2 sqrt(-x))``, or 1.
    """
    above, below = x > 1, x < -1
    root_above = torch.sqrt(torch.where(above, x, 1.0))
    root_below = torch.sqrt(torch.where(below, -x, 1.0))
    return torch.where(above, root_above, torch.where(below, root_below, x))
