"""``torch.autograd.Function`` glue, written once for both implementations.

Every Function takes ``impl``: the module of launchers to run (``triton_impl`` or
``torch_impl``, same signatures). Operands arrive 2-D (``[M, C]``) and already in one dtype
(``functional.py`` validates, flattens and applies autocast); autocast is switched off inside so
that no op is re-cast behind our back.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


class GroupedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, impl):
        ctx.impl = impl
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        with _no_autocast(x):
            return impl.grouped_linear_fwd(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw, db = ctx.impl.grouped_linear_bwd(
            dy, x, weight, need[0], need[1], ctx.has_bias and need[2]
        )
        return dx, dw, db, None


class GpcIOFunction(torch.autograd.Function):
    """``first(x) + second(interleave(x))`` of the IO block (G > 1), fused."""

    @staticmethod
    def forward(ctx, x, weight1, weight2, bias1, bias2, impl):
        ctx.impl = impl
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.save_for_backward(x, weight1, weight2)
        with _no_autocast(x):
            return impl.gpc_io_fwd(x, weight1, weight2, bias1, bias2)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight1, weight2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = ctx.impl.gpc_io_bwd(
            dy, x, weight1, weight2, need[0], need[1], need[2],
            ctx.has_bias[0] and need[3], ctx.has_bias[1] and need[4],
        )
        return (*grads, None)


class GpcBlockFunction(torch.autograd.Function):
    """The non-IO block (G > 1, no activation): interleaving store, residual in the epilogue."""

    @staticmethod
    def forward(ctx, x, weight1, weight2, bias1, bias2, impl):
        ctx.impl = impl
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        with _no_autocast(x):
            y, h = impl.gpc_block_fwd(x, weight1, weight2, bias1, bias2)
        ctx.save_for_backward(x, h, weight1, weight2)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, h, weight1, weight2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = ctx.impl.gpc_block_bwd(
            dy, x, h, weight1, weight2, need[0], need[1], need[2],
            ctx.has_bias[0] and need[3], ctx.has_bias[1] and need[4],
        )
        return (*grads, None)


class InterleaveFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, impl):
        ctx.impl = impl
        ctx.inverse_step = x.shape[1] // step
        return impl.interleave_fwd(x, step)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        # The inverse of the interleave with step s over C channels is the one with step C/s.
        return ctx.impl.interleave_fwd(dy, ctx.inverse_step), None, None
