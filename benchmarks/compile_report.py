"""Compile every Triton launch of the package for sm_90a (H100/H200) and sm_80 (A100) on the CPU,
and read what the compiler made of it: registers, spills, shared memory, matrix instructions and
the kinds of global loads and stores in the SASS.

    python -m kphi3_bench.compile_report                       # released shapes, bf16/fp16/fp32, sm_90a + sm_80
    python -m kphi3_bench.compile_report --first-choice --dtypes bf16 --targets 90 --out report.json
    python -m kphi3_bench.compile_report --shapes all --sass-dir sass/ --jobs 8

No GPU and no CUDA driver are needed: the compiler (ptxas) and ``cuobjdump`` ship with the Triton
wheel. How it works:

1. **Record.** Every launch of the package goes through ``kphi3_kernels.ops.launch``. With
   ``launch.RECORDER`` set, each Triton launcher (forward and backward of ``grouped_linear``,
   ``gpc_io``, ``gpc_block`` with and without its second weight, and ``interleave``) is called on
   CPU tensors of the real shapes (``torch.empty``: nothing runs, values do not matter) and the
   ``KernelLaunch`` it builds is kept instead of being run.
2. **Specialize like the runtime.** For each launch and each config the autotuner may pick, the
   arguments go through Triton's own JIT binder (``create_function_from_signature`` and
   ``JITFunction._pack_args``, as ``JITFunction.run`` does), so unit strides become the constexpr
   1 and pointers / integers get the divisibility-by-16 attribute exactly as on a real launch.
   Launches that specialize identically (same kernel, signature, constexprs, attributes and
   options) are compiled once and list all their uses.
3. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   (arch 90 compiles for ``sm_90a`` when the kernel uses wgmma), in a process pool, into a
   private, fresh Triton cache, so every number comes from this compile.
4. **Read** the ptxas log (registers, stack frame, spill stores / loads), the kernel metadata
   (shared memory, as Triton checks it at load time), ``cuobjdump -res-usage`` (registers, local
   memory) and ``cuobjdump -sass`` (``parse_sass``: matrix instruction class and global / local
   memory instruction kinds).

``check_properties(record)`` lists what a kernel should not do: a bf16 / fp16 kernel with a
``tl.dot`` that does not use HGMMA on sm_90, any spill, shared memory above the target's limit,
and scalar 16-bit global loads / stores in a kernel that does matrix work.

Python API: ``record_launches``, ``compile_launch``, ``compile_all``, ``parse_sass``,
``check_properties``, ``tools_available``.

The output's first line and the JSON's ``environment`` name the Triton and ptxas versions that
compiled: registers and spills differ between compiler versions (Triton 3.6 spilled kernels that
3.9 compiles clean), so a report holds for its own versions only.

Checked with Triton 3.6 and 3.9 (both have the binder, ``JITFunction._pack_args`` and the ptxas-log
knob; without ``_pack_args`` the same steps are taken by hand, without the knob spill bytes are
read from the LDL / STL instructions of the SASS).

The recording needs the real ``@triton.jit`` kernels: it refuses to run with
``TRITON_INTERPRET=1`` (under the interpreter the kernels are interpreter objects).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import env, shapes as shape_table

# arch -> (name, shared memory a block may use: the opt-in maximum per block)
TARGETS: Dict[int, Tuple[str, int]] = {
    90: ("sm_90a", 227 * 1024),   # H100 / H200: 232448 bytes
    80: ("sm_80", 163 * 1024),    # A100: 166912 bytes
}
DEFAULT_M = 8192
DTYPE_NAMES = ("bf16", "fp16", "fp32")
HALF_DTYPES = ("bf16", "fp16")
# The matrix instruction classes, best first.
MMA_CLASSES = ("HGMMA", "HMMA", "DMMA", "FFMA", "DFMA", "none")
SCALAR_16BIT = ("LDG.E.U16", "LDG.E.S16", "STG.E.U16", "STG.E.S16")
SCALAR_16BIT_LOADS = ("LDG.E.U16", "LDG.E.S16")


@dataclasses.dataclass(frozen=True)
class NarrowLoads:
    """A launch whose design reads one operand with scalar 16-bit loads, and how many it may
    make: one per element of that operand's tile per thread (``tile``: the two block sizes of
    the tile), so that a second strided operand, e.g. in the K loop, still fails the gate."""

    reason: str
    tile: Tuple[str, str]
    max_m: Optional[int] = None   # the allowance holds only where every use has M <= max_m

    def most(self, kwargs: Dict[str, Any]) -> int:
        threads = 32 * kwargs["num_warps"]
        return kwargs[self.tile[0]] * kwargs[self.tile[1]] // threads


# Launch name -> the narrow loads its design makes. Every other matrix kernel: none.
NARROW_LOADS = {
    "gpc_io_fwd_fused": NarrowLoads(
        "the IO block's decode forward reads x[:, n::G] in place (stride G: no wide load "
        "fits); at M <= 64 those are a few activation rows next to the weights it streams "
        "with LDGSTS.128: 1-11% of the launch's bytes at M = 16 at the released shapes "
        "(python -m kphi3_bench.ledger), about a third at M = 64 for down_proj",
        ("BLOCK_P", "BLOCK_K"), max_m=64),
    "gpc_io_bwd_dx": NarrowLoads(
        "the IO block's dx adds dxi gathered at its interleaved columns (no unit stride), "
        "once per output tile before the K loop; the K loop's operands are LDGSTS.128. The "
        "gathered bytes are 10-44% of the launch's at the released shapes (down_proj the most), "
        "read once, in runs of about BLOCK_Q / G contiguous elements",
        ("BLOCK_P", "BLOCK_Q")),
    "norm_io_bwd_dxn": NarrowLoads(
        "the fused norm head's input gradient (in channel order, for the norm's backward): "
        "gpc_io_bwd_dx's gathered dxi, the same design and share of bytes",
        ("BLOCK_P", "BLOCK_Q")),
    "mlp_tail_bwd_dgate_up": NarrowLoads(
        "the fused MLP tail's input gradient: gpc_io_bwd_dx's gathered dxi (same design, same "
        "share of bytes), then the activation's backward in the epilogue with unit-stride "
        "gate / up loads and stores",
        ("BLOCK_P", "BLOCK_Q")),
}


def narrow_allowance(record: Dict[str, Any]) -> Tuple[int, str]:
    """How many scalar 16-bit loads ``record``'s design allows (0: none), and why."""
    name = str(record.get("launch", "")).rsplit(":", 1)[-1]
    rule = NARROW_LOADS.get(name)
    kwargs = record.get("config_kwargs")
    if rule is None or not kwargs:
        return 0, ""
    uses = record.get("uses") or [record]
    if rule.max_m is not None and any(u.get("m", 0) > rule.max_m for u in uses):
        return 0, ""
    return rule.most(kwargs), rule.reason


class InterpreterError(RuntimeError):
    """The kernels were decorated under TRITON_INTERPRET=1 and cannot be compiled."""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _refuse_interpreter() -> None:
    if _interpreting():
        raise InterpreterError(
            "TRITON_INTERPRET=1 is set: the kernels are then Triton interpreter objects and cannot "
            "be compiled for a GPU. Run this tool with TRITON_INTERPRET unset (or 0)."
        )


# ----------------------------------------------------------------------------------------------
# 1. Recording launches
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecordedLaunch:
    """One launch made by one call of a Triton launcher."""

    op: str          # the launcher called, e.g. "gpc_io_bwd" or "gpc_block_fwd(no weight2)"
    index: int       # the how-manieth launch of that call (0-based)
    shape: str       # the shape-table name, e.g. "kphi3-qkv"
    dtype: str       # "bf16" / "fp16" / "fp32"
    m: int           # tokens
    launch: Any      # the KernelLaunch

    @property
    def label(self) -> str:
        return f"{self.op}#{self.index}:{self.launch.name}"

    def use(self) -> Dict[str, Any]:
        return {"op": self.op, "index": self.index, "launch": self.launch.name, "label": self.label,
                "shape": self.shape, "dtype": self.dtype, "m": self.m}


def _op_calls(shape: "shape_table.Shape", m: int, dtype: torch.dtype) -> List[Tuple[str, Callable[[], Any]]]:
    """Every launcher of ``triton_impl`` with contiguous ``torch.empty`` operands of ``shape``."""
    from kphi3_kernels.layout import residue_run_length
    from kphi3_kernels.ops import layout_act as LA
    from kphi3_kernels.ops import layout_gemm as LG
    from kphi3_kernels.ops import layout_norm as LN
    from kphi3_kernels.ops import mlp_tail as MT
    from kphi3_kernels.ops import norm_head as NH
    from kphi3_kernels.ops import triton_impl as T

    G, s, og = shape.groups, shape.in_per_group, shape.out_per_group
    R = residue_run_length(G * s, G, 8)

    def empty(*size):
        return torch.empty(*size, dtype=dtype)

    x, dy, h = empty(m, G * s), empty(m, G * og), empty(m, G * og)
    w1, w1b = empty(G, s, og), empty(G, s, og)   # grouped_linear / gpc_io weights
    w2 = empty(G, og, og)                         # the second weight of the non-IO block
    t, gu = empty(m, G * G * R), empty(m, 2 * G * s)  # a layout input; [gate | up] before it
    return [
        ("grouped_linear_fwd", lambda: T.grouped_linear_fwd(x, w1)),
        ("grouped_linear_bwd", lambda: T.grouped_linear_bwd(dy, x, w1)),
        ("gpc_io_fwd", lambda: T.gpc_io_fwd(x, w1, w1b)),
        ("gpc_io_bwd", lambda: T.gpc_io_bwd(dy, x, empty(m, G * s), w1, w1b)),
        ("gpc_block_fwd", lambda: T.gpc_block_fwd(x, w1, w2)),
        ("gpc_block_fwd(no weight2)", lambda: T.gpc_block_fwd(x, w1)),
        ("gpc_block_bwd", lambda: T.gpc_block_bwd(dy, x, h, w1, w2)),
        ("gpc_block_bwd(no weight2)", lambda: T.gpc_block_bwd(dy, x, h, w1)),
        ("interleave_fwd", lambda: T.interleave_fwd(x, G)),
        # The fused decoder's launches: the IO block on its input in the block-residue layout,
        # and the producer that writes that layout (the MLP activation, for down_proj).
        ("gpc_io_layout_fwd", lambda: LG.gpc_io_layout_fwd(t, w1, w1b)),
        ("gpc_io_layout_bwd", lambda: LG.gpc_io_layout_bwd(dy, t, w1, w1b)),
        ("silu_mul_layout", lambda: LA.silu_mul_layout_fwd(gu, G, R)),
        ("silu_mul_layout_bwd", lambda: LA.silu_mul_layout_bwd(t, gu, G)),
        ("mlp_tail_bwd", lambda: MT.mlp_tail_bwd(dy, gu, t, w1, w1b)),
        ("norm_io_fwd", lambda: NH.norm_io_fwd(x, x[0], 1e-5, w1, w1b, run=R)),
        ("norm_io_bwd", lambda: NH.norm_io_bwd(dy, x, x[0], torch.empty(m), t, w1, w1b)),
        # The residual stream: the residual adds in the norms and in down_proj's epilogue, the
        # norm heads that write channel order and its de-interleaved copy, the plain norms.
        ("mlp_tail_fwd(residual)", lambda: MT.mlp_tail_fwd(gu, w1, w1b, run=R, residual=dy)),
        ("norm_io_fwd(residual)", lambda: NH.norm_io_fwd(x, x[0], 1e-5, w1, w1b, run=R,
                                                          residual=empty(m, G * s))),
        ("norm_io_bwd(residual)", lambda: NH.norm_io_bwd(dy, x, x[0], torch.empty(m), t, w1, w1b,
                                                          dh=empty(m, G * s))),
        ("norm_io_split_fwd", lambda: NH.norm_io_split_fwd(x, x[0], 1e-5, w1, w1b)),
        ("norm_io_split_fwd(residual)", lambda: NH.norm_io_split_fwd(
            x, x[0], 1e-5, w1, w1b, residual=empty(m, G * s))),
        ("norm_io_split_bwd(residual)", lambda: NH.norm_io_split_bwd(
            dy, x, x[0], torch.empty(m), empty(m, G * s), empty(m, G * s), w1, w1b,
            dh=empty(m, G * s))),
        ("rms_norm_fwd", lambda: LN.rms_norm_fwd(x, x[0], 1e-5)),
        ("add_rms_norm_fwd", lambda: LN.rms_norm_fwd(x, x[0], 1e-5, empty(m, G * s))),
        ("rms_norm_bwd(residual)", lambda: LN.rms_norm_bwd(empty(m, G * s), x, x[0],
                                                           torch.empty(m), dh=empty(m, G * s))),
    ]


OPS = ("grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd", "gpc_block_fwd",
       "gpc_block_fwd(no weight2)", "gpc_block_bwd", "gpc_block_bwd(no weight2)", "interleave_fwd",
       "gpc_io_layout_fwd", "gpc_io_layout_bwd", "silu_mul_layout", "silu_mul_layout_bwd",
       "mlp_tail_bwd", "norm_io_fwd", "norm_io_bwd", "mlp_tail_fwd(residual)",
       "norm_io_fwd(residual)", "norm_io_bwd(residual)", "norm_io_split_fwd",
       "norm_io_split_fwd(residual)", "norm_io_split_bwd(residual)", "rms_norm_fwd",
       "add_rms_norm_fwd", "rms_norm_bwd(residual)")


def _resolve_shape(shape) -> "shape_table.Shape":
    return shape if isinstance(shape, shape_table.Shape) else shape_table.resolve_shapes([shape])[0]


def _resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in shape_table.DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(shape_table.DTYPES)}")
    return shape_table.DTYPES[dtype]


def record_launches(shape, m: int = DEFAULT_M, dtype="bf16",
                    ops: Optional[Iterable[str]] = None) -> List[RecordedLaunch]:
    """The launches every Triton launcher makes for ``shape`` (a Shape or its name) at ``m`` tokens.

    Nothing runs: ``launch.RECORDER`` keeps each ``KernelLaunch``. ``ops`` restricts the launchers
    (names from ``OPS``).
    """
    _refuse_interpreter()
    from kphi3_kernels.ops import launch as launch_mod

    shape = _resolve_shape(shape)
    torch_dtype = _resolve_dtype(dtype)
    name = shape_table.dtype_name(torch_dtype)
    wanted = set(ops) if ops is not None else None
    if wanted is not None and wanted - set(OPS):
        raise ValueError(f"unknown ops {sorted(wanted - set(OPS))}; known: {', '.join(OPS)}")
    recorded: List[RecordedLaunch] = []
    previous = launch_mod.RECORDER
    try:
        for op, call in _op_calls(shape, m, torch_dtype):
            if wanted is not None and op not in wanted:
                continue
            seen: List[Any] = []
            launch_mod.RECORDER = seen.append
            call()
            recorded.extend(RecordedLaunch(op, i, shape.name, name, m, spec) for i, spec in enumerate(seen))
    finally:
        launch_mod.RECORDER = previous
    return recorded


# ----------------------------------------------------------------------------------------------
# 2. Specializing a launch like JITFunction.run does
# ----------------------------------------------------------------------------------------------


def _jit_function(kernel):
    """The JITFunction under ``kernel`` (unwrapping Autotuner / Heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn") and seen < 8:
        kernel, seen = kernel.fn, seen + 1
    if not isinstance(kernel, JITFunction):
        if type(kernel).__name__ == "InterpretedFunction":
            raise InterpreterError(
                "the kernel is a Triton interpreter object (TRITON_INTERPRET=1 was set when the "
                "package was imported); run with TRITON_INTERPRET unset")
        raise TypeError(f"not a @triton.jit kernel: {kernel!r}")
    return kernel


def _target(target) -> Any:
    from triton.backends.compiler import GPUTarget

    if isinstance(target, GPUTarget):
        return target
    return GPUTarget("cuda", int(target), 32)


_BACKENDS: Dict[int, Any] = {}


def _backend(arch: int):
    # driver.active needs a GPU; the backend object itself only needs the target.
    from triton.compiler import make_backend

    if arch not in _BACKENDS:
        _BACKENDS[arch] = make_backend(_target(arch))
    return _BACKENDS[arch]


def _config_kwargs(config) -> Dict[str, Any]:
    """A config as the keyword arguments the autotuner passes to ``JITFunction.run``."""
    if hasattr(config, "all_kwargs"):
        return dict(config.all_kwargs())
    out = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    for extra in ("num_ctas", "maxnreg"):
        if getattr(config, extra, None) is not None:
            out[extra] = getattr(config, extra)
    return out


def _runtime_options(fn) -> Dict[str, Any]:
    """The options ``JITFunction.run`` adds from Triton's knobs (each only where this Triton has it)."""
    from triton import knobs

    opts: Dict[str, Any] = {}
    runtime = getattr(knobs, "runtime", None)
    opts["debug"] = bool(getattr(fn, "debug", None) or getattr(runtime, "debug", False))
    compilation = getattr(knobs, "compilation", None)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if compilation is not None and hasattr(type(compilation), name):
            opts[name] = getattr(compilation, name)
    return opts


def _pack_args(fn, backend, kwargs, bound_args, specialization, options):
    """``JITFunction._pack_args`` where it exists (Triton >= 3.4), else the same steps by hand."""
    if hasattr(fn, "_pack_args"):
        return fn._pack_args(backend, kwargs, bound_args, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    sigkeys = [p.name for p in fn.params]
    sigvals = [x[0] for x in specialization]
    signature = dict(zip(sigkeys, sigvals))
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


# Triton 3.9 warns on every process that its FP-fusion default will change; the default is what a
# real launch uses, so the report keeps it and leaves the warning out of its output.
_QUIET = ".*TRITON_DEFAULT_FP_FUSION.*"
_BINDERS: Dict[Tuple[int, int], Callable] = {}


def specialize(launch, config, target) -> Dict[str, Any]:
    """What ``JITFunction.run`` would compile for ``launch`` with ``config`` on ``target``.

    Returns the kernel, target, signature, constexprs, attrs and options (as a dict), plus a ``key``
    that is equal for two launches exactly when they compile to the same binary.
    """
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.kernel)
    tgt = _target(target)
    backend = _backend(tgt.arch)
    binder = _BINDERS.get((id(fn), tgt.arch))
    if binder is None:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        _BINDERS[(id(fn), tgt.arch)] = binder
    kwargs = dict(launch.args)
    kwargs.update(_config_kwargs(config))
    kwargs.update(_runtime_options(fn))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUIET)
        bound_args, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = _pack_args(fn, backend, kwargs, bound_args,
                                                           specialization, options)
    option_dict = dict(options.__dict__)
    ident = repr((fn.module, fn.fn.__qualname__, tgt.arch, sorted(signature.items()),
                  sorted((k, repr(v)) for k, v in constexprs.items()),
                  sorted((k, repr(v)) for k, v in attrs.items()),
                  sorted((k, repr(v)) for k, v in option_dict.items())))
    return {
        "fn": fn, "kernel": fn.fn.__name__, "arch": tgt.arch, "signature": signature,
        "constexprs": constexprs, "attrs": attrs, "options": option_dict,
        "key": hashlib.sha1(ident.encode()).hexdigest()[:16],
    }


# ----------------------------------------------------------------------------------------------
# 3. Reading SASS and the compiler's reports
# ----------------------------------------------------------------------------------------------

# "/*0120*/   @!P0 LDG.E.U16 R4, desc[UR4][R2.64] ;" -> "LDG.E.U16"
_SASS_LINE = re.compile(
    r"^\s*/\*[0-9a-fA-F]{4,}\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_WIDTHS = ("128", "64", "U16", "S16", "U8", "S8")
_WIDTH_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1, None: 4}


def _width(mods: Sequence[str]) -> Optional[str]:
    for w in _WIDTHS:
        if w in mods:
            return w
    return None


def parse_sass(text: str) -> Dict[str, Any]:
    """Matrix instruction class and memory instruction kinds of ``cuobjdump -sass`` output.

    Returns ``{"instructions": n, "mma": class, "memory": {kind: count}, "local_load_bytes",
    "local_store_bytes", "opcodes": {opcode: count}}``. ``mma`` is the best class present:
    HGMMA (sm_90 wgmma) > HMMA (mma.sync) > DMMA > FFMA > DFMA > ``none``. Memory kinds:
    ``LDGSTS.<bits>`` (cp.async, 32/64/128), ``UTMALDG`` / ``UTMASTG`` / ``UTMAREDG`` (TMA),
    ``LDG.E.128`` / ``LDG.E.64`` / ``LDG.E`` (32-bit) / ``LDG.E.U16`` / ``LDG.E.S16`` /
    ``LDG.E.U8`` / ``LDG.E.S8``, the same for ``STG``, ``LDL`` / ``STL`` (local memory),
    ``SHFL``, ``RED`` / ``ATOMG`` (global atomics). The local byte counts add up the widths of the
    LDL / STL instructions (static bytes, as ptxas counts spill bytes).
    """
    opcodes: Counter = Counter()
    memory: Counter = Counter()
    local = {"LDL": 0, "STL": 0}
    total = 0
    for line in text.splitlines():
        match = _SASS_LINE.match(line)
        if not match:
            continue
        total += 1
        op, *mods = match.group(1).split(".")
        opcodes[op] += 1
        width = _width(mods)
        if op == "LDGSTS":
            memory[f"LDGSTS.{(_WIDTH_BYTES[width] * 8)}"] += 1
        elif op in ("LDG", "STG"):
            memory[f"{op}.E" + (f".{width}" if width else "")] += 1
        elif op in ("LDL", "STL"):
            memory[op] += 1
            local[op] += _WIDTH_BYTES[width]
        elif op.startswith("UTMA") or op in ("SHFL", "RED", "ATOMG"):
            memory[op] += 1
    mma = next((c for c in MMA_CLASSES[:-1] if opcodes.get(c)), "none")
    return {"instructions": total, "mma": mma, "memory": dict(sorted(memory.items())),
            "local_load_bytes": local["LDL"], "local_store_bytes": local["STL"],
            "opcodes": dict(sorted(opcodes.items()))}


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_ptxas_log(text: str) -> Dict[str, int]:
    """Registers, stack frame and spill bytes from ``ptxas -v`` output (empty when absent)."""
    out: Dict[str, int] = {}
    regs = _PTXAS_REGS.findall(text)
    if regs:
        out["regs"] = int(regs[-1])
    frame = _PTXAS_FRAME.findall(text)
    if frame:
        stack, stores, loads = map(int, frame[-1])
        out.update(stack_bytes=stack, spill_store_bytes=stores, spill_load_bytes=loads)
    return out


def _tool_path(name: str) -> Optional[str]:
    """Path of a CUDA tool shipped with Triton (``cuobjdump``, ``nvdisasm``, ``ptxas``)."""
    try:
        from triton import knobs

        tool = getattr(knobs.nvidia, name.replace("-", "_"))
        if tool is not None and getattr(tool, "path", None):
            return tool.path
    except Exception:  # no such knob in this Triton, or the tool is missing
        pass
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(path):
            return path
    except Exception:
        pass
    return shutil.which(name)


def _ptxas_for(arch: int) -> Optional[str]:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:
        return _tool_path("ptxas")


def tools_available(archs: Iterable[int] = (90,)) -> Tuple[bool, str]:
    """Whether Triton's NVIDIA backend, ptxas (for each arch) and cuobjdump are present."""
    try:
        import triton  # noqa: F401
        from triton.compiler import make_backend  # noqa: F401
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as err:
        return False, f"Triton's NVIDIA backend does not import: {err}"
    for arch in archs:
        if not _ptxas_for(arch):
            return False, f"no ptxas for sm_{arch} in the Triton wheel"
    if not _tool_path("cuobjdump"):
        return False, "no cuobjdump in the Triton wheel"
    return True, ""


def _run_tool(args: Sequence[str]) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout


# ----------------------------------------------------------------------------------------------
# 4. Compiling one specialized launch
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _ptxas_log_on():
    """Let Triton print ptxas' ``-v`` log (which it otherwise discards), where the knob exists."""
    try:
        from triton import knobs

        nvidia = knobs.nvidia
        previous = nvidia.dump_ptxas_log
    except Exception:
        yield
        return
    nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log = previous


def _config_dict(config) -> Dict[str, Any]:
    return {k: v for k, v in _config_kwargs(config).items() if k != "ir_override"}


def config_label(config) -> str:
    """``128x256x64/w8/s3``: the config's block sizes in their order, warps, stages."""
    kw = _config_dict(config)
    blocks = "x".join(str(v) for k, v in kw.items()
                      if k not in ("num_warps", "num_stages", "num_ctas", "maxnreg"))
    out = f"{blocks or '-'}/w{kw.get('num_warps')}/s{kw.get('num_stages')}"
    if kw.get("num_ctas", 1) not in (None, 1):
        out += f"/c{kw['num_ctas']}"
    if kw.get("maxnreg") is not None:
        out += f"/r{kw['maxnreg']}"
    return out


def _compile_spec(spec: Dict[str, Any], sass_path: Optional[str] = None) -> Dict[str, Any]:
    """Compile one specialization and measure it; never raises (errors go into the result)."""
    import triton
    from triton.compiler import ASTSource

    arch = spec["arch"]
    out: Dict[str, Any] = {"compiled": False, "error": None}
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_QUIET)
            with _ptxas_log_on(), contextlib.redirect_stdout(log):
                src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec["attrs"])
                kernel = triton.compile(src, target=_target(arch), options=spec["options"])
    except Exception as err:  # a compile error is a result, not a crash of the report
        text = f"{type(err).__name__}: {err}"
        out.update(error=text[:4000], compile_s=round(time.perf_counter() - start, 2))
        return out
    out["compile_s"] = round(time.perf_counter() - start, 2)
    out["compiled"] = True
    meta = kernel.metadata
    out["smem_bytes"] = int(getattr(meta, "shared", 0) or 0)
    ttir = kernel.asm.get("ttir", "")
    out["has_dot"] = bool(re.search(r"\btt\.dot(_scaled)?\b", ttir if isinstance(ttir, str) else ""))
    out.update(parse_ptxas_log(log.getvalue()))
    out["spill_source"] = "ptxas" if "spill_store_bytes" in out else "sass"
    cubin = kernel.asm.get("cubin")
    cuobjdump = _tool_path("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            usage = _RES_USAGE.search(_run_tool([cuobjdump, "-res-usage", path]))
            if usage:
                regs, stack, static_shared, local = map(int, usage.groups())
                out.setdefault("regs", regs)
                out["local_bytes"] = local
                out.setdefault("stack_bytes", stack)
            sass = _run_tool([cuobjdump, "-sass", path])
        except (subprocess.CalledProcessError, OSError) as err:
            out["error"] = f"cuobjdump failed: {err}"
            return out
    sass_target = re.search(r"\.target\s+(sm_\w+)", sass)
    out["sass_target"] = sass_target.group(1) if sass_target else TARGETS.get(arch, (f"sm_{arch}",))[0]
    parsed = parse_sass(sass)
    out["mma"] = parsed["mma"]
    out["memory"] = parsed["memory"]
    out["instructions"] = parsed["instructions"]
    if out["spill_source"] == "sass":
        out["spill_store_bytes"] = parsed["local_store_bytes"]
        out["spill_load_bytes"] = parsed["local_load_bytes"]
    if sass_path:
        os.makedirs(os.path.dirname(sass_path) or ".", exist_ok=True)
        with open(sass_path, "w") as f:
            f.write(sass)
        out["sass_file"] = sass_path
    return out


def _base_record(spec: Dict[str, Any], config, config_index: int, uses: List[Dict[str, Any]]) -> Dict[str, Any]:
    arch = spec["arch"]
    name, limit = TARGETS.get(arch, (f"sm_{arch}", None))
    first = uses[0]
    return {
        "launch": first["label"], "op": first["op"], "kernel": spec["kernel"],
        "shape": first["shape"], "dtype": first["dtype"], "m": first["m"],
        "arch": arch, "target": name, "config": config_label(config),
        "config_kwargs": _config_dict(config), "config_index": config_index,
        "first_choice": config_index == 0, "key": spec["key"],
        "smem_limit": limit, "uses": uses,
        "specialization": {
            "constexprs": {spec["fn"].arg_names[k[0]] if len(k) == 1 else str(k): repr(v)
                           for k, v in spec["constexprs"].items()},
            "divisible_by_16": [spec["fn"].arg_names[k[0]] for k, v in spec["attrs"].items()
                                if len(k) == 1 and any("divisibility" in str(a) for a in v)],
        },
    }


def _finish(record: Dict[str, Any]) -> Dict[str, Any]:
    if record.get("compiled"):
        limit = record.get("smem_limit")
        record["smem_kib"] = round(record["smem_bytes"] / 1024, 1)
        record["fits"] = limit is None or record["smem_bytes"] <= limit
        record["spill_bytes"] = record.get("spill_store_bytes", 0) + record.get("spill_load_bytes", 0)
    record["violations"] = check_properties(record)
    return record


def compile_launch(launch, config=None, target=90, sass_path: Optional[str] = None) -> Dict[str, Any]:
    """Compile one launch (a RecordedLaunch or a KernelLaunch) with ``config`` (default: its first
    choice) for ``target`` (an arch number or a GPUTarget), in this process. Returns the record."""
    recorded = launch if isinstance(launch, RecordedLaunch) else None
    spec_launch = recorded.launch if recorded else launch
    configs = list(spec_launch.configs)
    config = configs[0] if config is None else config
    index = next((i for i, c in enumerate(configs) if c is config), -1)
    use = recorded.use() if recorded else {"op": spec_launch.name, "index": 0, "launch": spec_launch.name,
                                           "label": spec_launch.name, "shape": "", "dtype": "", "m": None}
    spec = specialize(spec_launch, config, target)
    record = _base_record(spec, config, index, [use])
    if not use["dtype"]:
        record["dtype"] = _pointer_dtype(spec["signature"])
    record.update(_compile_spec(spec, sass_path))
    return _finish(record)


def _pointer_dtype(signature: Dict[str, str]) -> str:
    for t in signature.values():
        if isinstance(t, str) and t.startswith("*"):
            return t[1:]
    return ""


# ----------------------------------------------------------------------------------------------
# 5. Properties
# ----------------------------------------------------------------------------------------------


def check_properties(record: Dict[str, Any]) -> List[str]:
    """The violations of one compiled kernel's record (an empty list when it is clean):

    * it compiles;
    * on sm_90, a bf16 / fp16 kernel that does a ``tl.dot`` uses HGMMA (wgmma);
    * no spills (0 spill store / load bytes, no local memory traffic);
    * shared memory within the target's limit;
    * no scalar 16-bit global loads / stores (``LDG.E.U16``/``S16``, ``STG.E.U16``) in a kernel
      that does matrix work, except the loads a launch of ``NARROW_LOADS`` makes by design (at
      most one per element of its narrow tile per thread, and no stores).
    """
    where = f"{record.get('launch')} [{record.get('shape')} {record.get('dtype')} " \
            f"{record.get('target')} {record.get('config')}]"
    if not record.get("compiled"):
        first = (record.get("error") or "unknown error").strip().splitlines()
        return [f"{where}: does not compile: {first[0] if first else ''}"]
    out = []
    dot = record.get("has_dot", False)
    if record.get("arch") == 90 and record.get("dtype") in HALF_DTYPES and dot \
            and record.get("mma") != "HGMMA":
        out.append(f"{where}: matrix instructions are {record.get('mma')}, not HGMMA")
    spills = record.get("spill_store_bytes", 0) + record.get("spill_load_bytes", 0)
    memory = record.get("memory", {})
    if spills or memory.get("LDL") or memory.get("STL") or record.get("local_bytes"):
        out.append(f"{where}: spills ({record.get('spill_store_bytes', 0)} B stored, "
                   f"{record.get('spill_load_bytes', 0)} B loaded, {memory.get('STL', 0)} STL / "
                   f"{memory.get('LDL', 0)} LDL, stack frame {record.get('stack_bytes', 0)} B)")
    limit = record.get("smem_limit")
    if limit is not None and record.get("smem_bytes", 0) > limit:
        out.append(f"{where}: shared memory {record['smem_bytes']} B > {limit} B limit")
    if dot:
        scalar = {k: memory[k] for k in SCALAR_16BIT if memory.get(k)}
        allowed, _ = narrow_allowance(record)
        loads = sum(n for k, n in scalar.items() if k in SCALAR_16BIT_LOADS)
        if scalar and len(scalar) == sum(k in SCALAR_16BIT_LOADS for k in scalar) \
                and loads <= allowed:
            scalar = {}
        if scalar:
            kinds = ", ".join(f"{n} {k}" for k, n in scalar.items())
            out.append(f"{where}: scalar 16-bit global accesses in a matrix kernel: {kinds}")
    return out


# ----------------------------------------------------------------------------------------------
# 6. The whole report
# ----------------------------------------------------------------------------------------------

# Jobs are left here before the pool forks, so workers find the kernels without pickling them.
_JOBS: List[Tuple[Dict[str, Any], Optional[str]]] = []


def _run_job(index: int) -> Dict[str, Any]:
    spec, sass_path = _JOBS[index]
    return _compile_spec(spec, sass_path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def plan(shape_names: Sequence[str] = ("kphi3",), dtypes: Sequence[str] = DTYPE_NAMES,
         targets: Sequence[int] = (90, 80), m: int = DEFAULT_M, first_choice: bool = False,
         ops: Optional[Iterable[str]] = None) -> List[Dict[str, Any]]:
    """Record and specialize: one entry per distinct compile, with its spec, config and uses."""
    entries: Dict[str, Dict[str, Any]] = {}
    for shape in shape_table.resolve_shapes(shape_names):
        for dtype in dtypes:
            for rec in record_launches(shape, m, dtype, ops):
                configs = list(rec.launch.configs)[: 1 if first_choice else None]
                for arch in targets:
                    for i, config in enumerate(configs):
                        spec = specialize(rec.launch, config, arch)
                        entry = entries.get(spec["key"])
                        if entry is None:
                            entries[spec["key"]] = {"spec": spec, "config": config, "index": i,
                                                    "uses": [rec.use()]}
                        elif rec.use() not in entry["uses"]:
                            entry["uses"].append(rec.use())
    return list(entries.values())


def compile_all(entries: List[Dict[str, Any]], jobs: int = 2, sass_dir: Optional[str] = None,
                progress: bool = True, records: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
    """Compile planned entries (in a pool of ``jobs`` processes) into finished records.

    Records are appended to ``records`` (a new list by default) as they finish, so a caller that
    is interrupted still holds every finished one.
    """
    global _JOBS
    _refuse_interpreter()
    done = records if records is not None else []
    records = [_base_record(e["spec"], e["config"], e["index"], e["uses"]) for e in entries]
    _JOBS = []
    for n, r in enumerate(records):
        path = None
        if sass_dir:
            name = f"{n:03d}_{r['op']}_{r['shape']}_{r['dtype']}_{r['target']}_{r['config']}.sass"
            path = os.path.join(sass_dir, _slug(name))
        _JOBS.append((entries[n]["spec"], path))
    start = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="kphi3-compile-report-")
    saved_cache = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache   # fresh: every number comes from this compile
    try:
        if jobs <= 1 or len(_JOBS) <= 1:
            results = map(_run_job, range(len(_JOBS)))
            pool = None
        else:
            import multiprocessing as mp

            pool = mp.get_context("fork").Pool(min(jobs, len(_JOBS)))
            results = pool.imap(_run_job, range(len(_JOBS)))
        try:
            for n, result in enumerate(results):
                records[n].update(result)
                done.append(_finish(records[n]))
                if progress:
                    r = records[n]
                    state = "ok" if r.get("compiled") else "FAILED"
                    print(f"[{n + 1}/{len(records)}] {r['launch']} {r['shape']} {r['dtype']} "
                          f"{r['target']} {r['config']}: {state} ({r.get('compile_s', 0):.1f}s, "
                          f"{time.perf_counter() - start:.0f}s total)", file=sys.stderr, flush=True)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    finally:
        _JOBS = []
        if saved_cache is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache
        shutil.rmtree(cache, ignore_errors=True)
    return done


def environment(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import triton

    info = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "date": env.now_iso(), "host": env.cpu_name(),
            "command": " ".join(["python -m kphi3_bench.compile_report", *(argv or [])])}
    for arch in (80, 90):
        path = _ptxas_for(arch)
        if path:
            try:
                version = re.search(r"release (\S+)", _run_tool([path, "--version"]))
                info[f"ptxas_sm{arch}"] = f"{os.path.basename(path)} {version.group(1).rstrip(',') if version else '?'}"
            except Exception:
                info[f"ptxas_sm{arch}"] = os.path.basename(path)
    return info




def describe_environment(info: Dict[str, Any]) -> str:
    """One line naming the compiler that made the report: the numbers depend on its version."""
    tools = ", ".join(f"{info[k]} for sm_{k[len('ptxas_sm'):]}" for k in sorted(info)
                      if k.startswith("ptxas_sm"))
    return (f"Triton {info.get('triton')}" + (f" ({tools})" if tools else "")
            + f", torch {info.get('torch')}, Python {info.get('python')}, {info.get('date')}; "
            f"command: {info.get('command')}")


def _kinds(memory: Dict[str, int], prefixes: Sequence[str]) -> str:
    parts = []
    for kind, count in memory.items():
        if any(kind.startswith(p) for p in prefixes):
            short = kind.replace("LDG.E.", "LDG.").replace("STG.E.", "STG.")
            short = {"LDG.E": "LDG.32", "STG.E": "STG.32"}.get(short, short)
            parts.append(f"{short}:{count}")
    return " ".join(parts) or "-"


def format_table(records: List[Dict[str, Any]]) -> str:
    """One row per compiled kernel (launch x dtype x config x target).

    ``launch`` is the first launch that compiles to this kernel and ``uses`` how many launches do
    (``op#i`` is the i-th launch of one call of launcher ``op``); ``shape`` is the first shape,
    ``+N`` more shapes share the kernel. Memory columns count SASS instructions by kind.
    """
    head = ("launch", "uses", "shape", "dtype", "target", "config", "regs", "spill B", "smem KiB",
            "fits", "mma", "loads", "stores", "other")
    rows = [head]
    for r in records:
        shapes = list(dict.fromkeys(u["shape"] for u in r["uses"]))
        shape = shapes[0] + (f"+{len(shapes) - 1}" if len(shapes) > 1 else "")
        if r.get("compiled"):
            mem = r.get("memory", {})
            rows.append((r["launch"], str(len(r["uses"])), shape, r["dtype"], r["target"],
                         r["config"], str(r.get("regs", "?")), str(r.get("spill_bytes", "?")),
                         f"{r['smem_kib']:.0f}", "yes" if r["fits"] else "NO", r["mma"],
                         _kinds(mem, ("LDGSTS", "LDG", "UTMALDG")),
                         _kinds(mem, ("STG", "UTMASTG", "UTMAREDG")),
                         _kinds(mem, ("LDL", "STL", "SHFL", "RED", "ATOMG"))))
        else:
            err = (r.get("error") or "").strip().splitlines()
            rows.append((r["launch"], str(len(r["uses"])), shape, r["dtype"], r["target"],
                         r["config"], "-", "-", "-", "-", "ERROR", (err[0] if err else "")[:60], "", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kphi3_bench.compile_report",
        description="Compile every Triton launch of kphi3-kernels for sm_90a / sm_80 on the CPU "
                    "(no GPU needed) and report registers, spills, shared memory, matrix "
                    "instructions and global load/store kinds from the SASS.")
    p.add_argument("--shapes", default="kphi3",
                   help="kphi3 | phi3-mini | all, or comma-separated shape names (default kphi3)")
    p.add_argument("--m", type=int, default=DEFAULT_M, help=f"tokens (default {DEFAULT_M})")
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES), help="comma-separated: bf16,fp16,fp32")
    p.add_argument("--targets", default="90,80", help="comma-separated compute capabilities: 90,80")
    p.add_argument("--first-choice", action="store_true",
                   help="only each launch's first-choice config (configs[0]): the fast mode")
    p.add_argument("--ops", default=None, help=f"comma-separated launchers (default all): {', '.join(OPS)}")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                   help="compile processes (default: CPU count, at most 8)")
    p.add_argument("--out", default=None, help="write the records and environment as JSON")
    p.add_argument("--sass-dir", default=None, help="write each kernel's SASS there as a text file")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when any kernel violates check_properties")
    return p


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.shape_names = list(shape_table.FAMILIES) if names == ["all"] else names
    shape_table.resolve_shapes(args.shape_names)  # validates
    args.dtype_list = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in args.dtype_list:
        _resolve_dtype(d)
    try:
        args.target_list = [int(t.strip().replace("sm_", "").rstrip("a")) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--targets: expected compute capabilities like 90,80, got {args.targets!r}") from None
    unknown = [t for t in args.target_list if t not in TARGETS]
    if unknown:
        raise ValueError(f"--targets: unsupported {unknown}; known: {', '.join(map(str, TARGETS))}")
    args.op_list = [o.strip() for o in args.ops.split(",")] if args.ops else None
    if args.op_list and set(args.op_list) - set(OPS):
        raise ValueError(f"--ops: unknown {sorted(set(args.op_list) - set(OPS))}; known: {', '.join(OPS)}")
    if args.m < 1:
        raise ValueError("--m must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except ValueError as err:
        print(f"compile_report: error: {err}", file=sys.stderr)
        return 2
    if _interpreting():
        print("compile_report: error: TRITON_INTERPRET=1 is set; the kernels are then interpreter "
              "objects and cannot be compiled. Unset it (or set it to 0) and run again.", file=sys.stderr)
        return 2
    ok, why = tools_available(args.target_list)
    if not ok:
        print(f"compile_report: error: {why}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    entries = plan(args.shape_names, args.dtype_list, args.target_list, args.m, args.first_choice,
                   args.op_list)
    print(f"{len(entries)} distinct kernels to compile ({time.perf_counter() - start:.1f}s to record)",
          file=sys.stderr, flush=True)
    records: List[Dict[str, Any]] = []
    interrupted = False

    def _stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        compile_all(entries, jobs=args.jobs, sass_dir=args.sass_dir, records=records)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: reporting the {len(records)} of {len(entries)} kernels that finished",
              file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    info = environment(argv)
    print(describe_environment(info))
    print(format_table(records))
    violations = [v for r in records for v in r["violations"]]
    print(f"\n{len(records)} kernels, {sum(1 for r in records if r.get('compiled'))} compiled, "
          f"{len(violations)} property violations, {time.perf_counter() - start:.0f}s")
    for v in violations:
        print(f"  - {v}")
    if args.out:
        payload = {
            "environment": info,
            "settings": {"shapes": args.shape_names, "m": args.m, "dtypes": args.dtype_list,
                         "targets": args.target_list, "first_choice": args.first_choice,
                         "ops": args.op_list or list(OPS)},
            "complete": not interrupted, "planned": len(entries),
            "records": records,
            "violations": violations,
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"wrote {args.out}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if args.strict and violations else 0


if __name__ == "__main__":
    sys.exit(main())
