"""The one flag that picks the Triton kernels or the PyTorch reference for every grouped layer.

Names: ``"auto"`` (default) runs Triton for CUDA tensors when Triton imports, else torch;
``"triton"`` always runs the kernels (on CPU tensors only through Triton's interpreter,
``TRITON_INTERPRET=1``); ``"torch"`` always runs the PyTorch formulation. The starting value
comes from the ``KPHI3_BACKEND`` environment variable.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "KPHI3_BACKEND"

_state = threading.local()


def validate_backend(name) -> str:
    """Return ``name`` normalised, or raise a ValueError that lists the valid names."""
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.strip().lower()


def _default_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto")
    try:
        return validate_backend(value)
    except ValueError as err:
        raise ValueError(f"environment variable {ENV_VAR}: {err}") from None


def get_backend() -> str:
    """The backend in force in this thread (``set_backend`` / ``use_backend`` / ``KPHI3_BACKEND``)."""
    name = getattr(_state, "name", None)
    return name if name is not None else _default_backend()


def set_backend(name: str) -> None:
    """Set the backend for this thread: ``"auto"``, ``"triton"`` or ``"torch"``."""
    _state.name = validate_backend(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run a block under another backend, restoring the previous choice afterwards."""
    name = validate_backend(name)
    previous = getattr(_state, "name", None)
    _state.name = name
    try:
        yield name
    finally:
        _state.name = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except Exception:  # an ImportError, or a broken install raising at import
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton's CPU interpreter is on (read when the kernels are decorated, at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(x: torch.Tensor, override: Optional[str] = None) -> str:
    """The concrete backend (``"triton"`` or ``"torch"``) to run for input ``x``.

    Raises a ValueError when ``"triton"`` is asked for where the kernels cannot run.
    """
    name = validate_backend(override) if override is not None else get_backend()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("kernel backend 'triton' was requested but triton is not importable")
    if x.is_cuda or (x.device.type == "cpu" and triton_interpreting()):
        return "triton"
    raise ValueError(
        f"kernel backend 'triton' cannot run on a {x.device.type} tensor: Triton kernels need a CUDA "
        "device, or CPU tensors with TRITON_INTERPRET=1 set before kphi3_kernels is imported; "
        "use backend 'auto' or 'torch' to fall back to the PyTorch reference"
    )
