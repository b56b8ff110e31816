"""The one place where a Triton kernel of this package is launched.

A launcher (``grouped_gemm.py``, ``interleave.py``) describes a launch as a ``KernelLaunch``: the
kernel, its runtime arguments by name, the configs the autotuner may pick for it (already pruned
to what fits the device) and the config to use under Triton's CPU interpreter. ``launch`` runs it:
autotuned on a GPU, one fixed config under the interpreter (which cannot autotune).

Because every launch passes through here, tools can look at launches without running them: the
sm_90a compile report (``kphi3_bench.compile_report``) sets ``RECORDER`` and compiles what it
receives for a GPU target, and the tests set ``FORCE_CONFIG`` to push each GPU config through the
interpreter.

``KPHI3_FIRST_CHOICE=1`` in the environment (read at import; ``FIRST_CHOICE`` can be set later)
launches every kernel with its first-choice config (``configs[0]``) instead of autotuning: one
compile per kernel rather than one per config, for a GPU run with a time limit
(``kphi3_bench.gpu_check``). The first-choice config is the tuned default, not the fastest.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import triton

from ..backend import triton_interpreting


@dataclass
class KernelLaunch:
    """Everything needed to run (or to compile offline) one launch of a Triton kernel."""

    name: str                                 # what the launch is for, e.g. "gpc_io_fwd"
    kernel: Any                               # the @triton.jit function
    grid: Callable[[Dict[str, Any]], Tuple[int, ...]]
    args: Dict[str, Any]                      # runtime arguments and launcher-fixed constexprs
    configs: Sequence[triton.Config]          # what the autotuner may pick; configs[0] first choice
    interpreter_config: triton.Config         # the one config run under the interpreter
    tune_key: Sequence[str] = ()              # argument names that decide when to re-tune
    restore: Sequence[str] = ()               # outputs the kernel accumulates into
    device: Optional[torch.device] = None


# A tool that wants to see launches instead of running them sets this to a callable.
RECORDER: Optional[Callable[[KernelLaunch], None]] = None
# Tests set this to a callable ``launch -> Optional[triton.Config]`` to force a config through the
# interpreter (None keeps the launch's own interpreter config).
FORCE_CONFIG: Optional[Callable[[KernelLaunch], Optional[triton.Config]]] = None

# True: configs[0] on a GPU, no autotuning (see the module docstring).
FIRST_CHOICE: bool = os.environ.get("KPHI3_FIRST_CHOICE", "0").strip() == "1"

_AUTOTUNERS: Dict[tuple, Any] = {}


def config_kwargs(config: triton.Config) -> Dict[str, Any]:
    """A config as launch keyword arguments (block sizes, warps, stages)."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _autotuner(launch: KernelLaunch):
    # One Autotuner per kernel and config list: pruning depends on the dtype, so the lists differ.
    key = (launch.kernel, tuple(str(c) for c in launch.configs), tuple(launch.tune_key),
           tuple(launch.restore))
    tuner = _AUTOTUNERS.get(key)
    if tuner is None:
        tuner = triton.autotune(configs=list(launch.configs), key=list(launch.tune_key),
                                restore_value=list(launch.restore))(launch.kernel)
        _AUTOTUNERS[key] = tuner
    return tuner


def launch(spec: KernelLaunch) -> None:
    if RECORDER is not None:
        RECORDER(spec)
        return
    if triton_interpreting():
        # Interpreted kernels cannot be traced: the operators are opaque there (custom_ops.py).
        config = FORCE_CONFIG(spec) if FORCE_CONFIG is not None else None
        config = config or spec.interpreter_config
        spec.kernel[spec.grid](**spec.args, **config_kwargs(config))
        return
    # Real tensors launch directly. A tracer's tensors (torch.compile decomposing a triton_op,
    # make_fx, torch.export) go through torch.library.wrap_triton, so the graph records the
    # kernel itself; it accepts a plain @triton.jit kernel and an Autotuner whose only extras are
    # key and restore_value (ours) on torch 2.11 and 2.13. Where this torch has no wrap_triton or
    # refuses the kernel, the launch stays plain (the operators are then opaque custom_ops).
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    traced = any(isinstance(v, (FakeTensor, FunctionalTensor)) for v in spec.args.values())

    def maybe_wrap(kernel):
        wrap = getattr(torch.library, "wrap_triton", None)
        if not traced or wrap is None:
            return kernel
        try:
            return wrap(kernel)
        except RuntimeError:
            return kernel

    device = spec.device
    guard = torch.cuda.device(device) if device is not None and device.type == "cuda" \
        else contextlib.nullcontext()
    with guard:
        if len(spec.configs) == 1 or FIRST_CHOICE:
            maybe_wrap(spec.kernel)[spec.grid](**spec.args, **config_kwargs(spec.configs[0]))
        else:
            maybe_wrap(_autotuner(spec))[spec.grid](**spec.args)
