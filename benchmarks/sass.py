"""Compile a recorded Triton launch for an NVIDIA target on the CPU and read what the compiler
made of it: registers, spills, shared memory, matrix instructions and the kinds of global loads
and stores in the SASS. Nothing here knows which kernels a package has: ``compile_report`` says
which launches to record and at which shapes.

No GPU and no CUDA driver are needed: the compiler (ptxas) and ``cuobjdump`` ship with the Triton
wheel.

1. **Specialize like the runtime** (``specialize``). For a ``KernelLaunch`` (``ops/launch.py``)
   and a config the autotuner may pick, the arguments go through Triton's own JIT binder
   (``create_function_from_signature`` and ``JITFunction._pack_args``, as ``JITFunction.run``
   does), so unit strides become the constexpr 1 and pointers / integers get the
   divisibility-by-16 attribute exactly as on a real launch. Two launches with the same ``key``
   compile to the same binary.
2. **Compile** (``compile_launch``, ``compile_all``) with ``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))`` (arch 90 compiles for ``sm_90a`` when the kernel uses
   wgmma), ``compile_all`` in a process pool, into a private, fresh Triton cache, so every number
   comes from this compile.
3. **Read** the ptxas log (``parse_ptxas_log``: registers, stack frame, spill stores / loads),
   the kernel metadata (shared memory, as Triton checks it at load time), ``cuobjdump
   -res-usage`` (registers, local memory) and ``cuobjdump -sass`` (``parse_sass``: matrix
   instruction class and global / local memory instruction kinds).
4. **Check** (``check_properties``): a bf16 / fp16 kernel with a ``tl.dot`` that does not use
   HGMMA on sm_90, any spill, shared memory above the target's limit, and scalar 16-bit global
   loads / stores in a kernel that does matrix work (beyond those an ``allowance`` grants a
   launch by design).

Checked with Triton 3.6 and 3.9 (both have the binder, ``JITFunction._pack_args`` and the
ptxas-log knob; without the knob spill bytes are read from the LDL / STL instructions of the
SASS). Compiling needs the real ``@triton.jit`` kernels: under ``TRITON_INTERPRET=1`` they are
interpreter objects (``InterpreterError``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# arch -> (name, shared memory a block may use: the opt-in maximum per block)
TARGETS: Dict[int, Tuple[str, int]] = {
    90: ("sm_90a", 227 * 1024),   # H100 / H200: 232448 bytes
    80: ("sm_80", 163 * 1024),    # A100: 166912 bytes
}
HALF_DTYPES = ("bf16", "fp16")
# The matrix instruction classes, best first.
MMA_CLASSES = ("HGMMA", "HMMA", "DMMA", "FFMA", "DFMA", "none")
SCALAR_16BIT = ("LDG.E.U16", "LDG.E.S16", "STG.E.U16", "STG.E.S16")
SCALAR_16BIT_LOADS = ("LDG.E.U16", "LDG.E.S16")


# A record -> how many scalar 16-bit global loads and stores its design allows, and why (see
# check_properties).
Allowance = Callable[[Dict[str, Any]], Tuple[int, int, str]]


def no_allowance(record: Dict[str, Any]) -> Tuple[int, int, str]:
    return 0, 0, ""


class InterpreterError(RuntimeError):
    """The kernels were decorated under TRITON_INTERPRET=1 and cannot be compiled."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def refuse_interpreter() -> None:
    if interpreting():
        raise InterpreterError(
            "TRITON_INTERPRET=1 is set: the kernels are then Triton interpreter objects and cannot "
            "be compiled for a GPU. Run this tool with TRITON_INTERPRET unset (or 0)."
        )


# ----------------------------------------------------------------------------------------------
# 1. A recorded launch and its use
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RecordedLaunch:
    """One launch made by one call of a Triton launcher."""

    op: str          # the launcher called
    index: int       # the how-manieth launch of that call (0-based)
    shape: str       # the name of the shape it was recorded at
    dtype: str       # "bf16" / "fp16" / "fp32"
    m: int           # tokens
    launch: Any      # the KernelLaunch

    @property
    def label(self) -> str:
        return f"{self.op}#{self.index}:{self.launch.name}"

    def use(self) -> Dict[str, Any]:
        return {"op": self.op, "index": self.index, "launch": self.launch.name, "label": self.label,
                "shape": self.shape, "dtype": self.dtype, "m": self.m}


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
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args,
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


def ptxas_versions() -> Dict[str, str]:
    """``{"ptxas_sm80": "ptxas 12.8.93", ...}``: the compilers the records come from."""
    info = {}
    for arch in sorted(TARGETS):
        path = _ptxas_for(arch)
        if path:
            try:
                version = re.search(r"release (\S+)", _run_tool([path, "--version"]))
                info[f"ptxas_sm{arch}"] = (f"{os.path.basename(path)} "
                                           f"{version.group(1).rstrip(',') if version else '?'}")
            except Exception:
                info[f"ptxas_sm{arch}"] = os.path.basename(path)
    return info


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


def _finish(record: Dict[str, Any], allowance: Allowance = no_allowance) -> Dict[str, Any]:
    if record.get("compiled"):
        limit = record.get("smem_limit")
        record["smem_kib"] = round(record["smem_bytes"] / 1024, 1)
        record["fits"] = limit is None or record["smem_bytes"] <= limit
        record["spill_bytes"] = record.get("spill_store_bytes", 0) + record.get("spill_load_bytes", 0)
    record["violations"] = check_properties(record, allowance)
    return record


def compile_launch(launch, config=None, target=90, sass_path: Optional[str] = None,
                   allowance: Allowance = no_allowance) -> Dict[str, Any]:
    """Compile one launch (a RecordedLaunch or a KernelLaunch) with ``config`` (default: its first
    choice) for ``target`` (an arch number or a GPUTarget), in this process. Returns the record,
    its ``violations`` those of ``check_properties(record, allowance)``."""
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
    return _finish(record, allowance)


def _pointer_dtype(signature: Dict[str, str]) -> str:
    for t in signature.values():
        if isinstance(t, str) and t.startswith("*"):
            return t[1:]
    return ""


# ----------------------------------------------------------------------------------------------
# 5. Properties
# ----------------------------------------------------------------------------------------------


def check_properties(record: Dict[str, Any], allowance: Allowance = no_allowance) -> List[str]:
    """The violations of one compiled kernel's record (an empty list when it is clean):

    * it compiles;
    * on sm_90, a bf16 / fp16 kernel that does a ``tl.dot`` uses HGMMA (wgmma);
    * no spills (0 spill store / load bytes, no local memory traffic);
    * shared memory within the target's limit;
    * no scalar 16-bit global loads / stores (``LDG.E.U16``/``S16``, ``STG.E.U16``) in a kernel
      that does matrix work, except as many loads and stores as ``allowance(record)`` grants
      the launch's design.
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
        allowed_loads, allowed_stores, _ = allowance(record)
        loads = sum(n for k, n in scalar.items() if k in SCALAR_16BIT_LOADS)
        if scalar and loads <= allowed_loads and sum(scalar.values()) - loads <= allowed_stores:
            scalar = {}
        if scalar:
            kinds = ", ".join(f"{n} {k}" for k, n in scalar.items())
            out.append(f"{where}: scalar 16-bit global accesses in a matrix kernel: {kinds}")
    return out


# ----------------------------------------------------------------------------------------------
# 6. Compiling many launches
# ----------------------------------------------------------------------------------------------

# Jobs are left here before the pool forks, so workers find the kernels without pickling them.
_JOBS: List[Tuple[Dict[str, Any], Optional[str]]] = []


def _run_job(index: int) -> Dict[str, Any]:
    spec, sass_path = _JOBS[index]
    return _compile_spec(spec, sass_path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def compile_all(entries: List[Dict[str, Any]], jobs: int = 2, sass_dir: Optional[str] = None,
                progress: bool = True, records: Optional[List[Dict[str, Any]]] = None,
                allowance: Allowance = no_allowance) -> List[Dict[str, Any]]:
    """Compile entries (``{"spec": specialize(...), "config", "index": the config's place in the
    launch's list, "uses": [RecordedLaunch.use(), ...]}``, in a pool of ``jobs`` processes) into
    finished records, checked with ``check_properties(record, allowance)``.

    Records are appended to ``records`` (a new list by default) as they finish, so a caller that
    is interrupted still holds every finished one.
    """
    global _JOBS
    refuse_interpreter()
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
    cache = tempfile.mkdtemp(prefix="triton-sass-")
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
                done.append(_finish(records[n], allowance))
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
