"""The fused decoder's operators: producer and consumer of the block-residue layout.

One family of the operator table (``registry.register_family``), registered like
``custom_ops.py``'s for both backends (namespace ``kphi3``; on ``triton`` a ``triton_op`` with a
GPU, an opaque ``custom_op`` under the interpreter; on ``torch`` a ``custom_op``), with
shape-only fakes, autograd formulas, FLOP formulas (``flops.FUSED_FORMULAS``) and the same eager
fast path. The bodies call ``registry.fused_launchers(backend)``: the Triton kernels'
launchers (``triton_fused.py``) or their PyTorch counterparts (``torch_impl.py``), same names
and signatures. The table below names the triton operators; each has a ``_torch`` twin.

==================================================================  ===========================
operator                                                            returns
==================================================================  ===========================
``silu_mul_layout_triton(gu, groups, run)``                         ``t``: ``up * silu(gate)``
                                                                    in the layout (``gu`` =
                                                                    ``[gate | up]``)
``silu_mul_layout_bwd_triton(dt, gu, groups)``                      ``dgu``
``gpc_io_layout_triton(t, weight1, weight2, bias1?, bias2?)``       ``y`` of the IO block
``gpc_io_layout_bwd_triton(dy, t, weight1, weight2, need_dt,        the needed ones of
need_dw1, need_dw2, need_db1, need_db2)``                           ``[dt, dw1, dw2, db1, db2]``
``mlp_tail_triton(gu, weight1, weight2, bias1?, bias2?,             ``(y, t)``: down_proj of
residual?, run, t?)``                                               ``up * silu(gate)`` (plus
                                                                    the residual), and the
                                                                    layout it read (saved;
                                                                    empty where ``t`` was
                                                                    given: a norm head's)
``mlp_tail_bwd_triton(dy, gu, t, weight1, weight2, need_dgu,        the needed ones of
need_dw1, need_dw2, need_db1, need_db2)``                           ``[dgu, dw1, dw2, db1, db2]``
``rms_norm_triton(x, weight, eps)``                                 ``(n, rstd)``: RMSNorm in
                                                                    channel order, the
                                                                    reciprocal RMS (saved)
``add_rms_norm_triton(residual, x, weight, eps)``                   ``(h, n, rstd)``: ``h =
                                                                    residual + x`` and its
                                                                    RMSNorm ``n``
``rms_norm_bwd_triton(dn, dh?, x, weight, rstd, need_dx,            the needed ones of ``[dx,
need_dw)``                                                          dweight]``; ``dx``
                                                                    includes ``dh``
``norm_io_triton(x, norm_weight, eps, weight1, weight2, bias1?,      ``(y, h, t, rstd, a)``: the
bias2?, residual?, run, act_groups, act_run)``                      IO block of ``RMSNorm(h)``,
                                                                    ``h = residual + x`` (empty
                                                                    without one; else ``x``),
                                                                    the layout it read and the
                                                                    reciprocal RMS (saved), and
                                                                    ``up * silu(gate)`` of ``y``
                                                                    in the layout of
                                                                    ``act_groups`` groups, runs
                                                                    of ``act_run`` (empty for
                                                                    0; never differentiable)
``norm_io_split_triton(x, norm_weight, eps, weight1, weight2,        ``(y, h, n, xi, rstd, a)``:
bias1?, bias2?, residual?, act_groups, act_run)``                   the same, the block's input
                                                                    as ``n`` and its
                                                                    de-interleaved copy ``xi``
``norm_io_bwd_triton(dy, dh?, x, norm_weight, rstd, t, weight1,      the needed ones of ``[dx,
weight2, need_dx, need_dnorm, need_dw1, need_dw2, need_db1,         dnorm, dw1, dw2, db1,
need_db2)``                                                         db2]``
``norm_io_split_bwd_triton(dy, dh?, x, norm_weight, rstd, n, xi,     the same
weight1, weight2, need_dx, ...)``
==================================================================  ===========================

The backward operators' autograd formula (``registry.refuse_double_backward``) refuses a
second derivative through the fused path, on both backends, with an error that names the
op-level path (which the model runs with ``fused_decoder=False``, and which supports gradients
of any order).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import flops
from . import registry as co


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty((0,))


def _act(groups: int, run: int) -> Optional[Tuple[int, int]]:
    """A norm head's ``act`` argument: the layout of the activation it writes (0: none)."""
    return (groups, run) if groups else None


def _with_bias_grads(impl, grads, dy, groups: int, need_db1: bool, need_db2: bool):
    """``grads`` followed by the two bias gradients (one column sum of dy, asked-for only)."""
    db = impl.bias_grad(dy, groups) if need_db1 or need_db2 else None
    return (*grads, db if need_db1 else None, db if need_db2 else None)


def _bodies(backend: str):
    def impl():
        return co.fused_launchers(backend)

    def silu_mul_layout(gu: Tensor, groups: int, run: int) -> Tensor:
        with co._no_autocast(gu):
            t = impl().silu_mul_layout_fwd(gu, groups, run)
        return co._fresh([t], [gu])[0]

    def silu_mul_layout_bwd(dt: Tensor, gu: Tensor, groups: int) -> Tensor:
        with co._no_autocast(dt):
            dgu = impl().silu_mul_layout_bwd(dt, gu, groups)
        return co._fresh([dgu], [dt, gu])[0]

    def gpc_io_layout(t: Tensor, weight1: Tensor, weight2: Tensor, bias1: Optional[Tensor],
                      bias2: Optional[Tensor]) -> Tensor:
        with co._no_autocast(t):
            y = impl().gpc_io_layout_fwd(t.contiguous(), weight1, weight2, bias1,
                                                       bias2)
        return co._fresh([y], [t, weight1, weight2, bias1, bias2])[0]

    def gpc_io_layout_bwd(dy: Tensor, t: Tensor, weight1: Tensor, weight2: Tensor, need_dt: bool,
                          need_dw1: bool, need_dw2: bool, need_db1: bool, need_db2: bool
                          ) -> List[Tensor]:
        needs = (need_dt, need_dw1, need_dw2, need_db1, need_db2)
        with co._no_autocast(dy):
            dt, dw1, dw2 = impl().gpc_io_layout_bwd(
                dy, t.contiguous(), weight1, weight2, need_dt, need_dw1, need_dw2)
            grads = _with_bias_grads(impl(), (dt, dw1, dw2), dy, weight1.shape[0], need_db1, need_db2)
        return co._fresh(co._needed(grads, needs), [dy, t, weight1, weight2])

    def mlp_tail(gu: Tensor, weight1: Tensor, weight2: Tensor, bias1: Optional[Tensor],
                 bias2: Optional[Tensor], residual: Optional[Tensor], run: int,
                 t: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        with co._no_autocast(gu):
            y, t_out = impl().mlp_tail_fwd(gu, weight1, weight2, bias1, bias2, run, residual,
                                           None if t is None else t.contiguous())
        # A given layout is the caller's: returned empty (an output may not alias an input).
        y, t_out = co._fresh([y, t_out if t is None else _or_empty(None, gu)],
                             [gu, weight1, weight2, bias1, bias2, residual, t])
        return y, t_out

    def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
        with co._no_autocast(x):
            _, n, rstd, _ = impl().rms_norm_fwd(x, weight, eps)
        n, rstd = co._fresh([n, rstd], [x, weight])
        return n, rstd

    def add_rms_norm(residual: Tensor, x: Tensor, weight: Tensor, eps: float
                     ) -> Tuple[Tensor, Tensor, Tensor]:
        with co._no_autocast(x):
            h, n, rstd, _ = impl().rms_norm_fwd(x, weight, eps, residual)
        h, n, rstd = co._fresh([h, n, rstd], [residual, x, weight])
        return h, n, rstd

    def rms_norm_bwd(dn: Tensor, dh: Optional[Tensor], x: Tensor, weight: Tensor, rstd: Tensor,
                     need_dx: bool, need_dw: bool) -> List[Tensor]:
        with co._no_autocast(dn):
            dx, dw = impl().rms_norm_bwd(dn, x, weight, rstd, need_dx, need_dw, dh)
        return co._fresh(co._needed((dx, dw), (need_dx, need_dw)), [dn, dh, x, weight, rstd])

    def mlp_tail_bwd(dy: Tensor, gu: Tensor, t: Tensor, weight1: Tensor, weight2: Tensor,
                     need_dgu: bool, need_dw1: bool, need_dw2: bool, need_db1: bool,
                     need_db2: bool) -> List[Tensor]:
        needs = (need_dgu, need_dw1, need_dw2, need_db1, need_db2)
        with co._no_autocast(dy):
            dgu, dw1, dw2 = impl().mlp_tail_bwd(
                dy, gu, t.contiguous(), weight1, weight2, need_dgu, need_dw1, need_dw2)
            grads = _with_bias_grads(impl(), (dgu, dw1, dw2), dy, weight1.shape[0], need_db1, need_db2)
        return co._fresh(co._needed(grads, needs), [dy, gu, t, weight1, weight2])

    def norm_io(x: Tensor, norm_weight: Tensor, eps: float, weight1: Tensor, weight2: Tensor,
                bias1: Optional[Tensor], bias2: Optional[Tensor], residual: Optional[Tensor],
                run: int, act_groups: int, act_run: int
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        with co._no_autocast(x):
            y, h, t, rstd, a = impl().norm_io_fwd(
                x, norm_weight, eps, weight1, weight2, bias1, bias2, run, residual,
                _act(act_groups, act_run))
        return tuple(co._fresh([y, _or_empty(h, x), t, rstd, _or_empty(a, x)],
                               [x, norm_weight, weight1, weight2, bias1, bias2, residual]))

    def norm_io_split(x: Tensor, norm_weight: Tensor, eps: float, weight1: Tensor,
                      weight2: Tensor, bias1: Optional[Tensor], bias2: Optional[Tensor],
                      residual: Optional[Tensor], act_groups: int, act_run: int
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        with co._no_autocast(x):
            y, h, n, xi, rstd, a = impl().norm_io_split_fwd(
                x, norm_weight, eps, weight1, weight2, bias1, bias2, residual,
                _act(act_groups, act_run))
        return tuple(co._fresh([y, _or_empty(h, x), n, xi, rstd, _or_empty(a, x)],
                               [x, norm_weight, weight1, weight2, bias1, bias2, residual]))

    def norm_io_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, norm_weight: Tensor,
                    rstd: Tensor, t: Tensor, weight1: Tensor, weight2: Tensor, need_dx: bool,
                    need_dnorm: bool, need_dw1: bool, need_dw2: bool, need_db1: bool,
                    need_db2: bool) -> List[Tensor]:
        needs = (need_dx, need_dnorm, need_dw1, need_dw2, need_db1, need_db2)
        with co._no_autocast(dy):
            grads = impl().norm_io_bwd(
                dy, x, norm_weight, rstd, t.contiguous(), weight1, weight2, need_dx, need_dnorm,
                need_dw1, need_dw2, dh)
            grads = _with_bias_grads(impl(), grads, dy, weight1.shape[0], need_db1, need_db2)
        return co._fresh(co._needed(grads, needs),
                         [dy, dh, x, norm_weight, rstd, t, weight1, weight2])

    def norm_io_split_bwd(dy: Tensor, dh: Optional[Tensor], x: Tensor, norm_weight: Tensor,
                          rstd: Tensor, n: Tensor, xi: Tensor, weight1: Tensor, weight2: Tensor,
                          need_dx: bool, need_dnorm: bool, need_dw1: bool, need_dw2: bool,
                          need_db1: bool, need_db2: bool) -> List[Tensor]:
        needs = (need_dx, need_dnorm, need_dw1, need_dw2, need_db1, need_db2)
        with co._no_autocast(dy):
            grads = impl().norm_io_split_bwd(
                dy, x, norm_weight, rstd, n.contiguous(), xi.contiguous(), weight1, weight2,
                need_dx, need_dnorm, need_dw1, need_dw2, dh)
            grads = _with_bias_grads(impl(), grads, dy, weight1.shape[0], need_db1, need_db2)
        return co._fresh(co._needed(grads, needs),
                         [dy, dh, x, norm_weight, rstd, n, xi, weight1, weight2])

    return dict(silu_mul_layout=silu_mul_layout, silu_mul_layout_bwd=silu_mul_layout_bwd,
                gpc_io_layout=gpc_io_layout, gpc_io_layout_bwd=gpc_io_layout_bwd,
                mlp_tail=mlp_tail, mlp_tail_bwd=mlp_tail_bwd,
                rms_norm=rms_norm, add_rms_norm=add_rms_norm, rms_norm_bwd=rms_norm_bwd,
                norm_io=norm_io, norm_io_bwd=norm_io_bwd, norm_io_split=norm_io_split,
                norm_io_split_bwd=norm_io_split_bwd)


def _fake_io_grads(inputs, dy, weight1, weight2, needs):
    """The asked-for gradients of a backward operator: one like each ``(tensor, dtype)`` of
    ``inputs``, then dW1, dW2 and the two bias gradients ``[G, og]``."""
    G, og = weight1.shape[0], weight1.shape[2]
    likes = [(t, t.shape, dtype) for t, dtype in inputs] + [
        (weight1, weight1.shape, weight1.dtype), (weight2, weight2.shape, weight2.dtype),
        (dy, (G, og), dy.dtype), (dy, (G, og), dy.dtype)]
    return [like.new_empty(shape, dtype=dtype) for (like, shape, dtype), n in zip(likes, needs)
            if n]


def _fake_silu_mul_layout(gu, groups, run):
    return gu.new_empty((gu.shape[0], groups * groups * run))


def _fake_silu_mul_layout_bwd(dt, gu, groups):
    return gu.new_empty(gu.shape)


def _fake_gpc_io_layout(t, weight1, weight2, bias1, bias2):
    return t.new_empty((t.shape[0], weight1.shape[0] * weight1.shape[2]))


def _fake_gpc_io_layout_bwd(dy, t, weight1, weight2, need_dt, need_dw1, need_dw2, need_db1,
                            need_db2):
    return _fake_io_grads([(t, dy.dtype)], dy, weight1, weight2,
                          (need_dt, need_dw1, need_dw2, need_db1, need_db2))


def _fake_mlp_tail(gu, weight1, weight2, bias1, bias2, residual, run, t):
    G, og = weight1.shape[0], weight1.shape[2]
    y_dtype = gu.dtype if residual is None else torch.promote_types(gu.dtype, residual.dtype)
    return [gu.new_empty((gu.shape[0], G * og), dtype=y_dtype),
            gu.new_empty((gu.shape[0], G * G * run) if t is None else (0,))]


def _norm_dtypes(source, weight):
    """``(n, rstd)`` dtypes of a norm of a ``source``-typed input (``rowwise.rms_norm_fwd``)."""
    return (torch.promote_types(source, weight.dtype),
            torch.float64 if source == torch.float64 else torch.float32)


def _fake_rms_norm(x, weight, eps):
    n_dtype, rstd_dtype = _norm_dtypes(x.dtype, weight)
    return x.new_empty(x.shape, dtype=n_dtype), x.new_empty((x.shape[0],), dtype=rstd_dtype)


def _fake_add_rms_norm(residual, x, weight, eps):
    h_dtype = torch.promote_types(residual.dtype, x.dtype)
    n_dtype, rstd_dtype = _norm_dtypes(h_dtype, weight)
    return (x.new_empty(x.shape, dtype=h_dtype), x.new_empty(x.shape, dtype=n_dtype),
            x.new_empty((x.shape[0],), dtype=rstd_dtype))


def _fake_rms_norm_bwd(dn, dh, x, weight, rstd, need_dx, need_dw):
    return ([x.new_empty(x.shape)] if need_dx else []) + (
        [weight.new_empty(weight.shape)] if need_dw else [])


def _fake_mlp_tail_bwd(dy, gu, t, weight1, weight2, need_dgu, need_dw1, need_dw2, need_db1,
                       need_db2):
    return _fake_io_grads([(gu, dy.dtype)], dy, weight1, weight2,
                          (need_dgu, need_dw1, need_dw2, need_db1, need_db2))


def _fake_norm_input(x, norm_weight, residual):
    """``h`` of a norm head (empty without a residual) and the dtype of its rstd."""
    if residual is None:
        return x.new_empty((0,)), _norm_dtypes(x.dtype, norm_weight)[1]
    h = x.new_empty(x.shape, dtype=torch.promote_types(residual.dtype, x.dtype))
    return h, _norm_dtypes(h.dtype, norm_weight)[1]


def _fake_activation(x, weight1, act_groups, act_run):
    """A norm head's activation output: the layout, or empty (x's dtype) where not asked."""
    if not act_groups:
        return x.new_empty((0,))
    return x.new_empty((x.shape[0], act_groups * act_groups * act_run), dtype=weight1.dtype)


def _fake_norm_io(x, norm_weight, eps, weight1, weight2, bias1, bias2, residual, run,
                  act_groups, act_run):
    G, og = weight1.shape[0], weight1.shape[2]
    h, rstd_dtype = _fake_norm_input(x, norm_weight, residual)
    return (x.new_empty((x.shape[0], G * og), dtype=weight1.dtype), h,
            x.new_empty((x.shape[0], G * G * run), dtype=weight1.dtype),
            x.new_empty((x.shape[0],), dtype=rstd_dtype),
            _fake_activation(x, weight1, act_groups, act_run))


def _fake_norm_io_split(x, norm_weight, eps, weight1, weight2, bias1, bias2, residual,
                        act_groups, act_run):
    G, og = weight1.shape[0], weight1.shape[2]
    h, rstd_dtype = _fake_norm_input(x, norm_weight, residual)
    return (x.new_empty((x.shape[0], G * og), dtype=weight1.dtype), h,
            x.new_empty(x.shape, dtype=weight1.dtype), x.new_empty(x.shape, dtype=weight1.dtype),
            x.new_empty((x.shape[0],), dtype=rstd_dtype),
            _fake_activation(x, weight1, act_groups, act_run))


def _fake_norm_io_bwd(dy, dh, x, norm_weight, rstd, t, weight1, weight2, need_dx, need_dnorm,
                      need_dw1, need_dw2, need_db1, need_db2):
    return _fake_io_grads([(x, x.dtype), (norm_weight, norm_weight.dtype)], dy, weight1, weight2,
                          (need_dx, need_dnorm, need_dw1, need_dw2, need_db1, need_db2))


def _fake_norm_io_split_bwd(dy, dh, x, norm_weight, rstd, n, xi, weight1, weight2, *needs):
    return _fake_io_grads([(x, x.dtype), (norm_weight, norm_weight.dtype)], dy, weight1, weight2,
                          needs)


_FAKES = dict(norm_io=_fake_norm_io, norm_io_bwd=_fake_norm_io_bwd,
              norm_io_split=_fake_norm_io_split, norm_io_split_bwd=_fake_norm_io_split_bwd,
              mlp_tail=_fake_mlp_tail, mlp_tail_bwd=_fake_mlp_tail_bwd,
              rms_norm=_fake_rms_norm, add_rms_norm=_fake_add_rms_norm,
              rms_norm_bwd=_fake_rms_norm_bwd,
              silu_mul_layout=_fake_silu_mul_layout,
              silu_mul_layout_bwd=_fake_silu_mul_layout_bwd,
              gpc_io_layout=_fake_gpc_io_layout, gpc_io_layout_bwd=_fake_gpc_io_layout_bwd)


def silu_mul_layout(gu: Tensor, groups: int, run: int, *, backend: str) -> Tensor:
    return co._call("silu_mul_layout", backend, gu, groups, run)


def gpc_io_layout(t, weight1, weight2, bias1=None, bias2=None, *, backend: str) -> Tensor:
    return co._call("gpc_io_layout", backend, t, weight1, weight2, bias1, bias2)


def gpc_io_layout_bwd(dy, t, weight1, weight2, need_dt=True, need_dw1=True, need_dw2=True,
                      need_db1=False, need_db2=False, *, backend: str):
    needs = (need_dt, need_dw1, need_dw2, need_db1, need_db2)
    return co._unpack(co._call("gpc_io_layout_bwd", backend, dy, t, weight1, weight2, *needs),
                      needs)


def mlp_tail(gu, weight1, weight2, bias1=None, bias2=None, run: int = 8, residual=None, t=None,
             *, backend: str) -> Tensor:
    """``y``: ``t`` given (the activation a norm head wrote with ``act``), no activation pass."""
    return co._call("mlp_tail", backend, gu, weight1, weight2, bias1, bias2, residual, run, t)[0]


def rms_norm(x, weight, eps: float, *, backend: str) -> Tensor:
    return co._call("rms_norm", backend, x, weight, float(eps))[0]


def add_rms_norm(residual, x, weight, eps: float, *, backend: str) -> Tuple[Tensor, Tensor]:
    h, n, _ = co._call("add_rms_norm", backend, residual, x, weight, float(eps))
    return h, n


def _head_result(out, residual, act):
    """A norm head's ``(y, h, a)`` from its operator's outputs: ``h`` None without a residual,
    ``a`` None without ``act``."""
    return (out[0], out[1] if residual is not None else None,
            out[-1] if act is not None else None)


def norm_io(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
            run: int = 8, residual=None, act: Optional[Tuple[int, int]] = None, *, backend: str):
    """``(y, h, a)``: the layout norm head's block output, ``residual + x`` (None without a
    residual) and, for ``act = (groups, run)``, the activation ``up * silu(gate)`` of ``y`` in
    that layout, written by its launch (else None)."""
    groups, act_run = act or (0, 0)
    return _head_result(co._call("norm_io", backend, x, norm_weight, float(eps), weight1,
                                 weight2, bias1, bias2, residual, run, groups, act_run),
                        residual, act)


def norm_io_split(x, norm_weight, eps: float, weight1, weight2, bias1=None, bias2=None,
                  residual=None, act: Optional[Tuple[int, int]] = None, *, backend: str):
    """``(y, h, a)`` of the split norm head, as ``norm_io``'s."""
    groups, act_run = act or (0, 0)
    return _head_result(co._call("norm_io_split", backend, x, norm_weight, float(eps), weight1,
                                 weight2, bias1, bias2, residual, groups, act_run),
                        residual, act)


def _no_grad_to_saved(name: str, grad) -> None:
    if grad is not None:
        raise RuntimeError(f"kphi3::{name}: a gradient reached its saved rstd output, which is "
                           "not differentiable")


def _mark_non_differentiable(ctx, saved, h: Tensor, stream_inputs) -> None:
    """The ``saved`` outputs are never differentiable; ``h = residual + x`` depends on those two
    inputs alone: where neither needs a gradient, it is not differentiable either, as the
    unfused ``+`` would give it (the weights' gradients do not flow through it). One call:
    ``ctx.mark_non_differentiable`` replaces what an earlier call marked."""
    if not any(ctx.needs_input_grad[i] for i in stream_inputs):
        saved = (*saved, h)
    ctx.mark_non_differentiable(*saved)


def _formulas(backend: str):
    """Each forward operator's ``(backward, setup_context)`` on ``backend`` (the backward
    operators' formula is ``registry.refuse_double_backward``, see ``_register``)."""
    formulas = {}

    def register(name, backward, setup_context):
        formulas[name] = (backward, setup_context)

    def act_setup(ctx, inputs, output):
        gu, groups, _ = inputs
        ctx.save_for_backward(gu)
        ctx.groups = groups

    def act_backward(ctx, dt):
        (gu,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return co._call("silu_mul_layout_bwd", backend, dt, gu, ctx.groups), None, None

    register("silu_mul_layout", act_backward, act_setup)

    def io_setup(ctx, inputs, output):
        t, weight1, weight2, bias1, bias2 = inputs
        ctx.save_for_backward(t, weight1, weight2)
        ctx.has_bias = (bias1 is not None, bias2 is not None)

    def io_backward(ctx, dy):
        t, weight1, weight2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        return gpc_io_layout_bwd(dy, t, weight1, weight2, need[0], need[1], need[2],
                                 ctx.has_bias[0] and need[3], ctx.has_bias[1] and need[4],
                                 backend=backend)

    register("gpc_io_layout", io_backward, io_setup)

    def tail_setup(ctx, inputs, output):
        gu, weight1, weight2, bias1, bias2, residual, _, t = inputs
        # The layout the weight gradients read: the one given (a norm head's), else written.
        ctx.save_for_backward(gu, output[1] if t is None else t, weight1, weight2)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.residual_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)

    def tail_backward(ctx, dy, dt):
        gu, t, weight1, weight2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if dy is None and dt is None:
            return (None,) * 8
        if dy is None:  # a gradient reaches only t (never from the public functions)
            dy = gu.new_zeros((gu.shape[0], weight1.shape[0] * weight1.shape[2]))
        # The residual add's gradient is dy itself, for both addends; the block's in its dtype.
        dresidual = dy.to(ctx.residual_dtype) if ctx.residual_dtype is not None and need[5] \
            else None
        dy = dy.to(gu.dtype)
        needs = (need[0], need[1], need[2], ctx.has_bias[0] and need[3],
                 ctx.has_bias[1] and need[4])
        grads = co._unpack(co._call("mlp_tail_bwd", backend, dy, gu, t, weight1, weight2,
                                    *needs), needs)
        if dt is not None and dt.numel() and need[0]:
            grads = (grads[0] + co._call("silu_mul_layout_bwd", backend, dt, gu,
                                         weight1.shape[0]), *grads[1:])
        # A given layout gets no gradient: it is a function of gu, whose gradient covers it.
        return (*grads, dresidual, None, None)

    register("mlp_tail", tail_backward, tail_setup)

    def head_setup(ctx, inputs, output):
        x, norm_weight, _, weight1, weight2, bias1, bias2, residual = inputs[:8]
        # The norm's input is h (an output) with a residual, else x; then the block's operands.
        source = output[1] if residual is not None else x
        # outputs: y, h, the block's operands, rstd, the activation (empty unless asked)
        ctx.save_for_backward(source, norm_weight, output[-2], *output[2:-2], weight1, weight2)
        # the block's saved input, rstd and the activation (its gradient reaches y through the
        # MLP tail's backward); h where it depends on no input that needs a grad
        _mark_non_differentiable(ctx, output[2:], output[1], stream_inputs=(0, 7))
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.set_materialize_grads(False)

    def head_backward_of(name):
        def head_backward(ctx, dy, dh, *saved_grads):
            source, norm_weight, rstd, *operands = ctx.saved_tensors
            need = ctx.needs_input_grad
            if any(g is not None for g in saved_grads):
                raise RuntimeError(
                    f"kphi3::{name}: a gradient reached a saved output (the block's input, rstd "
                    "or the activation); only the IO block's result and h are differentiable")
            has_residual = ctx.dtypes[1] is not None
            dh = dh if has_residual else None
            need_d = need[0] or (has_residual and need[7])
            d = dnorm = dw1 = dw2 = db1 = db2 = None
            if dy is not None:
                needs = (need_d, need[1], need[3], need[4], ctx.has_bias[0] and need[5],
                         ctx.has_bias[1] and need[6])
                d, dnorm, dw1, dw2, db1, db2 = co._unpack(co._call(
                    f"{name}_bwd", backend, dy, dh, source, norm_weight, rstd, *operands,
                    *needs), needs)
            elif dh is not None:  # only h is used: the residual add's gradient alone
                d = dh
            dx = d.to(ctx.dtypes[0]) if d is not None and need[0] else None
            dres = d.to(ctx.dtypes[1]) if d is not None and has_residual and need[7] else None
            return (dx, dnorm, None, dw1, dw2, db1, db2, dres) + (None,) * (len(need) - 8)
        return head_backward

    register("norm_io", head_backward_of("norm_io"), head_setup)
    register("norm_io_split", head_backward_of("norm_io_split"), head_setup)

    def norm_setup(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight, output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)

    def norm_backward(ctx, dn, drstd):
        x, weight, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        _no_grad_to_saved("rms_norm", drstd)
        if dn is None or not (need[0] or need[1]):
            return None, None, None
        dx, dw = co._unpack(co._call("rms_norm_bwd", backend, dn, None, x, weight, rstd,
                                     need[0], need[1]), need[:2])
        return dx, dw, None

    register("rms_norm", norm_backward, norm_setup)

    def add_norm_setup(ctx, inputs, output):
        residual, x, weight, _ = inputs
        ctx.save_for_backward(output[0], weight, output[2])
        _mark_non_differentiable(ctx, output[2:], output[0], stream_inputs=(0, 1))
        ctx.dtypes = (residual.dtype, x.dtype)
        ctx.set_materialize_grads(False)

    def add_norm_backward(ctx, dh, dn, drstd):
        h, weight, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        _no_grad_to_saved("add_rms_norm", drstd)
        need_dh = need[0] or need[1]
        if dn is None:  # only h is used: the add's gradient alone
            d, dw = dh, None
        elif need_dh or need[2]:
            d, dw = co._unpack(co._call("rms_norm_bwd", backend, dn, dh, h, weight, rstd,
                                        need_dh, need[2]), (need_dh, need[2]))
        else:
            d = dw = None
        if d is None:
            return None, None, dw, None
        return (d.to(ctx.dtypes[0]) if need[0] else None,
                d.to(ctx.dtypes[1]) if need[1] else None, dw, None)

    register("add_rms_norm", add_norm_backward, add_norm_setup)
    return formulas


def _fakes(backend: str):
    return _FAKES  # the shapes and dtypes are the same on both backends


# The backward operators' own formula refuses a second derivative, naming the path that has
# one (registry.refuse_double_backward); a first derivative never calls it.
REFUSED = ("silu_mul_layout_bwd", "gpc_io_layout_bwd", "mlp_tail_bwd", "norm_io_bwd",
           "norm_io_split_bwd", "rms_norm_bwd")

co.register_family("fused", _bodies, _fakes, _formulas, flops.FUSED_FORMULAS, refused=REFUSED)
