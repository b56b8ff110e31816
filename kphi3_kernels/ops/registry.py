"""How the package's operators are registered and called: the one registration helper of the
op-level operators (``custom_ops.py``) and the fused decoder's (``fused_ops.py``).

A leaf module: it imports nothing else of ``kphi3_kernels.ops`` at import time (the launcher
modules, ``triton_impl`` / ``torch_impl``, on first use), so the operator modules and the FLOP
formulas build on it without import cycles.

- ``define`` registers a body as ``kphi3::<name>_<backend>`` (a ``triton_op`` where Triton
  compiles, else a ``custom_op``) with its fake; ``define_autograd`` adds its autograd formula.
- ``_call`` calls an operator, directly in eager mode (see ``_eager``).
- ``_fresh``, ``_needed``, ``_unpack``, ``_no_autocast``: what every operator body uses.
"""
import contextlib
import importlib
from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

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
