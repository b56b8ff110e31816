"""Functional entry points: validate, apply autocast, flatten to 2-D, pick the backend, and call
the registered operator of that backend (``ops/custom_ops.py``, ``torch.ops.kphi3``).

This is the one validation layer of the package, shared by both backends: every check runs
before any operator is called (so before any kernel launches), also under ``FakeTensorMode``
and while ``torch.compile`` traces, and each error names the argument and the problem.
Zero-size dimensions: any number of rows (``M = 0`` included) works like ``nn.Linear``; zero
groups or zero channels per group are refused with a ValueError. ``interleave`` of a tensor with
no channels returns the empty result (any step divides 0), like torch's own ops.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from .backend import resolve_backend, validate_backend
from .ops import custom_ops
from .reference import as_int


def _type_name(t) -> str:
    return "None" if t is None else type(t).__name__


def _check_input(x, channels: int, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {_type_name(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: expected a floating-point input, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: expected an input with a channel dimension, got a 0-d tensor")
    if x.shape[-1] != channels:
        raise ValueError(
            f"{op}: input's last dimension is {x.shape[-1]} but the layer expects {channels} "
            f"channels (input shape {tuple(x.shape)})"
        )


def _check_param(t, name: str, op: str, optional: bool = False) -> None:
    """A parameter is a floating-point torch.Tensor (or None where ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {_type_name(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating-point, got dtype {t.dtype}")


def _backend(x: torch.Tensor, override: Optional[str], op: str) -> str:
    """The backend to run ``op`` on for ``x``; a bad or impossible choice is a ValueError that
    names ``op``, the function the user called."""
    try:
        if x.device.type == "meta":
            # Shapes only: the operators' fake implementations serve, whatever the backend.
            if override is not None:
                validate_backend(override)
            return "torch"
        return resolve_backend(x, override)
    except ValueError as err:
        raise ValueError(f"{op}: {err}") from None


_AUTOCAST_AVAILABLE: Dict[str, bool] = {}


def _constant_while_tracing(fn):
    # torch.compile calls such a function at trace time and keeps its result as a constant.
    mark = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return fn if mark is None else mark(fn)


@_constant_while_tracing
def _autocast_available(device_type: str) -> bool:
    """Whether autocast has state for ``device_type`` (meta has none), once per device type.

    Depends on the device type alone, so torch.compile takes it as a constant instead of tracing
    ``torch.amp.is_autocast_available``: some versions' dynamo (torch 2.11) cannot trace the C
    function behind it and break the graph there.
    """
    known = _AUTOCAST_AVAILABLE.get(device_type)
    if known is None:
        check = getattr(torch.amp, "is_autocast_available", None)
        known = device_type != "meta" if check is None else bool(check(device_type))
        _AUTOCAST_AVAILABLE[device_type] = known
    return known


def _autocast_on(device_type: str) -> bool:
    # Autocast has no state for some devices (meta): nothing is cast there.
    return _autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _cast_params(x: torch.Tensor, params: Sequence[Optional[torch.Tensor]], op: str):
    """Under autocast, compute in the autocast dtype like nn.Linear; else demand one dtype."""
    device_type = x.device.type
    for p in params:
        if p is not None and p.device != x.device:
            raise ValueError(
                f"{op}: input is on {x.device} but a parameter is on {p.device}; "
                "move the module or the input so that both are on one device"
            )
    # Like autocast itself (and so nn.Linear), float64 is never cast down.
    if _autocast_on(device_type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), [None if p is None else p.to(dtype) for p in params]
    for p in params:
        if p is not None and p.dtype != x.dtype:
            raise TypeError(
                f"{op}: input dtype {x.dtype} does not match parameter dtype {p.dtype}; cast one "
                "of them, or run under torch.autocast"
            )
    return x, list(params)


def _check_weight(weight, op: str, name: str = "weight") -> Tuple[int, int, int]:
    _check_param(weight, name, op)
    if weight.dim() != 3:
        raise ValueError(f"{op}: {name} must be [G, in/G, out/G], got shape {tuple(weight.shape)}")
    G, s, og = weight.shape
    if G == 0 or s == 0 or og == 0:
        raise ValueError(
            f"{op}: {name} of shape {tuple(weight.shape)} has zero groups or zero channels per "
            "group (G, in/G and out/G must be positive)"
        )
    return G, s, og


def _check_bias(bias, groups: int, out_per_group: int, op: str, name: str = "bias") -> None:
    _check_param(bias, name, op, optional=True)
    if bias is not None and tuple(bias.shape) != (groups, out_per_group):
        raise ValueError(
            f"{op}: {name} must have shape {(groups, out_per_group)}, got {tuple(bias.shape)}"
        )


def _flatten(x: torch.Tensor) -> torch.Tensor:
    # A view where the strides allow it (the kernels take any 2-D strides), else a copy.
    return x.reshape(-1, x.shape[-1])


def grouped_linear(x, weight, bias=None, *, backend: Optional[str] = None) -> torch.Tensor:
    """GroupedLinearFast's function: ``weight`` ``[G, in/G, out/G]``, ``bias`` ``[G, out/G]``."""
    op = "grouped_linear"
    G, s, og = _check_weight(weight, op)
    _check_input(x, G * s, op)
    _check_bias(bias, G, og, op)
    name = _backend(x, backend, op)
    x, (weight, bias) = _cast_params(x, (weight, bias), op)
    y = custom_ops.grouped_linear(_flatten(x), weight, bias, backend=name)
    return y.reshape(*x.shape[:-1], G * og)


def gpc_io(x, weight1, weight2, bias1=None, bias2=None, *, backend: Optional[str] = None):
    """The IO block for G > 1: ``first(x) + second(interleave(x, s))`` in one fused op."""
    op = "gpc_io"
    G, s, og = _check_weight(weight1, op, "weight1")
    _check_param(weight2, "weight2", op)
    if tuple(weight2.shape) != (G, s, og):
        raise ValueError(
            f"{op}: both weights must have one shape, got {tuple(weight1.shape)} and "
            f"{tuple(weight2.shape)}"
        )
    _check_input(x, G * s, op)
    _check_bias(bias1, G, og, op, "bias1")
    _check_bias(bias2, G, og, op, "bias2")
    name = _backend(x, backend, op)
    x, params = _cast_params(x, (weight1, weight2, bias1, bias2), op)
    y = custom_ops.gpc_io(_flatten(x), *params, backend=name)
    return y.reshape(*x.shape[:-1], G * og)


def gpc_block(x, weight1, weight2=None, bias1=None, bias2=None, *, backend: Optional[str] = None):
    """The non-IO block for G > 1 without activation; ``weight2`` is None when in < out."""
    op = "gpc_block"
    G, s, og = _check_weight(weight1, op, "weight1")
    _check_param(weight2, "weight2", op, optional=True)
    if weight2 is not None and tuple(weight2.shape) != (G, og, og):
        raise ValueError(
            f"{op}: second weight (weight2) must have shape {(G, og, og)}, got "
            f"{tuple(weight2.shape)}"
        )
    _check_input(x, G * s, op)
    _check_bias(bias1, G, og, op, "bias1")
    _check_bias(bias2, G, og, op, "bias2")
    if bias2 is not None and weight2 is None:
        raise ValueError(
            f"{op}: bias2 is given but weight2 is None; bias2 is the bias of the second GEMM, "
            "which exists only with weight2 (pass both, or neither)"
        )
    name = _backend(x, backend, op)
    x, params = _cast_params(x, (weight1, weight2, bias1, bias2), op)
    y = custom_ops.gpc_block(_flatten(x), *params, backend=name)
    return y.reshape(*x.shape[:-1], G * og)


def _channels(x, op: str) -> int:
    """The size of ``x``'s last (channel) dimension, after checking that ``x`` has one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {_type_name(x)}")
    if x.dim() == 0:
        raise ValueError(f"{op}: expected an input with a channel dimension, got a 0-d tensor")
    return x.shape[-1]


def _step(step, op: str) -> int:
    """An interleave step as a Python int: integer-like values through ``operator.index`` (as
    torch takes sizes); a bool or a non-integer is a TypeError."""
    if isinstance(step, bool):  # an int to Python, but never a step
        raise TypeError(f"{op}: step must be an integer, got {step!r}: a bool is not a step")
    return as_int(step, f"{op}: step")


def interleave(x, step: int, *, backend: Optional[str] = None) -> torch.Tensor:
    """InterleaveChannelsFast's function: ``out[..., a*step + b] = x[..., b*(C/step) + a]``."""
    op = "interleave"
    channels = _channels(x, op)
    step = _step(step, op)
    if step <= 0 or channels % step != 0:
        raise ValueError(
            f"{op}: step {step!r} must be a positive integer divisor of the last dimension "
            f"{channels}"
        )
    name = _backend(x, backend, op)
    if channels == 0:
        # Nothing to permute (and [M, 0] has no 2-D form for every M): the empty result, still
        # a fresh tensor connected to x for autograd.
        return x.clone(memory_format=torch.contiguous_format)
    y = custom_ops.interleave(_flatten(x), step, backend=name)
    return y.reshape(x.shape)
