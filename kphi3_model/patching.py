"""``apply_kphi3_kernels``: put the kernel-backed modules into a model loaded some other way.

A KPhi-3 model built by the original remote code (``trust_remote_code=True``), or any model made
of the original grouped layers, holds modules whose classes are *named* ``GroupedLinearFast``,
``GroupedPointwiseConvolutionBlockIO``, ``GroupedPointwiseConvolutionBlock`` and
``InterleaveChannelsFast`` but come from another module. This swaps each of them, in place, for
the ``kphi3_kernels`` module of the same name, built around the very same ``nn.Parameter``
objects: nothing is copied, so an optimizer that already holds the parameters stays valid.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

import kphi3_kernels
from kphi3_kernels.backend import validate_backend

# The class names replaced, each by the kphi3_kernels class of the same name.
PATCHED_CLASS_NAMES = (
    "GroupedLinearFast",
    "GroupedPointwiseConvolutionBlockIO",
    "GroupedPointwiseConvolutionBlock",
    "InterleaveChannelsFast",
)
_KERNEL_CLASSES = tuple(getattr(kphi3_kernels, name) for name in PATCHED_CLASS_NAMES) + (kphi3_kernels.GroupedLinear,)


def apply_kphi3_kernels(model: nn.Module, backend: str = "auto") -> int:
    """Replace, in place, every submodule of ``model`` whose class is named ``GroupedLinearFast``,
    ``GroupedPointwiseConvolutionBlockIO``, ``GroupedPointwiseConvolutionBlock`` or
    ``InterleaveChannelsFast`` by the kernel-backed module, sharing the same ``Parameter`` objects.

    Returns how many modules were replaced: a block counts once, and so does each of those layers
    inside it (an IO block with G > 1 is four: the block, its two ``GroupedLinearFast`` and its
    ``InterleaveChannelsFast``). Modules that already are ``kphi3_kernels`` modules are left alone,
    so a second call returns 0. ``backend`` (``"auto"`` | ``"triton"`` | ``"torch"``) is set on
    every module replaced.

    Call it before wrapping the model (DDP, FSDP, accelerate hooks) and before ``torch.compile``:
    the replaced modules keep their parameters, their ``training`` flag and their activation, but
    not forward hooks registered on the old module objects.
    """
    backend = validate_backend(backend)
    if _is_original(model):
        raise ValueError(
            f"apply_kphi3_kernels replaces submodules in place; the model itself is a "
            f"{type(model).__name__}: pass a module that contains it"
        )
    memo: Dict[int, nn.Module] = {}  # a module shared by several parents is converted once
    counter = [0]
    _replace_children(model, backend, memo, counter)
    return counter[0]


def _is_original(module: nn.Module) -> bool:
    return type(module).__name__ in PATCHED_CLASS_NAMES and not isinstance(module, _KERNEL_CLASSES)


def _replace_children(parent: nn.Module, backend: str, memo, counter) -> None:
    for name, child in list(parent._modules.items()):
        if child is None:
            continue
        if _is_original(child):
            parent._modules[name] = _convert(child, backend, memo, counter)
        else:
            _replace_children(child, backend, memo, counter)


def _convert(module: nn.Module, backend: str, memo, counter) -> nn.Module:
    if not _is_original(module):  # already a kernel module (e.g. inside a block built by us)
        return module
    if id(module) in memo:
        return memo[id(module)]
    kind = type(module).__name__
    if kind == "GroupedLinearFast":
        new = _convert_grouped_linear_fast(module, backend)
    elif kind == "InterleaveChannelsFast":
        new = kphi3_kernels.InterleaveChannelsFast(module.step_size, module.last_dim, backend=backend)
    else:
        new = _convert_block(module, getattr(kphi3_kernels, kind), backend, memo, counter)
    new.train(module.training)
    memo[id(module)] = new
    counter[0] += 1
    return new


def _convert_grouped_linear_fast(old: nn.Module, backend: str) -> nn.Module:
    G, s, og = old.weight.shape
    if old.num_groups != G or old.in_features != G * s or old.out_features != G * og:
        raise ValueError(
            f"GroupedLinearFast: weight of shape {tuple(old.weight.shape)} does not match "
            f"in_features={old.in_features}, out_features={old.out_features}, num_groups={old.num_groups}"
        )
    with torch.device("meta"):  # no throw-away allocation or init: the old parameters move in
        new = kphi3_kernels.GroupedLinearFast(old.in_features, old.out_features, G, bias=old.bias is not None,
                                              backend=backend)
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    return new


def _convert_block(old: nn.Module, cls, backend: str, memo, counter) -> nn.Module:
    with torch.device("meta"):
        new = cls(old.in_features, old.out_features, min_channels_per_group=old.min_channels_per_group,
                  last_dim=old.last_dim, use_bias=old.use_bias, activation=old.activation, backend=backend)
    old_first = old.first_pointwise_conv
    if new.num_groups == 1:
        # The single-group form: a GroupedLinear of G nn.Linear layers (original class, or ours).
        if not hasattr(old_first, "group_layers") or len(old_first.group_layers) != 1:
            raise ValueError(f"{type(old).__name__}: expected a single-group GroupedLinear first_pointwise_conv")
        new.first_pointwise_conv.group_layers = old_first.group_layers  # the same nn.Linear, same Parameters
    else:
        if getattr(old_first, "num_groups", None) != new.num_groups:
            raise ValueError(
                f"{type(old).__name__}({old.in_features}, {old.out_features}): the group rule gives "
                f"{new.num_groups} groups but the module holds {getattr(old_first, 'num_groups', None)}"
            )
        for name in ("first_pointwise_conv", "second_pointwise_conv", "interleave_layer"):
            old_child = getattr(old, name, None)
            if name in new._modules:
                if old_child is None:
                    raise ValueError(f"{type(old).__name__}: the original module has no {name}")
                new._modules[name] = _convert(old_child, backend, memo, counter)
    new.backend = backend
    leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"{type(old).__name__}: could not carry over {leftover} from the original module")
    return new


__all__ = ["apply_kphi3_kernels", "PATCHED_CLASS_NAMES"]
