"""The compile report: every Triton launch of KPhi-3, compiled for sm_90a (H100/H200) and sm_80
(A100) on the CPU, with what the compiler made of it (registers, spills, shared memory, matrix
instructions and the kinds of global loads and stores in the SASS).

    python -m kphi3_bench.compile_report                       # released shapes, bf16/fp16/fp32, sm_90a + sm_80
    python -m kphi3_bench.compile_report --first-choice --dtypes bf16 --targets 90 --out report.json
    python -m kphi3_bench.compile_report --shapes all --sass-dir sass/ --jobs 8

No GPU and no CUDA driver are needed. This module says what to compile: ``record_launches``
calls every Triton launcher of the package (``OPS``: forward and backward of ``grouped_linear``,
``gpc_io``, ``gpc_block`` with and without its second weight, ``interleave``, and the fused
decoder's launchers) on CPU tensors of the real shapes (``torch.empty``: nothing runs) with
``kphi3_kernels.ops.launch.RECORDER`` set, keeping each ``KernelLaunch`` instead of running it;
``plan`` specializes each launch in each config the autotuner may pick, once per distinct
binary. ``kphi3_bench.sass`` compiles and reads them (see there how); ``check_properties`` here
is its check with the scalar 16-bit accesses ``NARROW_ACCESSES`` allows by design.

Python API: ``record_launches``, ``plan``, ``compile_launch``, ``compile_all``,
``check_properties``, and (from ``kphi3_bench.sass``) ``parse_sass``, ``parse_ptxas_log``,
``specialize``, ``tools_available``.

The output's first line and the JSON's ``environment`` name the Triton and ptxas versions that
compiled: registers and spills differ between compiler versions (Triton 3.6 spilled kernels that
3.9 compiles clean), so a report holds for its own versions only. It refuses to run with
``TRITON_INTERPRET=1`` (the kernels are then interpreter objects).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import env, sass, shapes as shape_table
from .report import render, write_text
from .sass import (  # noqa: F401  (re-exported: the names the tests and scripts know)
    HALF_DTYPES, MMA_CLASSES, SCALAR_16BIT, SCALAR_16BIT_LOADS, TARGETS, InterpreterError,
    RecordedLaunch, config_label, parse_ptxas_log, parse_sass, specialize, tools_available)

DEFAULT_M = 8192
DTYPE_NAMES = ("bf16", "fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class NarrowAccesses:
    """A launch whose design reads (or writes) one operand with scalar 16-bit accesses, and how
    many it may make: ``loads`` (``stores``) per element of that operand's tile per thread
    (``tile``: the two block sizes of the tile), so that a second strided operand, e.g. in the
    K loop, still fails the gate."""

    reason: str
    tile: Tuple[str, str]
    max_m: Optional[int] = None   # the allowance holds only where every use has M <= max_m
    loads: int = 1
    stores: int = 0

    def per_thread(self, kwargs: Dict[str, Any]) -> int:
        return kwargs[self.tile[0]] * kwargs[self.tile[1]] // (32 * kwargs["num_warps"])


# Launch name -> the narrow accesses its design makes. Every other matrix kernel: none.
NARROW_ACCESSES = {
    "gpc_io_fwd_fused": NarrowAccesses(
        "the IO block's decode forward reads x[:, n::G] in place (stride G: no wide load "
        "fits); at M <= 64 those are a few activation rows next to the weights it streams "
        "with LDGSTS.128: 1-11% of the launch's bytes at M = 16 at the released shapes "
        "(python -m kphi3_bench.ledger), about a third at M = 64 for down_proj",
        ("BLOCK_P", "BLOCK_K"), max_m=64),
    "gpc_io_bwd_dx": NarrowAccesses(
        "the IO block's dx adds dxi gathered at its interleaved columns (no unit stride), "
        "once per output tile before the K loop; the K loop's operands are LDGSTS.128. The "
        "gathered bytes are 10-44% of the launch's at the released shapes (down_proj the most), "
        "read once, in runs of about BLOCK_Q / G contiguous elements",
        ("BLOCK_P", "BLOCK_Q")),
    "norm_io_bwd_dxn": NarrowAccesses(
        "the fused norm head's input gradient (in channel order, for the norm's backward): "
        "gpc_io_bwd_dx's gathered dxi, the same design and share of bytes",
        ("BLOCK_P", "BLOCK_Q")),
    "mlp_tail_bwd_dgate_up": NarrowAccesses(
        "the fused MLP tail's input gradient walks a block's slots (D view) and holds channels "
        "G apart in runs of BLOCK_Q / R: its epilogue reads gate and up and writes their "
        "gradients there, once per element (the K loop's dy and weights are LDGSTS.128). "
        "That replaces dxi's write and gathered re-read (python -m kphi3_bench.model_ledger)",
        ("BLOCK_P", "BLOCK_Q"), loads=2, stores=2),
}
# gate_up_proj's heads writing silu(gate) * up in down_proj's layout: each program stores its
# tile's activations at their slots (runs of about BLOCK_Q / G channels, R apart), once per
# element, and the zeros of the padding after each run's last channel from a narrow tile of
# the block's last G channels (up to four stores each at the released shapes, R - 1 - (s - G)
# // G); the K loops' operands are LDGSTS.128 and gate_up's own stores and re-read 16-byte.
for _name in ("gpc_io_fwd_act_layout", "gpc_io_layout_fwd_act_layout"):
    NARROW_ACCESSES[_name] = NarrowAccesses(
        "gate_up_proj's launch writes up * silu(gate) of its own tiles into down_proj's "
        "block-residue layout (the fused tail's input) at the slots of the tile's channels, "
        "and the zeros of each run's padding after its last channel: that replaces the "
        "activation pass's re-read of gate_up (python -m kphi3_bench.model_ledger); the "
        "padding's stores at most four per element of its narrow tile at the released "
        "shapes", ("BLOCK_P", "BLOCK_Q"), loads=0, stores=1 + 4)


def narrow_allowance(record: Dict[str, Any]) -> Tuple[int, int, str]:
    """How many scalar 16-bit loads and stores ``record``'s design allows (0: none), and why."""
    name = str(record.get("launch", "")).rsplit(":", 1)[-1]
    rule = NARROW_ACCESSES.get(name)
    kwargs = record.get("config_kwargs")
    if rule is None or not kwargs:
        return 0, 0, ""
    uses = record.get("uses") or [record]
    if rule.max_m is not None and any(u.get("m", 0) > rule.max_m for u in uses):
        return 0, 0, ""
    per_thread = rule.per_thread(kwargs)
    return rule.loads * per_thread, rule.stores * per_thread, rule.reason


def check_properties(record: Dict[str, Any]) -> List[str]:
    """``sass.check_properties`` with the accesses ``NARROW_ACCESSES`` allows: one compiled kernel's
    violations (an empty list when it is clean)."""
    return sass.check_properties(record, narrow_allowance)


def compile_launch(launch, config=None, target=90, sass_path: Optional[str] = None
                   ) -> Dict[str, Any]:
    """``sass.compile_launch`` checked against ``NARROW_ACCESSES``."""
    return sass.compile_launch(launch, config, target, sass_path, narrow_allowance)


def compile_all(entries: List[Dict[str, Any]], jobs: int = 2, sass_dir: Optional[str] = None,
                progress: bool = True, records: Optional[List[Dict[str, Any]]] = None
                ) -> List[Dict[str, Any]]:
    """``sass.compile_all`` of ``plan``'s entries, checked against ``NARROW_ACCESSES``."""
    return sass.compile_all(entries, jobs, sass_dir, progress, records, narrow_allowance)


# ----------------------------------------------------------------------------------------------
# 1. Recording launches
# ----------------------------------------------------------------------------------------------


def _op_calls(shape: "shape_table.Shape", m: int, dtype: torch.dtype) -> List[Tuple[str, Callable[[], Any]]]:
    """Every launcher of ``triton_impl`` with contiguous ``torch.empty`` operands of ``shape``."""
    from kphi3_kernels.layout import residue_run_length
    from kphi3_kernels.ops import triton_fused as F
    from kphi3_kernels.ops import triton_impl as T

    G, s, og = shape.groups, shape.in_per_group, shape.out_per_group
    R = residue_run_length(G * s, G, 8)

    def empty(*size):
        return torch.empty(*size, dtype=dtype)

    x, dy, h = empty(m, G * s), empty(m, G * og), empty(m, G * og)
    w1, w1b = empty(G, s, og), empty(G, s, og)   # grouped_linear / gpc_io weights
    w2 = empty(G, og, og)                         # the second weight of the non-IO block
    t, gu = empty(m, G * G * R), empty(m, 2 * G * s)  # a layout input; [gate | up] before it
    calls = [
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
        ("gpc_io_layout_fwd", lambda: F.gpc_io_layout_fwd(t, w1, w1b)),
        ("gpc_io_layout_bwd", lambda: F.gpc_io_layout_bwd(dy, t, w1, w1b)),
        ("silu_mul_layout", lambda: F.silu_mul_layout_fwd(gu, G, R)),
        ("silu_mul_layout_bwd", lambda: F.silu_mul_layout_bwd(t, gu, G)),
        ("mlp_tail_bwd", lambda: F.mlp_tail_bwd(dy, gu, t, w1, w1b)),
        ("norm_io_fwd", lambda: F.norm_io_fwd(x, x[0], 1e-5, w1, w1b, run=R)),
        ("norm_io_bwd", lambda: F.norm_io_bwd(dy, x, x[0], torch.empty(m), t, w1, w1b)),
        # The residual stream: the residual adds in the norms and in down_proj's epilogue, the
        # norm heads that write channel order and its de-interleaved copy, the plain norms.
        ("mlp_tail_fwd(residual)", lambda: F.mlp_tail_fwd(gu, w1, w1b, run=R, residual=dy)),
        ("norm_io_fwd(residual)", lambda: F.norm_io_fwd(x, x[0], 1e-5, w1, w1b, run=R,
                                                          residual=empty(m, G * s))),
        ("norm_io_bwd(residual)", lambda: F.norm_io_bwd(dy, x, x[0], torch.empty(m), t, w1, w1b,
                                                          dh=empty(m, G * s))),
        ("norm_io_split_fwd", lambda: F.norm_io_split_fwd(x, x[0], 1e-5, w1, w1b)),
        ("norm_io_split_fwd(residual)", lambda: F.norm_io_split_fwd(
            x, x[0], 1e-5, w1, w1b, residual=empty(m, G * s))),
        ("norm_io_split_bwd(residual)", lambda: F.norm_io_split_bwd(
            dy, x, x[0], torch.empty(m), empty(m, G * s), empty(m, G * s), w1, w1b,
            dh=empty(m, G * s))),
        ("rms_norm_fwd", lambda: F.rms_norm_fwd(x, x[0], 1e-5)),
        ("add_rms_norm_fwd", lambda: F.rms_norm_fwd(x, x[0], 1e-5, empty(m, G * s))),
        ("rms_norm_bwd(residual)", lambda: F.rms_norm_bwd(empty(m, G * s), x, x[0],
                                                           torch.empty(m), dh=empty(m, G * s))),
    ]
    act = _activation_layout(shape)
    if act is not None:
        # gate_up_proj's heads writing silu(gate) * up in down_proj's layout (the fused tail's
        # input), from either head.
        calls += [
            ("norm_io_split_fwd(activation)", lambda: F.norm_io_split_fwd(
                x, x[0], 1e-5, w1, w1b, residual=empty(m, G * s), act=act)),
            ("norm_io_fwd(activation)", lambda: F.norm_io_fwd(
                x, x[0], 1e-5, w1, w1b, run=R, residual=empty(m, G * s), act=act)),
        ]
    return calls


def _activation_layout(shape: "shape_table.Shape") -> Optional[Tuple[int, int]]:
    """``(groups, run)`` of down_proj's layout for its family's gate_up_proj shape, where the
    launch can write it in its epilogue (else None: the heads then write no activation)."""
    from kphi3_kernels.layout import residue_run_length
    from kphi3_kernels.ops.grouped_gemm import activation_layout_fits

    if shape.op != "gate_up":
        return None
    down = shape_table.SHAPES.get(f"{shape.family}-down")
    if down is None:
        return None
    G, per_group = down.groups, down.in_per_group
    run = residue_run_length(G * per_group, G, 8)
    fits = activation_layout_fits(shape.groups, shape.out_per_group, G, run)
    return (G, run) if fits else None


OPS = ("grouped_linear_fwd", "grouped_linear_bwd", "gpc_io_fwd", "gpc_io_bwd", "gpc_block_fwd",
       "gpc_block_fwd(no weight2)", "gpc_block_bwd", "gpc_block_bwd(no weight2)", "interleave_fwd",
       "gpc_io_layout_fwd", "gpc_io_layout_bwd", "silu_mul_layout", "silu_mul_layout_bwd",
       "mlp_tail_bwd", "norm_io_fwd", "norm_io_bwd", "mlp_tail_fwd(residual)",
       "norm_io_fwd(residual)", "norm_io_bwd(residual)", "norm_io_split_fwd",
       "norm_io_split_fwd(residual)", "norm_io_split_bwd(residual)", "rms_norm_fwd",
       "norm_io_split_fwd(activation)", "norm_io_fwd(activation)",
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
    sass.refuse_interpreter()
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
# 2. The plan and the report
# ----------------------------------------------------------------------------------------------


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


def environment(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import triton

    info = {"triton": triton.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "date": env.now_iso(), "host": env.cpu_name(),
            "command": " ".join(["python -m kphi3_bench.compile_report", *(argv or [])])}
    info.update(sass.ptxas_versions())
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
    rows = []
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
    return render(head, rows)


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
    """The parsed arguments, checked; a ValueError (``cli.UsageError``) for a bad one."""
    from .cli import check_choices, split_list

    args = build_parser().parse_args(argv)
    names = split_list(args.shapes)
    args.shape_names = list(shape_table.FAMILIES) if names == ["all"] else names
    shape_table.resolve_shapes(args.shape_names)  # validates
    args.dtype_list = check_choices(split_list(args.dtypes), DTYPE_NAMES, "dtype")
    try:
        args.target_list = [int(t.replace("sm_", "").rstrip("a"))
                            for t in split_list(args.targets)]
    except ValueError:
        raise ValueError(f"--targets: expected compute capabilities like 90,80, got "
                         f"{args.targets!r}") from None
    check_choices(list(map(str, args.target_list)), list(map(str, TARGETS)), "target")
    args.op_list = check_choices(split_list(args.ops), OPS, "op") if args.ops else None
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
    if sass.interpreting():
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
        write_text(args.out, json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.out}", file=sys.stderr)
    if interrupted:
        return 130
    return 1 if args.strict and violations else 0


if __name__ == "__main__":
    sys.exit(main())
