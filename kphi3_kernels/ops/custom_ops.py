"""The op-level family of the package's operators: every op-level launcher of both backends,
registered with ``torch.library`` in one namespace, ``kphi3``, with a fake (shape)
implementation, an autograd formula and a FLOP formula, through the operator table's one
registration helper (``registry.register_family``; the fused decoder's family is
``fused_ops.py``).

For each backend ``b`` in ``torch`` and ``triton`` there are seven operators on 2-D ``[M, C]``
operands (``functional.py`` validates, flattens and applies autocast before calling them):

==========================================================  ====================================
operator                                                    returns
==========================================================  ====================================
``grouped_linear_b(x, weight, bias?)``                      ``y``
``grouped_linear_bwd_b(dy, x, weight, need_dx, need_dw,     the needed ones of ``[dx, dw, db]``
need_db)``
``gpc_io_b(x, weight1, weight2, bias1?, bias2?, save_xi)``  ``(y, xi)``: ``xi`` is the
                                                            de-interleaved input, kept for the
                                                            backward's dW2 where ``save_xi``
                                                            and the backend keeps it
                                                            (``io_saves_xi``); else empty
``gpc_io_bwd_b(dy, x, xi, weight1, weight2, need_dx,        the needed ones of
need_dw1, need_dw2, need_db1, need_db2)``                   ``[dx, dw1, dw2, db1, db2]``; an
                                                            empty ``xi`` is recomputed
``gpc_block_b(x, weight1, weight2?, bias1?, bias2?)``       ``(y, h)``: ``h`` is ``first(x)``
                                                            interleaved, kept for the backward;
                                                            empty when ``weight2`` is None
``gpc_block_bwd_b(dy, x, h?, weight1, weight2?, need_dx,    the needed ones of
need_dw1, need_dw2, need_db1, need_db2)``                   ``[dx, dw1, dw2, db1, db2]``
``interleave_b(x, step)``                                   ``y``
==========================================================  ====================================

The backend is chosen by picking the operator (``functional.py`` resolves it; the Python helpers
below take it as ``backend=``); an operator's autograd formula only calls operators of its own
backend. Every operator returns fresh contiguous tensors: no output aliases an input or another
output, and nothing is mutated.

What kind of operator each one is:

* ``torch`` backend: ``torch.library.custom_op``, opaque to ``torch.compile`` (called as an
  extern kernel).
* ``triton`` backend with a GPU: ``torch.library.triton_op``. Under ``torch.compile`` its body is
  traced and every launch goes through ``torch.library.wrap_triton`` (see ``launch.py``), so
  Inductor sees the Triton kernels themselves.
* ``triton`` backend under Triton's CPU interpreter: a plain ``custom_op``. Interpreted kernels
  cannot be traced into a graph, so the operator stays opaque; it still compiles, exports and
  has the same autograd formulas.

Double backward: the gradient of each backward operator is written in terms of the operators
themselves (the backward of a grouped GEMM is grouped GEMMs; the IO block's input gradient is its
own forward on the upstream gradient), so gradients of any order keep a graph.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .registry import (BACKENDS, NAMESPACE, OPERATORS, _call, _EAGER, _fresh,  # noqa: F401
                       _needed, _no_autocast, _unpack, launchers as _impl, op, register_family)
from . import flops

# --------------------------------------------------------------------------------------------
# Operator bodies (one set per backend) and fake implementations (shared)
# --------------------------------------------------------------------------------------------


def _bodies(backend: str):
    def grouped_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        with _no_autocast(x):
            y = _impl(backend).grouped_linear_fwd(x, weight, bias)
        return _fresh([y], [x, weight, bias])[0]

    def grouped_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, need_dx: bool, need_dw: bool,
                           need_db: bool) -> List[Tensor]:
        needs = (need_dx, need_dw, need_db)
        with _no_autocast(dy):
            grads = _impl(backend).grouped_linear_bwd(dy, x, weight, *needs)
        return _fresh(_needed(grads, needs), [dy, x, weight])

    def gpc_io(x: Tensor, weight1: Tensor, weight2: Tensor, bias1: Optional[Tensor],
               bias2: Optional[Tensor], save_xi: bool) -> Tuple[Tensor, Tensor]:
        with _no_autocast(x):
            y, xi = _impl(backend).gpc_io_fwd(x, weight1, weight2, bias1, bias2, save_xi)
        y, xi = _fresh([y, xi], [x, weight1, weight2, bias1, bias2])
        return y, xi

    def gpc_io_bwd(dy: Tensor, x: Tensor, xi: Tensor, weight1: Tensor, weight2: Tensor,
                   need_dx: bool, need_dw1: bool, need_dw2: bool, need_db1: bool,
                   need_db2: bool) -> List[Tensor]:
        needs = (need_dx, need_dw1, need_dw2, need_db1, need_db2)
        with _no_autocast(dy):
            grads = _impl(backend).gpc_io_bwd(dy, x, xi, weight1, weight2, *needs)
        # The two bias gradients are equal; _fresh makes them two tensors.
        return _fresh(_needed(grads, needs), [dy, x, xi, weight1, weight2])

    def gpc_block(x: Tensor, weight1: Tensor, weight2: Optional[Tensor], bias1: Optional[Tensor],
                  bias2: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        with _no_autocast(x):
            y, h = _impl(backend).gpc_block_fwd(x, weight1, weight2, bias1, bias2)
        if weight2 is None:
            h = x.new_empty(0)  # the backward does not need h, and y must not be it
        y, h = _fresh([y, h], [x, weight1, weight2, bias1, bias2])
        return y, h

    def gpc_block_bwd(dy: Tensor, x: Tensor, h: Optional[Tensor], weight1: Tensor,
                      weight2: Optional[Tensor], need_dx: bool, need_dw1: bool, need_dw2: bool,
                      need_db1: bool, need_db2: bool) -> List[Tensor]:
        needs = (need_dx, need_dw1, need_dw2 and weight2 is not None, need_db1,
                 need_db2 and weight2 is not None)
        with _no_autocast(dy):
            grads = _impl(backend).gpc_block_bwd(dy, x, h, weight1, weight2, *needs)
        return _fresh(_needed(grads, needs), [dy, x, h, weight1, weight2])

    def interleave(x: Tensor, step: int) -> Tensor:
        y = _impl(backend).interleave_fwd(x, step)
        return _fresh([y], [x])[0]

    return dict(grouped_linear=grouped_linear, grouped_linear_bwd=grouped_linear_bwd,
                gpc_io=gpc_io, gpc_io_bwd=gpc_io_bwd, gpc_block=gpc_block,
                gpc_block_bwd=gpc_block_bwd, interleave=interleave)


def _rows(dy: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    G, s, _ = weight.shape
    return dy.new_empty((x.shape[0], G * s))


def _fake_grouped_linear(x, weight, bias):
    G, _, og = weight.shape
    return x.new_empty((x.shape[0], G * og))


def _fake_grouped_linear_bwd(dy, x, weight, need_dx, need_dw, need_db):
    G, _, og = weight.shape
    return _needed([_rows(dy, x, weight), weight.new_empty(weight.shape),
                    dy.new_empty((G, og))], (need_dx, need_dw, need_db))


def _fake_gpc_io(backend: str):
    def fake(x, weight1, weight2, bias1, bias2, save_xi):
        # The launcher's own rule; it does not depend on M, so no shape guard arises.
        saved = _impl(backend).io_saves_xi(save_xi)
        return (_fake_grouped_linear(x, weight1, None),
                torch.empty_like(x, memory_format=torch.contiguous_format) if saved
                else x.new_empty(0))
    return fake


def _fake_gpc_io_bwd(dy, x, xi, weight1, weight2, need_dx, need_dw1, need_dw2, need_db1, need_db2):
    G, _, og = weight1.shape
    return _needed([_rows(dy, x, weight1), weight1.new_empty(weight1.shape),
                    weight2.new_empty(weight2.shape), dy.new_empty((G, og)),
                    dy.new_empty((G, og))], (need_dx, need_dw1, need_dw2, need_db1, need_db2))


def _fake_gpc_block(x, weight1, weight2, bias1, bias2):
    y = _fake_grouped_linear(x, weight1, None)
    return y, (x.new_empty(0) if weight2 is None else torch.empty_like(y))


def _fake_gpc_block_bwd(dy, x, h, weight1, weight2, need_dx, need_dw1, need_dw2, need_db1,
                        need_db2):
    G, _, og = weight1.shape
    second = weight2 is not None
    return _needed([_rows(dy, x, weight1), weight1.new_empty(weight1.shape),
                    weight2.new_empty(weight2.shape) if second else None,
                    dy.new_empty((G, og)), dy.new_empty((G, og))],
                   (need_dx, need_dw1, need_dw2 and second, need_db1, need_db2 and second))


def _fake_interleave(x, step):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_FAKES = dict(grouped_linear=_fake_grouped_linear, grouped_linear_bwd=_fake_grouped_linear_bwd,
              gpc_io_bwd=_fake_gpc_io_bwd, gpc_block=_fake_gpc_block,
              gpc_block_bwd=_fake_gpc_block_bwd, interleave=_fake_interleave)


def _fakes(backend: str):
    return dict(_FAKES, gpc_io=_fake_gpc_io(backend))


# --------------------------------------------------------------------------------------------
# Calling the operators
# --------------------------------------------------------------------------------------------


def grouped_linear(x, weight, bias=None, *, backend: str) -> Tensor:
    return _call("grouped_linear", backend, x, weight, bias)


def grouped_linear_bwd(dy, x, weight, need_dx=True, need_dw=True, need_db=False, *, backend: str):
    needs = (need_dx, need_dw, need_db)
    return _unpack(_call("grouped_linear_bwd", backend, dy, x, weight, *needs), needs)


def gpc_io(x, weight1, weight2, bias1=None, bias2=None, *, backend: str) -> Tensor:
    """The IO block's output. The operator's second output, ``xi``, is for its backward: it is
    asked for only where a gradient will reach ``weight2`` (``dW2`` reads it)."""
    save_xi = torch.is_grad_enabled() and weight2.requires_grad
    return _call("gpc_io", backend, x, weight1, weight2, bias1, bias2, save_xi)[0]


def gpc_io_bwd(dy, x, weight1, weight2, need_dx=True, need_dw1=True, need_dw2=True,
               need_db1=False, need_db2=False, *, xi: Optional[Tensor] = None, backend: str):
    """The IO block's gradients; ``xi`` is the forward's saved de-interleaved input (None or
    empty: recomputed from ``x`` where ``dW2`` needs it)."""
    needs = (need_dx, need_dw1, need_dw2, need_db1, need_db2)
    xi = x.new_empty(0) if xi is None else xi
    return _unpack(_call("gpc_io_bwd", backend, dy, x, xi, weight1, weight2, *needs), needs)


def gpc_block(x, weight1, weight2=None, bias1=None, bias2=None, *, backend: str) -> Tensor:
    """The non-IO block's output (the operator's second output, ``h``, is for its backward)."""
    return _call("gpc_block", backend, x, weight1, weight2, bias1, bias2)[0]


def gpc_block_bwd(dy, x, h, weight1, weight2=None, need_dx=True, need_dw1=True, need_dw2=True,
                  need_db1=False, need_db2=False, *, backend: str):
    second = weight2 is not None
    needs = (need_dx, need_dw1, need_dw2 and second, need_db1, need_db2 and second)
    return _unpack(_call("gpc_block_bwd", backend, dy, x, h, weight1, weight2, *needs), needs)


def interleave(x, step: int, *, backend: str) -> Tensor:
    return _call("interleave", backend, x, step)


# --------------------------------------------------------------------------------------------
# Autograd formulas, written in terms of the operators (so that they are differentiable again)
# --------------------------------------------------------------------------------------------


def _total(*terms: Optional[Tensor]) -> Optional[Tensor]:
    present = [t for t in terms if t is not None]
    if not present:
        return None
    out = present[0]
    for t in present[1:]:
        out = out + t
    return out


def _zero_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def _bias_rows(bias: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A ``[G, og]`` bias gradient broadcast over the rows of ``like`` (``[M, G*og]``)."""
    return None if bias is None else bias.reshape(1, -1).expand(like.shape)


def _linear_term(x, weight, bias, like, backend):
    """``grouped_linear(x, weight, bias)`` where x may be None (then only the bias, broadcast)."""
    if x is None:
        return _bias_rows(bias, like)
    return grouped_linear(x, weight, bias, backend=backend)


def _grouped_linear_bwd_vjp(dy, x, weight, gdx, gdw, gdb, needs, backend):
    """The gradient of ``(dx, dw, db) = grouped_linear_bwd(dy, x, weight)`` with respect to
    ``(dy, x, weight)``, given the upstream gradients ``(gdx, gdw, gdb)`` (each may be None).

    dx = dy W^T, dW = x^T dy, db = sum(dy):  d dy = gdx W + x gdW + gdb,  d x = dy gdW^T,
    d W = gdx^T dy.
    """
    need_dy, need_x, need_w = needs
    g_dy = g_x = g_w = None
    if need_dy:
        g_dy = _total(_linear_term(gdx, weight, gdb, dy, backend),
                      None if gdw is None else grouped_linear(x, gdw, None, backend=backend))
    if need_x and gdw is not None:
        g_x = grouped_linear_bwd(dy, x, gdw, True, False, False, backend=backend)[0]
    if need_w and gdx is not None:
        g_w = grouped_linear_bwd(dy, gdx, weight, False, True, False, backend=backend)[1]
    return g_dy, g_x, g_w


def _formulas(backend: str):
    """Each operator's ``(backward, setup_context)`` on ``backend``."""
    formulas = {}

    def register(name, backward, setup_context):
        formulas[name] = (backward, setup_context)

    # ---- grouped_linear ----------------------------------------------------------------------
    def gl_setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def gl_backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return grouped_linear_bwd(dy, x, weight, need[0], need[1], ctx.has_bias and need[2],
                                  backend=backend)

    register("grouped_linear", gl_backward, gl_setup)

    def gl_bwd_setup(ctx, inputs, output):
        dy, x, weight, *needs = inputs
        ctx.save_for_backward(dy, x, weight)
        ctx.out_needs = needs
        ctx.set_materialize_grads(False)

    def gl_bwd_backward(ctx, grads):
        dy, x, weight = ctx.saved_tensors
        gdx, gdw, gdb = _unpack(grads, ctx.out_needs)
        return (*_grouped_linear_bwd_vjp(dy, x, weight, gdx, gdw, gdb,
                                         ctx.needs_input_grad[:3], backend), None, None, None)

    register("grouped_linear_bwd", gl_bwd_backward, gl_bwd_setup)

    # ---- gpc_io ------------------------------------------------------------------------------
    def io_setup(ctx, inputs, output):
        x, weight1, weight2, bias1, bias2, _ = inputs
        ctx.save_for_backward(x, output[1], weight1, weight2)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.set_materialize_grads(False)

    def io_backward(ctx, dy, dxi):
        x, xi, weight1, weight2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None and dxi is None:
            return None, None, None, None, None, None
        if dy is None:  # a gradient reaches only xi (never from the public functions)
            dy = x.new_zeros((x.shape[0], weight1.shape[0] * weight1.shape[2]))
        grads = gpc_io_bwd(dy, x, weight1, weight2, need[0], need[1], need[2],
                           ctx.has_bias[0] and need[3], ctx.has_bias[1] and need[4], xi=xi,
                           backend=backend)
        if dxi is not None and dxi.numel() and need[0]:
            # xi = interleave(x, s), whose inverse is the interleave with step G.
            grads = (grads[0] + interleave(dxi, weight1.shape[0], backend=backend), *grads[1:])
        return (*grads, None)

    register("gpc_io", io_backward, io_setup)

    def io_bwd_setup(ctx, inputs, output):
        dy, x, xi, weight1, weight2, *needs = inputs
        ctx.save_for_backward(dy, x, weight1, weight2)
        ctx.out_needs = needs
        ctx.set_materialize_grads(False)

    def io_bwd_backward(ctx, grads):
        # dx = io_fwd^T(dy), dW1 = x^T dy, dW2 = x[:, n::G]^T dy, db1 = db2 = sum(dy). xi is a
        # cache of x[:, n::G]: the derivative through it is x's (total), and xi gets None.
        dy, x, weight1, weight2 = ctx.saved_tensors
        gdx, gdw1, gdw2, gdb1, gdb2 = _unpack(grads, ctx.out_needs)
        need_dy, need_x, _, need_w1, need_w2 = ctx.needs_input_grad[:5]
        g_dy = g_x = g_w1 = g_w2 = None
        has_gdw = gdw1 is not None or gdw2 is not None
        if need_dy:
            first = (_total(_bias_rows(gdb1, dy), _bias_rows(gdb2, dy)) if gdx is None else
                     gpc_io(gdx, weight1, weight2, gdb1, gdb2, backend=backend))
            second = None if not has_gdw else gpc_io(
                x, _zero_if_none(gdw1, weight1), _zero_if_none(gdw2, weight2), backend=backend)
            g_dy = _total(first, second)
        if need_x and has_gdw:
            g_x = gpc_io_bwd(dy, x, _zero_if_none(gdw1, weight1), _zero_if_none(gdw2, weight2),
                             True, False, False, backend=backend)[0]
        if (need_w1 or need_w2) and gdx is not None:
            _, g_w1, g_w2, _, _ = gpc_io_bwd(dy, gdx, weight1, weight2, False, need_w1, need_w2,
                                             backend=backend)
        return g_dy, g_x, None, g_w1, g_w2, None, None, None, None, None

    register("gpc_io_bwd", io_bwd_backward, io_bwd_setup)

    # ---- gpc_block ---------------------------------------------------------------------------
    def block_setup(ctx, inputs, output):
        x, weight1, weight2, bias1, bias2 = inputs
        h = output[1] if weight2 is not None else None
        ctx.save_for_backward(x, h, weight1, weight2)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.set_materialize_grads(False)

    def block_backward(ctx, dy, dh):
        x, h, weight1, weight2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        needs = (need[0], need[1], need[2], ctx.has_bias[0] and need[3],
                 ctx.has_bias[1] and need[4])
        if dy is None and dh is None:
            return None, None, None, None, None
        if dy is None:
            dy = torch.zeros_like(h)
        if dh is None or weight2 is None:
            return gpc_block_bwd(dy, x, h, weight1, weight2, *needs, backend=backend)
        # A gradient reaches h itself (only from a double backward): compose the backward.
        # y = first(x) + second(h), h = interleave(first(x), og); interleave(., G) inverts it.
        G = weight1.shape[0]
        d_int, dw2, db2 = grouped_linear_bwd(dy, h, weight2, True, needs[2], needs[4],
                                             backend=backend)
        d_first = interleave(d_int + dh, G, backend=backend) + dy
        dx, dw1, db1 = grouped_linear_bwd(d_first, x, weight1, needs[0], needs[1], needs[3],
                                          backend=backend)
        return dx, dw1, dw2, db1, db2

    register("gpc_block", block_backward, block_setup)

    def block_bwd_setup(ctx, inputs, output):
        dy, x, h, weight1, weight2, *needs = inputs
        ctx.save_for_backward(dy, x, h, weight1, weight2)
        ctx.out_needs = (needs[0], needs[1], needs[2] and weight2 is not None, needs[3],
                         needs[4] and weight2 is not None)
        ctx.set_materialize_grads(False)

    def block_bwd_backward(ctx, grads):
        # As a composition: [with weight2: t = dy W2^T, dW2 = h^T dy, db2 = sum(dy),
        # d_first = interleave(t, G) + dy; without: d_first = interleave(dy, G)], then
        # (dx, dW1, db1) = grouped_linear_bwd(d_first, x, W1). Differentiated stage by stage.
        dy, x, h, weight1, weight2 = ctx.saved_tensors
        gdx, gdw1, gdw2, gdb1, gdb2 = _unpack(grads, ctx.out_needs)
        need_dy, need_x, need_h, need_w1, need_w2 = ctx.needs_input_grad[:5]
        G, _, og = weight1.shape
        second = weight2 is not None
        g_x = g_w1 = g_h = g_w2 = g_dy = None
        d_first = None
        if (need_x and gdw1 is not None) or (need_w1 and gdx is not None):
            if second:
                t = grouped_linear_bwd(dy, h, weight2, True, False, False, backend=backend)[0]
                d_first = interleave(t, G, backend=backend) + dy
            else:
                d_first = interleave(dy, G, backend=backend)
        g_first, g_x, g_w1 = _grouped_linear_bwd_vjp(
            d_first, x, weight1, gdx, gdw1, gdb1, (need_dy or need_h or need_w2, need_x, need_w1),
            backend)
        if not second:
            if need_dy and g_first is not None:
                g_dy = interleave(g_first, og, backend=backend)
        else:
            g_t = None if g_first is None else interleave(g_first, og, backend=backend)
            g_dy2, g_h, g_w2 = _grouped_linear_bwd_vjp(dy, h, weight2, g_t, gdw2, gdb2,
                                                      (need_dy, need_h, need_w2), backend)
            if need_dy:
                g_dy = _total(g_first, g_dy2)
        return (g_dy, g_x, g_h, g_w1, g_w2, None, None, None, None, None)

    register("gpc_block_bwd", block_bwd_backward, block_bwd_setup)

    # ---- interleave --------------------------------------------------------------------------
    def il_setup(ctx, inputs, output):
        x, step = inputs
        ctx.inverse_step = x.shape[1] // step

    def il_backward(ctx, dy):
        # The inverse of the interleave with step s over C channels is the one with step C/s.
        return interleave(dy, ctx.inverse_step, backend=backend), None

    register("interleave", il_backward, il_setup)
    return formulas


# --------------------------------------------------------------------------------------------
# Registration: one family of the operator table (registry.OPERATORS)
# --------------------------------------------------------------------------------------------

register_family("op-level", _bodies, _fakes, _formulas, flops.FORMULAS)
