"""The one flag that picks the Triton kernels or the PyTorch path for every grouped layer.

Names: ``"auto"`` (default) runs Triton for CUDA tensors when Triton imports, else torch;
``"triton"`` always runs the kernels (on CPU tensors only through Triton's interpreter,
``TRITON_INTERPRET=1``); ``"torch"`` always runs the PyTorch formulation.

Four ways to choose, the first that is set wins:

1. a per-call or per-module override: the ``backend=`` argument of the functional ops, or a
   module's ``backend`` attribute (``block.backend = "torch"``; a block passes it to its children);
2. the innermost ``with use_backend(...)`` block (this thread);
3. ``set_backend(...)`` (this thread);
4. the ``KPHI3_BACKEND`` environment variable (checked when ``kphi3_kernels`` is imported: a bad
   value raises a ValueError there);
5. otherwise ``"auto"``.

``explain_backend(x)`` says which implementation a call on ``x`` would run, and why.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator, Optional, Tuple, Union

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KPHI3_BACKEND"

logger = logging.getLogger("kphi3_kernels")

# Per thread: ``name`` is set_backend's choice (None: none made), ``context`` the stack of the
# use_backend blocks entered and not yet left.
_state = threading.local()

_triton_import_error: Optional[str] = None
_warned_fallback = False


def validate_backend(name) -> str:
    """Return ``name`` normalised, or raise a ValueError that lists the valid names."""
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def _env_backend() -> Optional[str]:
    """``KPHI3_BACKEND`` normalised, None when unset or empty; a ValueError naming it when bad."""
    value = os.environ.get(ENV_VAR)
    if value is None or not value.strip():
        return None
    try:
        return validate_backend(value)
    except ValueError as err:
        raise ValueError(f"environment variable {ENV_VAR}={value!r}: {err}") from None


def _context_stack() -> list:
    stack = getattr(_state, "context", None)
    if stack is None:
        stack = _state.context = []
    return stack


def _requested(override: Optional[str] = None) -> Tuple[str, str]:
    """The backend name asked for and where it came from, by the precedence in the docstring."""
    if override is not None:
        return validate_backend(override), "the backend= argument or the module's backend attribute"
    stack = _context_stack()
    if stack:
        return stack[-1], "use_backend(...)"
    name = getattr(_state, "name", None)
    if name is not None:
        return name, "set_backend(...)"
    env = _env_backend()
    if env is not None:
        return env, f"the {ENV_VAR} environment variable"
    return "auto", "the default"


def get_backend() -> str:
    """The backend in force in this thread, not counting per-call or per-module overrides."""
    return _requested()[0]


def set_backend(name: str) -> None:
    """Set the backend for this thread: ``"auto"``, ``"triton"`` or ``"torch"``.

    An open ``use_backend`` block still wins until it exits; module attributes and ``backend=``
    arguments win over both.
    """
    _state.name = validate_backend(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run a block under another backend (this thread), restoring the previous choice afterwards."""
    name = validate_backend(name)
    stack = _context_stack()
    stack.append(name)
    depth = len(stack)
    try:
        yield name
    finally:
        del stack[depth - 1:]


_triton_imports: Optional[bool] = None


def triton_available() -> bool:
    """True when Triton imports (it is a Linux-only dependency). Tried once, then remembered in a
    plain global (not ``functools.lru_cache``, which torch.compile warns about when tracing)."""
    global _triton_import_error, _triton_imports
    if _triton_imports is None:
        try:
            import triton  # noqa: F401
            _triton_imports = True
        except Exception as err:  # an ImportError, or a broken install raising at import
            _triton_import_error = f"{type(err).__name__}: {err}"
            _triton_imports = False
    return _triton_imports


def triton_interpreting() -> bool:
    """True when Triton's CPU interpreter is on (read when the kernels are decorated, at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_of(x: Union[torch.Tensor, torch.device, str]) -> torch.device:
    return torch.device(x) if isinstance(x, (str, torch.device)) else x.device


def _triton_missing() -> str:
    detail = f" ({_triton_import_error})" if _triton_import_error else ""
    return f"Triton is not importable{detail}"


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        logger.warning("kphi3_kernels: %s. This warning is shown once.", reason)


def explain_backend(x: Union[torch.Tensor, torch.device, str],
                    override: Optional[str] = None) -> Tuple[str, str]:
    """``(backend, reason)``: the implementation a grouped op on ``x`` runs, and why.

    ``x`` is the input tensor (or a device); ``override`` is what the call passes as ``backend=``,
    e.g. a module's ``backend`` attribute. The reason names where the choice came from (see the
    module docstring for the precedence). Raises the ValueError the op would raise when
    ``"triton"`` is asked for where the kernels cannot run.
    """
    backend, reason, _ = _explain(x, override)
    return backend, reason


def _explain(x, override) -> Tuple[str, str, bool]:
    """explain_backend's answer, plus whether it is "auto" falling back to torch on CUDA."""
    name, source = _requested(override)
    device = _device_of(x)
    asked = f"{name!r} (from {source})"
    if name == "torch":
        return "torch", f"{asked}: the PyTorch path", False
    if name == "auto":
        if device.type != "cuda":
            return "torch", (f"{asked} on a {device.type} tensor: the Triton kernels run only on "
                             "CUDA tensors, so the PyTorch path"), False
        if not triton_available():
            return "torch", f"{asked} on a CUDA tensor, but {_triton_missing()}: the PyTorch path", True
        return "triton", f"{asked} on a CUDA tensor with Triton importable: the Triton kernels", False
    if not triton_available():
        raise ValueError(f"kernel backend 'triton' was requested (from {source}) but "
                         f"{_triton_missing()}")
    if device.type == "cuda":
        return "triton", f"{asked} on a CUDA tensor: the Triton kernels", False
    if device.type == "cpu" and triton_interpreting():
        return "triton", (f"{asked} on a CPU tensor: the Triton kernels through Triton's "
                          "interpreter (TRITON_INTERPRET=1): slow, and bf16 matmuls are wrong there"), False
    raise ValueError(
        f"kernel backend 'triton' (from {source}) cannot run on a {device.type} tensor: Triton "
        "kernels need a CUDA device, or CPU tensors with TRITON_INTERPRET=1 set before "
        "kphi3_kernels is imported; use backend 'auto' or 'torch' to fall back to the PyTorch path"
    )


def resolve_backend(x: torch.Tensor, override: Optional[str] = None, with_reason: bool = False):
    """The concrete backend (``"triton"`` or ``"torch"``) to run for input ``x``.

    ``override`` (a ``backend=`` argument or a module's attribute) wins when not None. With
    ``with_reason=True`` returns ``(backend, reason)`` like ``explain_backend``. Raises a
    ValueError when ``"triton"`` is asked for where the kernels cannot run. Logs one warning per
    process (logger ``"kphi3_kernels"``) when ``"auto"`` falls back to torch on a CUDA tensor.
    """
    backend, reason, fell_back = _explain(x, override)
    if fell_back:
        _warn_fallback_once(reason)
    return (backend, reason) if with_reason else backend


# A bad KPHI3_BACKEND fails at import, naming the variable, not at the first forward call.
_env_backend()
