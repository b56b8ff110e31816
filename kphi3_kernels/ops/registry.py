"""How the package's operators are registered and called: the one operator table
(``OPERATORS``) and the one registration helper (``register_family``) of the op-level operators
(``custom_ops.py``) and the fused decoder's (``fused_ops.py``).

A leaf module: it imports nothing else of ``kphi3_kernels.ops`` at import time (the launcher
modules, ``triton_impl`` / ``triton_fused`` / ``torch_impl``, on first use), so the operator
modules build on it without import cycles.

- ``register_family`` declares a family of operators, each with the same parts: a body per
  backend (``torch`` and ``triton``), a fake, an autograd formula per backend, a FLOP formula,
  and whether its formula is differentiable again (else the formula refuses a second derivative
  and names the op-level path). It registers every one as ``kphi3::<name>_<backend>`` for every
  backend and records it in ``OPERATORS``; a family missing a part is refused at import.
- ``define`` registers a body (a ``triton_op`` where Triton compiles, else a ``custom_op``) with
  its fake; ``define_autograd`` adds its autograd formula.
- ``launchers(backend)``: the op-level launchers (``triton_impl`` / ``torch_impl``);
  ``fused_launchers(backend)``: the fused decoder's (``triton_fused`` / ``torch_impl``).
- ``_call`` calls an operator, directly in eager mode (see ``_eager``).
- ``_fresh``, ``_needed``, ``_unpack``, ``_no_autocast``: what every operator body uses.
"""
import contextlib
import dataclasses
import importlib
from types import ModuleType
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..backend import triton_available, triton_interpreting

BACKENDS = ("torch", "triton")
NAMESPACE = "kphi3"


_IMPLS = {}


def get_impl(backend: str) -> ModuleType:
    """The launcher module of a concrete backend: ``"triton"`` or ``"torch"``."""
    if backend not in BACKENDS:
        raise ValueError(f"no implementation for backend {backend!r}")
    # Imported on first use: triton_impl needs Triton, which only exists on Linux.
    return importlib.import_module(f".{backend}_impl", __package__)


def launchers(backend: str) -> ModuleType:
    """The launcher module of ``backend``, imported once (tests spy on its attributes, which are
    still looked up at call time)."""
    module = _IMPLS.get(backend)
    if module is None:
        module = _IMPLS[backend] = get_impl(backend)
    return module


# The fused decoder's launchers: the Triton ones live beside their kernels (gathered in
# ``triton_fused``), the PyTorch ones in ``torch_impl`` with the op-level launchers.
_FUSED_IMPLS = {"torch": "torch_impl", "triton": "triton_fused"}


def fused_launchers(backend: str) -> ModuleType:
    """The module of the fused decoder's launchers of ``backend`` (same names on both)."""
    if backend not in _FUSED_IMPLS:
        raise ValueError(f"no implementation for backend {backend!r}")
    key = f"fused-{backend}"
    module = _IMPLS.get(key)
    if module is None:
        module = _IMPLS[key] = importlib.import_module(f".{_FUSED_IMPLS[backend]}", __package__)
    return module


def _fresh(outputs: Sequence[Tensor], inputs: Sequence[Optional[Tensor]]) -> List[Tensor]:
    """Contiguous outputs none of which aliases an input or an earlier output (else a copy)."""
    seen = [t for t in inputs if t is not None]
    result = []
    for out in outputs:
        if any(torch._C._is_alias_of(out, t) for t in seen):
            out = out.clone(memory_format=torch.contiguous_format)
        out = out.contiguous()
        seen.append(out)
        result.append(out)
    return result


def _needed(grads: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> List[Tensor]:
    return [g for g, n in zip(grads, needs) if n]


def _unpack(grads: Sequence[Optional[Tensor]], needs: Sequence[bool]) -> Tuple:
    """A list of the needed gradients back to one slot per gradient (None where not needed)."""
    it = iter(grads)
    return tuple(next(it) if n else None for n in needs)


def _no_autocast(t: Tensor):
    # Operands arrive already cast by functional.py; nothing inside may be re-cast. Entering an
    # autocast context costs more than a small call's math, so only when autocast is on.
    device_type = t.device.type
    if device_type in ("cpu", "cuda") and not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def op(name: str, backend: str):
    """The registered operator ``kphi3::<name>_<backend>`` (an OpOverloadPacket)."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{name}_{backend}")


# Eager calls skip the dispatcher. Going through a registered operator costs tens of
# microseconds of Python per call (the autograd wrapper, the redispatch, the dynamo guard), as
# much as the whole product at decode sizes on a CPU. When nothing but autograd would see the
# call (no tracing, no dispatch or function mode, no functorch transform, plain non-meta
# tensors), the operator's body runs directly: inside an autograd.Function with the same formula
# where a gradient is needed, else bare. Same body, same formula, same results; any tracer, fake
# or meta tensor, or tensor subclass (DTensor) gets the operator.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager(args) -> bool:
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._are_functorch_transforms_active()):
        return False
    # Meta tensors take the operator's fake implementation (shapes only, nothing launched).
    return all(type(a) in _PLAIN and not a.is_meta for a in args if isinstance(a, Tensor))


def _needs_grad(args) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(a, Tensor) and a.requires_grad for a in args)


_EAGER = {}  # (name, backend) -> (body, autograd.Function)


def _call(name: str, backend: str, *args):
    """``kphi3::<name>_<backend>(*args)``, directly in eager mode (see ``_eager``)."""
    if not _eager(args):
        return op(name, backend)(*args)
    body, function = _EAGER[(name, backend)]
    if _needs_grad(args):
        if function is None:  # no autograd formula: the operator itself says so
            return op(name, backend)(*args)
        return function.apply(*args)
    return body(*args)


def _eager_function(name: str, body, setup_context, backward):
    """An autograd.Function running ``body`` with the operator's own autograd formula."""
    # The backward operators return a list: an autograd.Function returns it as a tuple, and
    # their formulas take the outputs and the gradients as one list, as register_autograd does.
    list_output = name.endswith("_bwd")

    def forward(*args):
        out = body(*args)
        return tuple(out) if list_output else out

    def backward_(ctx, *grads):
        return backward(ctx, list(grads)) if list_output else backward(ctx, *grads)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, list(output) if list_output else output)

    return type(f"{name}_eager", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup),
        backward=staticmethod(backward_)))


def define(name: str, backend: str, body, fake, traceable: bool) -> None:
    """Register ``body`` as ``kphi3::<name>_<backend>``: a ``triton_op`` where ``traceable``,
    else a ``custom_op``, with its shape-only fake. For a triton_op the fake replaces its body
    for Dynamo and export (shapes only); AOT autograd still traces the body when it decomposes
    the operator for Inductor."""
    qualname = f"{NAMESPACE}::{name}_{backend}"
    kind = torch.library.triton_op if traceable else torch.library.custom_op
    kind(qualname, body, mutates_args=())
    torch.library.register_fake(qualname, fake)


def define_autograd(name: str, backend: str, body, backward, setup_context) -> None:
    """The autograd formula of ``kphi3::<name>_<backend>``, and the same formula on the eager
    fast path (``_call``)."""
    torch.library.register_autograd(f"{NAMESPACE}::{name}_{backend}", backward,
                                    setup_context=setup_context)
    _EAGER[(name, backend)] = (body, _eager_function(name, body, setup_context, backward))


def traceable_triton() -> bool:
    """Whether the triton backend's operators are ``triton_op``s (else opaque ``custom_op``s)."""
    return (triton_available() and not triton_interpreting()
            and hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton"))


# --------------------------------------------------------------------------------------------
# The operator table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One operator of the table, registered as ``kphi3::<name>_<backend>`` for each backend."""

    name: str
    family: str                  # "op-level" or "fused"
    backends: Tuple[str, ...]
    fake: Callable[[str], Callable]   # backend -> shape-only implementation
    flops: Callable              # torch.utils.flop_counter formula
    any_order: bool              # gradients of any order; False: a second derivative through
                                 # it is refused, naming the op-level path


OPERATORS: Dict[str, OpSpec] = {}


def refuse_double_backward(name: str, backend: str):
    """The autograd formula of a backward operator that has no differentiable one: it raises,
    naming the op-level path (which supports gradients of any order). A first derivative never
    calls it."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"kphi3::{name}_{backend}: a second derivative through the fused decoder's "
            "operators is not supported; the op-level path supports gradients of any order "
            "(KPhi3Config(fused_decoder=False), or kphi3_kernels.gpc_io / rms_norm of the "
            "unfused modules)")
    return backward


def _nothing_to_save(ctx, inputs, output) -> None:
    pass


def register_family(family: str, bodies: Callable[[str], Dict[str, Callable]],
                    fakes: Callable[[str], Dict[str, Callable]],
                    formulas: Callable[[str], Dict[str, Tuple[Callable, Callable]]],
                    flop_formulas: Dict[str, Callable], refused: Sequence[str] = ()
                    ) -> None:
    """Register a family of operators for every backend: ``bodies(backend)``,
    ``fakes(backend)`` and ``formulas(backend)`` (``(backward, setup_context)`` per operator)
    map each operator name to its part; ``flop_formulas`` holds its FLOP formula; the operators
    named in ``refused`` (backward operators) get ``refuse_double_backward`` as their formula
instead, and then no operator of the family has gradients of any order. Every operator
    needs every part, on every backend: one missing is a ``TypeError`` here, at import."""
    names = set(bodies(BACKENDS[0]))
    for backend in BACKENDS:
        parts = {"body": set(bodies(backend)), "fake": set(fakes(backend)),
                 "autograd formula": set(formulas(backend)) | set(refused),
                 "FLOP formula": set(flop_formulas)}
        for part, have in parts.items():
            if have != names:
                raise TypeError(f"kphi3 operators of the {family} family on {backend}: "
                                f"{part} missing for {sorted(names - have)}, or extra "
                                f"{sorted(have - names)}")
    for backend in BACKENDS:
        traceable = backend == "triton" and traceable_triton()
        family_bodies, family_fakes, family_formulas = (bodies(backend), fakes(backend),
                                                        formulas(backend))
        for name, body in family_bodies.items():
            define(name, backend, body, family_fakes[name], traceable)
            if name in refused:
                define_autograd(name, backend, body, refuse_double_backward(name, backend),
                                _nothing_to_save)
            else:
                define_autograd(name, backend, body, *family_formulas[name])
    for name in sorted(names):
        register_flop_formula([op(name, backend) for backend in BACKENDS])(flop_formulas[name])
        if name in OPERATORS:
            raise TypeError(f"kphi3::{name} is declared twice")
        OPERATORS[name] = OpSpec(name=name, family=family, backends=BACKENDS,
                                 fake=lambda backend, _n=name: fakes(backend)[_n],
                                 flops=flop_formulas[name],
                                 any_order=not refused)
