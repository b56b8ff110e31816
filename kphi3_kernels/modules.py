"""Drop-in modules with the original KPhi-3 class names, constructor signatures, parameter
names, shapes and init: a state dict of the original classes loads with ``strict=True``.

Each module takes an extra keyword ``backend`` (``None`` follows the global flag, see
``backend.py``); the modules only hold parameters and call ``functional.py``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from . import functional as F
from .backend import validate_backend
from .reference import as_int, group_count, signed_square_root1


def _as_int(value, name: str, cls: str) -> int:
    """An integer argument of a constructor as a Python int (numpy integers welcome; a bool, a
    float or a string is a TypeError naming ``cls`` and ``name``)."""
    return as_int(value, f"{cls}: {name}")


def _check_divisible(in_features, out_features, num_groups, cls: str) -> Tuple[int, int, int]:
    """The three counts as Python ints, after checking that G divides both feature counts."""
    in_features = _as_int(in_features, "in_features", cls)
    out_features = _as_int(out_features, "out_features", cls)
    num_groups = _as_int(num_groups, "num_groups", cls)
    if num_groups <= 0:
        raise ValueError(f"{cls}: num_groups must be a positive integer, got {num_groups!r}")
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if value <= 0 or value % num_groups != 0:
            raise ValueError(
                f"{cls}: {name}={value} is not a positive multiple of num_groups={num_groups}"
            )
    return in_features, out_features, num_groups


class _BackendMixin:
    @property
    def backend(self) -> Optional[str]:
        """This module's backend override, or None to follow the global flag."""
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = None if name is None else validate_backend(name)


class GroupedLinearFast(_BackendMixin, nn.Module):
    """G independent linear maps on contiguous channel slices; ``weight`` is ``[G, in/G, out/G]``."""

    def __init__(self, in_features: int, out_features: int, num_groups: int, bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        in_features, out_features, num_groups = _check_divisible(
            in_features, out_features, num_groups, type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self.num_groups = num_groups
        self.in_features_per_group = in_features // num_groups
        self.out_features_per_group = out_features // num_groups
        self.weight = nn.Parameter(
            torch.empty(num_groups, self.in_features_per_group, self.out_features_per_group)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(num_groups, self.out_features_per_group))
        else:
            self.register_parameter("bias", None)
        self.backend = backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features_per_group)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.grouped_linear(x, self.weight, self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_groups={self.num_groups}, bias={self.bias is not None}")


class GroupedLinear(_BackendMixin, nn.Module):
    """The same function stored as G ``nn.Linear`` layers (``group_layers.N.weight`` ``[og, s]``)."""

    def __init__(self, in_features: int, out_features: int, num_groups: int, bias: bool = True,
                 backend: Optional[str] = None):
        super().__init__()
        in_features, out_features, num_groups = _check_divisible(
            in_features, out_features, num_groups, type(self).__name__)
        self.in_features = in_features
        self.out_features = out_features
        self.num_groups = num_groups
        self.group_layers = nn.ModuleList(
            nn.Linear(in_features // num_groups, out_features // num_groups, bias=bias)
            for _ in range(num_groups)
        )
        self.backend = backend

    def reset_parameters(self) -> None:
        for layer in self.group_layers:
            layer.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.group_layers
        if self.num_groups == 1:
            # One dense GEMM: nn.Linear's own kernel is the right one (and handles autocast).
            F._check_input(x, self.in_features, type(self).__name__)
            return layers[0](x)
        weight = torch.stack([layer.weight.t() for layer in layers])
        bias = None if layers[0].bias is None else torch.stack([layer.bias for layer in layers])
        return F.grouped_linear(x, weight, bias, backend=self.backend)


class InterleaveChannelsFast(_BackendMixin, nn.Module):
    """``out[..., a*step + b] = in[..., b*(C/step) + a]`` on the last dimension (any rank).

    ``last_dim`` is kept for compatibility with the original (2 for 3-D, 3 for 4-D inputs); the
    interleave always acts on the last dimension.
    """

    def __init__(self, step_size: int = 2, last_dim: int = 3, backend: Optional[str] = None):
        super().__init__()
        step_size = _as_int(step_size, "step_size", type(self).__name__)
        if step_size <= 0:
            raise ValueError(f"InterleaveChannelsFast: step_size must be a positive integer, got {step_size!r}")
        self.step_size = step_size
        self.last_dim = last_dim
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interleave(x, self.step_size, backend=self.backend)

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}, last_dim={self.last_dim}"


class InterleaveChannels(_BackendMixin, nn.Module):
    """The original's slicing form: ``cat([x[..., k::step] for k in range(step)], dim=-1)``.

    That is ``InterleaveChannelsFast(C // step)`` on ``C`` channels (the inverse permutation of
    ``InterleaveChannelsFast(step)``), and it runs on the same kernel. As in the original, a
    ``step_size`` below 2 means 1 (the identity). ``C`` must be divisible by ``step_size`` (the
    original also accepts uneven slices). ``last_dim`` (2 for 3-D, 3 for 4-D inputs in the
    original) is kept for compatibility; the interleave always acts on the last dimension, for
    inputs of any rank.
    """

    def __init__(self, step_size: int = 2, last_dim: int = 3, backend: Optional[str] = None):
        super().__init__()
        step_size = _as_int(step_size, "step_size", type(self).__name__)
        self.step_size = step_size if step_size >= 2 else 1
        self.last_dim = last_dim
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = F._channels(x, type(self).__name__)
        if channels % self.step_size != 0:
            raise ValueError(
                f"InterleaveChannels: the last dimension {channels} is not divisible by "
                f"step_size={self.step_size} (input shape {tuple(x.shape)})"
            )
        # Zero channels: any step is the identity on an empty dimension.
        step = channels // self.step_size if channels else 1
        return F.interleave(x, step, backend=self.backend)

    def extra_repr(self) -> str:
        return f"step_size={self.step_size}, last_dim={self.last_dim}"


class _GroupedBlock(_BackendMixin, nn.Module):
    """What both block kinds share: the group rule, the single-group form and the activation."""

    def __init__(self, in_features, out_features, min_channels_per_group, last_dim, use_bias,
                 activation, backend):
        super().__init__()
        cls = type(self).__name__
        in_features = _as_int(in_features, "in_features", cls)
        out_features = _as_int(out_features, "out_features", cls)
        min_channels_per_group = _as_int(min_channels_per_group, "min_channels_per_group", cls)
        self.num_groups = group_count(in_features, out_features, min_channels_per_group)
        _warn_if_grouping_found_no_divisor(cls, in_features, out_features, min_channels_per_group,
                                           self.num_groups)
        self.in_features = in_features
        self.out_features = out_features
        self.output_num_channels = out_features
        self.min_channels_per_group = min_channels_per_group
        self.last_dim = last_dim
        self.use_bias = use_bias
        self.activation = activation
        if self.num_groups == 1:
            self.first_pointwise_conv = GroupedLinear(in_features, out_features, 1, bias=use_bias)
        self.backend = backend

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as the constructor does (e.g. after ``to_empty``)."""
        for name in ("first_pointwise_conv", "second_pointwise_conv"):
            child = getattr(self, name, None)
            if child is not None:
                child.reset_parameters()

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.activation is None else self.activation(x)

    @_BackendMixin.backend.setter
    def backend(self, name: Optional[str]) -> None:
        # The children follow the block's override, so one assignment switches the whole block.
        _BackendMixin.backend.fset(self, name)
        for child in getattr(self, "_modules", {}).values():
            if isinstance(child, _BackendMixin):
                child.backend = name


def _warn_if_grouping_found_no_divisor(cls: str, in_features: int, out_features: int,
                                       min_channels_per_group: int, groups: int) -> None:
    """A ``UserWarning`` where the sizes allow groups (``in // min_channels_per_group >= 2``)
    but no common divisor of ``in`` and ``out`` fits, so the block is dense (G = 1), as the
    original computes it. Python shows it once per process."""
    allowed = min(in_features, out_features, in_features // min_channels_per_group)
    if groups == 1 and allowed >= 2:
        warnings.warn(
            f"{cls}({in_features}, {out_features}, min_channels_per_group="
            f"{min_channels_per_group}) is dense (G = 1): no common divisor of {in_features} "
            f"and {out_features} lies in 2..{allowed}, so the group rule gives one group, as "
            "the original KPhi-3 does (docs/group-count.md)", UserWarning, stacklevel=4)


class GroupedPointwiseConvolutionBlockIO(_GroupedBlock):
    """``act(first(x) + second(interleave(x, step=in/G)))``; a single ``GroupedLinear`` when G == 1."""

    def __init__(self, in_features: int, out_features: int, min_channels_per_group: int = 32,
                 last_dim: int = 2, use_bias: bool = False, activation: Optional[Callable] = None,
                 backend: Optional[str] = None):
        super().__init__(in_features, out_features, min_channels_per_group, last_dim, use_bias,
                         activation, backend)
        if self.num_groups > 1:
            G = self.num_groups
            self.input_channels_per_group = in_features // G
            self.first_pointwise_conv = GroupedLinearFast(in_features, out_features, G, bias=use_bias)
            self.second_pointwise_conv = GroupedLinearFast(in_features, out_features, G, bias=use_bias)
            self.interleave_layer = InterleaveChannelsFast(self.input_channels_per_group, last_dim)
            self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            return self._act(self.first_pointwise_conv(x))
        first, second = self.first_pointwise_conv, self.second_pointwise_conv
        y = F.gpc_io(x, first.weight, second.weight, first.bias, second.bias, backend=self.backend)
        return self._act(y)


class GroupedPointwiseConvolutionBlock(_GroupedBlock):
    """``h = act(first(x))``; interleave ``h`` with step out/G; if in >= out, ``act(second(h)) + first``.

    Without an activation the whole block is one fused op (interleave in the first GEMM's store,
    residual in the second's epilogue); with one, it is composed from the single ops.
    """

    def __init__(self, in_features: int, out_features: int, min_channels_per_group: int = 32,
                 last_dim: int = 2, use_bias: bool = False, activation: Optional[Callable] = None,
                 backend: Optional[str] = None):
        super().__init__(in_features, out_features, min_channels_per_group, last_dim, use_bias,
                         activation, backend)
        if self.num_groups > 1:
            G = self.num_groups
            self.output_group_size = out_features // G
            self.first_pointwise_conv = GroupedLinearFast(in_features, out_features, G, bias=use_bias)
            if self.output_group_size > 1:
                self.interleave_layer = InterleaveChannelsFast(self.output_group_size, last_dim)
            if in_features >= out_features:
                self.second_pointwise_conv = GroupedLinearFast(out_features, out_features, G,
                                                               bias=use_bias)
            self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups == 1:
            return self._act(self.first_pointwise_conv(x))
        first = self.first_pointwise_conv
        second = getattr(self, "second_pointwise_conv", None)
        if self.activation is None:
            return F.gpc_block(
                x, first.weight, None if second is None else second.weight, first.bias,
                None if second is None else second.bias, backend=self.backend,
            )
        h = self._act(first(x))
        residual = h
        if self.output_group_size > 1:
            h = self.interleave_layer(h)
        if second is not None:
            h = self._act(second(h)) + residual
        return h


def SignedSquareRoot1(x: torch.Tensor) -> torch.Tensor:
    """The original KPhi-3 activation, a plain function as there: ``sqrt(x)`` for ``x > 1``,
    ``sqrt(-x)`` (positive) for ``x < -1``, ``x`` in between (``reference.signed_square_root1``).

    Pass the function itself as a block's activation: ``activation=SignedSquareRoot1``.
    """
    return signed_square_root1(x)
