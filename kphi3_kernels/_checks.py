"""The argument checks of the functional entry points, written once for the op-level functions
(``functional.py``) and the fused decoder's (``fused.py``): types, shapes, devices, dtypes (and
autocast's casts), the backend a call runs on, and the 2-D form the operators take.

Every check runs before any operator is called (so before any kernel launches), also under
``FakeTensorMode`` and while ``torch.compile`` traces; each error names the function called
(``op``), the argument and the problem. A leaf of the package: it imports only ``backend`` and
``reference``.
"""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence, Tuple

import torch

from .backend import resolve_backend, validate_backend
from .reference import as_int


def type_name(t) -> str:
    return "None" if t is None else type(t).__name__


def check_input(x, channels: int, op: str) -> None:
    check_floating(x, "the input", op)
    if x.shape[-1] != channels:
        raise ValueError(
            f"{op}: input's last dimension is {x.shape[-1]} but the layer expects {channels} "
            f"channels (input shape {tuple(x.shape)})"
        )


def check_param(t, name: str, op: str, optional: bool = False) -> None:
    """A parameter is a floating-point torch.Tensor (or None where ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type_name(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating-point, got dtype {t.dtype}")


def backend_for(x: torch.Tensor, override: Optional[str], op: str) -> str:
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
def autocast_available(device_type: str) -> bool:
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


def autocast_on(device_type: str) -> bool:
    # Autocast has no state for some devices (meta): nothing is cast there.
    return autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def cast_params(x: torch.Tensor, params: Sequence[Optional[torch.Tensor]], op: str):
    """Under autocast, compute in the autocast dtype like nn.Linear; else demand one dtype."""
    device_type = x.device.type
    for p in params:
        if p is not None and p.device != x.device:
            raise ValueError(
                f"{op}: input is on {x.device} but a parameter is on {p.device}; "
                "move the module or the input so that both are on one device"
            )
    # Like autocast itself (and so nn.Linear), float64 is never cast down.
    if autocast_on(device_type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        return x.to(dtype), [None if p is None else p.to(dtype) for p in params]
    for p in params:
        if p is not None and p.dtype != x.dtype:
            raise TypeError(
                f"{op}: input dtype {x.dtype} does not match parameter dtype {p.dtype}; cast one "
                "of them, or run under torch.autocast"
            )
    return x, list(params)


def check_weight(weight, op: str, name: str = "weight") -> Tuple[int, int, int]:
    check_param(weight, name, op)
    if weight.dim() != 3:
        raise ValueError(f"{op}: {name} must be [G, in/G, out/G], got shape {tuple(weight.shape)}")
    G, s, og = weight.shape
    if G == 0 or s == 0 or og == 0:
        raise ValueError(
            f"{op}: {name} of shape {tuple(weight.shape)} has zero groups or zero channels per "
            "group (G, in/G and out/G must be positive)"
        )
    return G, s, og


def check_bias(bias, groups: int, out_per_group: int, op: str, name: str = "bias") -> None:
    check_param(bias, name, op, optional=True)
    if bias is not None and tuple(bias.shape) != (groups, out_per_group):
        raise ValueError(
            f"{op}: {name} must have shape {(groups, out_per_group)}, got {tuple(bias.shape)}"
        )


def flatten(x: torch.Tensor) -> torch.Tensor:
    # A view where the strides allow it (the kernels take any 2-D strides), else a copy.
    return x.reshape(-1, x.shape[-1])


def channel_count(x, op: str) -> int:
    """The size of ``x``'s last (channel) dimension, after checking that ``x`` has one."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected a torch.Tensor input, got {type_name(x)}")
    if x.dim() == 0:
        raise ValueError(f"{op}: expected an input with a channel dimension, got a 0-d tensor")
    return x.shape[-1]


def interleave_step(step, op: str) -> int:
    """An interleave step as a Python int: integer-like values through ``operator.index`` (as
    torch takes sizes); a bool or a non-integer is a TypeError."""
    if isinstance(step, bool):  # an int to Python, but never a step
        raise TypeError(f"{op}: step must be an integer, got {step!r}: a bool is not a step")
    return as_int(step, f"{op}: step")


def check_floating(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be floating-point, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{op}: {name} must have a channel dimension, got a 0-d tensor")


def check_io_weights(weight1, weight2, op: str):
    """``(G, s, og)`` of an IO block's two weights, which must share one ``[G, s, og]`` shape."""
    G, s, og = check_weight(weight1, op, "weight1")
    check_param(weight2, "weight2", op)
    if tuple(weight2.shape) != (G, s, og):
        raise ValueError(f"{op}: both weights must have one shape, got {tuple(weight1.shape)} "
                         f"and {tuple(weight2.shape)}")
    return G, s, og


def check_rms_weight(norm_weight, channels: int, op: str) -> None:
    check_param(norm_weight, "norm_weight", op)
    if tuple(norm_weight.shape) != (channels,):
        raise ValueError(f"{op}: norm_weight must have shape ({channels},), got "
                         f"{tuple(norm_weight.shape)}")


def check_device(t: torch.Tensor, like: torch.Tensor, op: str, name: str) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device}, the input on {like.device}")


def check_residual(residual, like: torch.Tensor, op: str, result_shape=None,
                    required: bool = False) -> None:
    """A residual (None: none, unless ``required``) must be a floating tensor on ``like``'s
    device, of ``like``'s shape (added to the input ``x``) or of ``result_shape`` (added to the
    result)."""
    if residual is None and not required:
        return
    check_floating(residual, "residual", op)
    if result_shape is None and residual.shape != like.shape:
        raise ValueError(f"{op}: residual and x must have one shape, got "
                         f"{tuple(residual.shape)} and {tuple(like.shape)}")
    if result_shape is not None and tuple(residual.shape) != tuple(result_shape):
        raise ValueError(f"{op}: residual must have the result's shape {tuple(result_shape)}, "
                         f"got {tuple(residual.shape)}")
    check_device(residual, like, op, "residual")


def check_norm_args(x, weight, eps, op: str) -> None:
    check_floating(x, "x", op)
    check_rms_weight(weight, x.shape[-1], op)
    check_device(weight, x, op, "weight")
    # Any real scalar (a Python or NumPy float or int), as torch's own norms take it.
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a non-negative number, got {eps!r}")


def stream_dtype(residual: Optional[torch.Tensor], x: torch.Tensor) -> torch.dtype:
    """The dtype of ``h = residual + x``: torch's promotion, as ``+`` computes it."""
    return x.dtype if residual is None else torch.promote_types(residual.dtype, x.dtype)


def head_autocast_dtype(x, residual) -> Optional[torch.dtype]:
    """The dtype a norm head's block runs in under autocast (None outside it). As autocast
    does, a float64 ``h`` is never cast down."""
    if autocast_on(x.device.type) and stream_dtype(residual, x) != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return None


def check_head_params(x, residual, params, op: str) -> None:
    """One dtype rule for a norm head on both backends: outside autocast, the normalized input
    (of ``h = residual + x``, in the promoted dtype) and the parameters (norm weight, block
    weights and biases) share one dtype, as the op-level ``gpc_io(rms_norm(h))`` needs. Under
    autocast the norm reads ``h`` and its weight as they are and the block runs in the autocast
    dtype. Every parameter is on ``x``'s device."""
    for p in params:
        if p is not None:
            check_device(p, x, op, "a parameter")
    if head_autocast_dtype(x, residual) is not None:
        return
    dtype = stream_dtype(residual, x)
    for p in params:
        if p is not None and p.dtype != dtype:
            source = ("x" if residual is None else
                      f"h = residual + x ({residual.dtype} + {x.dtype})")
            raise TypeError(f"{op}: the normalized input's dtype {dtype} (of {source}) does not "
                            f"match parameter dtype {p.dtype}; cast one of them, or run under "
                            "torch.autocast")


