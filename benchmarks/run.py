"""``python -m kphi3_bench.run`` / ``kphi3-bench``: sweep the grouped layers, compare providers.

Examples::

    kphi3-bench --quick                                  # a first try (about a minute on 2 cores)
    kphi3-bench --out results.json --plot plots/         # the full sweep, saved
    kphi3-bench --shapes kphi3 --M 2048 --modes fwd      # the released shapes at one M
    kphi3-bench --list                                   # shapes, providers, modes
    kphi3-bench model --quick                            # model-level: train step and generate
    kphi3-bench plot results.json --out plots/           # the plots of a saved sweep, again

The providers of a shape, M and mode are timed together; a run in which a row's spread
(p80/p20) exceeds ``--spread-threshold`` or a grouped provider beats nn.Linear by more than the
roofline allows is timed again (``--max-repeats``, ``--max-time``), and rows that stay unstable
are marked UNSTABLE in the tables and ``"stable": false`` with the reason in the JSON.

Exit status: 0 when every row that ran was correct (passed parity, raised nothing), 1 when a
provider failed parity or raised, 2 for bad arguments. Unstable rows do not change it: they are
noise, not errors, and the closing line counts them.

This module imports neither torch nor the kernels at import time (together they take 10-20 s to
import on a small CPU): ``--help`` of every subcommand is printed without them, and each
subcommand imports what it needs once its arguments are parsed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from typing import List, Optional, Sequence


class UsageError(ValueError):
    """A bad command-line argument; main() prints it and exits with status 2."""


def _split(value: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"expected a comma-separated list, got {value!r}")
    return items


def _csv(values) -> str:
    return ",".join(map(str, values))


# Re-timing of unstable rows: how often and for how long (a row = one shape, M and mode, all
# its providers together).
MAX_REPEATS, QUICK_MAX_REPEATS = 3, 2
MAX_TIME_S, QUICK_MAX_TIME_S = 15.0, 2.0
# Untimed calls per provider and mode before the first run: one per rotated input set (up to 64
# at small M), but --quick makes two (enough to compile and allocate once).
QUICK_WARMUP_CALLS = 2

# What the help texts quote, written out so that `--help` needs no torch. The sweep itself reads
# shapes.py, providers.py, sweep.py and model_bench.py; tests/test_benchmarks.py checks that these
# copies match them.
FAMILY_NAMES = ("kphi3", "phi3-mini")
PROVIDER_NAMES = ("nn.Linear", "reference", "torch", "torch.compile", "grouped_mm", "triton")
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPE_NAMES = ("fp32", "bf16", "fp16")
DEFAULT_M_CUDA, DEFAULT_M_CPU = (1, 16, 2048, 8192, 16384), (1, 16, 2048)
QUICK_SHAPES = ("kphi3-qkv", "kphi3-down")
QUICK_M_CPU, QUICK_M_CUDA = (16, 256), (16, 2048)
QUICK_MODES = ("fwd", "fwd+bwd")
SPREAD_THRESHOLD = {"cpu": 1.5, "cuda": 1.2}
MODEL_VARIANTS = ("kphi3-triton", "kphi3-fused", "kphi3-torch", "phi3-dense")
MODEL_COMPILED = "+compile"

# The model benchmark's sizes when not given: (--quick, CUDA, CPU).
MODEL_DEFAULT_SIZES = {"layers": (2, 2, 2), "batch": (1, 8, 2), "seq": (64, 1024, 256),
                       "prompt": (8, 128, 32), "new_tokens": (8, 128, 32), "steps": (2, 10, 4)}

# How long `--quick` takes: `time kphi3-bench --quick --no-progress` took 49-72 s (median 60 s,
# three runs) on a 2-core CPU that other jobs were using too.
QUICK_TAKES = "about a minute on a 2-core CPU"


def build_parser() -> argparse.ArgumentParser:
    """The sweep's options (``kphi3-bench [options]``)."""
    p = argparse.ArgumentParser(
        prog="kphi3-bench",
        description="Benchmark KPhi-3's grouped layers (the IO block) against nn.Linear and the "
                    "PyTorch paths, with a parity check before every timing. Four more commands: "
                    "`kphi3-bench model --help` (the model-level benchmark), "
                    "`kphi3-bench plot --help` (plot a saved sweep again), "
                    "`kphi3-bench ledger --help` (the predicted H200 cost of every launch) and "
                    "`kphi3-bench ledger --model --help` (the predicted cost of one decoder "
                    "layer).",
        epilog="exit status: 0 when every row that ran passed parity and raised nothing, 1 when a "
               "provider failed parity or raised, 2 for bad arguments",
    )
    p.add_argument("--shapes", metavar="LIST",
                   help="comma-separated shape or family names (default: all; families: "
                        f"{', '.join(FAMILY_NAMES)}; see --list)")
    p.add_argument("--M", "--tokens", dest="Ms", metavar="LIST",
                   help=f"comma-separated token counts (default: {_csv(DEFAULT_M_CUDA)} on "
                        f"CUDA, {_csv(DEFAULT_M_CPU)} on CPU)")
    p.add_argument("--providers", metavar="LIST",
                   help=f"comma-separated providers (default: all: {_csv(PROVIDER_NAMES)})")
    p.add_argument("--modes", metavar="LIST",
                   help=f"comma-separated modes (default: all: {_csv(MODES)})")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true",
                   help=f"a reduced sweep ({_csv(QUICK_SHAPES)}; M {_csv(QUICK_M_CPU)} on CPU, "
                        f"{_csv(QUICK_M_CUDA)} on CUDA; {_csv(QUICK_MODES)}; shorter timings) "
                        f"that takes {QUICK_TAKES}")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--plot", metavar="DIR", help="write PNG plots (time vs M per shape)")
    p.add_argument("--peak-tflops", type=float, metavar="X",
                   help="roofline compute peak (default: the measured peak of an H200 in "
                        "bf16/fp16, else measured here)")
    p.add_argument("--peak-gbps", type=float, metavar="X",
                   help="roofline bandwidth (default: the measured copy bandwidth of an H200, "
                        "else measured here)")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="CPU: seconds of timed calls per row and run (default 1, --quick 0.1)")
    p.add_argument("--min-repeats", "--min-reps", dest="min_reps", type=int, metavar="N",
                   help="CPU: at least this many timed calls per provider and run (default 5, "
                        "--quick 3)")
    p.add_argument("--spread-threshold", type=float, metavar="X",
                   help="a run in which a row's p80/p20 exceeds X is timed again (default "
                        f"{SPREAD_THRESHOLD['cpu']:g} on CPU, {SPREAD_THRESHOLD['cuda']:g} on "
                        "CUDA); so is one in which a grouped provider beats nn.Linear by more "
                        "than the roofline allows")
    p.add_argument("--max-repeats", type=int, metavar="N",
                   help=f"time an unstable row's providers again at most N times (default "
                        f"{MAX_REPEATS}, --quick {QUICK_MAX_REPEATS}; 0: never); rows still "
                        "unstable are marked UNSTABLE")
    p.add_argument("--max-time", type=float, metavar="S",
                   help="no repeat that would take a row (all its providers, every run) past S "
                        f"seconds (default {MAX_TIME_S:g}, --quick {QUICK_MAX_TIME_S:g})")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="parity tolerance on the relative error (default: the numerics contract, 1e-5 "
                        "fp32, 1e-2 fp16/bf16, and no worse than 2x the plain PyTorch path)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU: torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random inputs and weights (default 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on stderr (UNSTABLE, PARITY FAILED and ERROR lines are "
                        "still written there)")
    p.add_argument("--list", action="store_true", help="list shapes, providers and modes, then exit")
    return p


def build_model_parser(prog: str = "kphi3-bench model") -> argparse.ArgumentParser:
    """The model benchmark's options (``kphi3-bench model [options]``, ``model_bench.py``)."""
    def sizes(name: str) -> str:
        quick, cuda, cpu = MODEL_DEFAULT_SIZES[name]
        return f"default {cuda} CUDA, {cpu} CPU; --quick {quick}"

    p = argparse.ArgumentParser(
        prog=prog,
        description="Model-level benchmark: tokens/s of a training step and of generate, and "
                    "peak memory, for KPhi-3 on the Triton kernels, KPhi-3 on the torch backend "
                    "and the dense Phi-3 it replaces (same sizes).")
    p.add_argument("--variants", metavar="LIST",
                   help=f"comma-separated (default: {', '.join(MODEL_VARIANTS)}; compiled: the "
                        f"same names + '{MODEL_COMPILED}')")
    p.add_argument("--compile", action="store_true",
                   help="also run each chosen variant compiled (torch.compile of the whole model, "
                        "fullgraph; generate with the static cache through transformers' compile path)")
    p.add_argument("--compile-backend", default="inductor", metavar="NAME",
                   help="torch.compile backend of the compiled rows (default inductor)")
    p.add_argument("--family", default="kphi3", metavar="NAME",
                   help=f"model sizes: {', '.join(FAMILY_NAMES)} (default kphi3: the "
                        "released 1280/5120, 20 heads)")
    p.add_argument("--layers", type=int, metavar="N",
                   help=f"decoder layers (default {MODEL_DEFAULT_SIZES['layers'][2]}, as released)")
    p.add_argument("--batch", type=int, metavar="N", help=f"training batch ({sizes('batch')})")
    p.add_argument("--seq", type=int, metavar="N",
                   help=f"training sequence length ({sizes('seq')})")
    p.add_argument("--gen-batch", type=int, default=1, metavar="N",
                   help="generate batch (default 1)")
    p.add_argument("--prompt", type=int, metavar="N", help=f"prompt tokens ({sizes('prompt')})")
    p.add_argument("--new-tokens", type=int, metavar="N",
                   help=f"generated tokens ({sizes('new_tokens')})")
    p.add_argument("--steps", type=int, metavar="N",
                   help=f"timed training steps ({sizes('steps')}); generate runs half as many")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--out", metavar="FILE.json", help="write the results as JSON")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the weights and the token ids (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def build_plot_parser(prog: str = "kphi3-bench plot") -> argparse.ArgumentParser:
    """``kphi3-bench plot FILE.json --out DIR``: the plots of a saved sweep, without re-running it."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Plot a saved sweep (a JSON file written by `kphi3-bench --out`) again: one "
                    "PNG per shape, median time against M, a panel per mode, a line per provider.")
    p.add_argument("json", metavar="FILE.json", help="the results file of a layer sweep")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the PNG files")
    return p


# Every command's parser, by how it is invoked (the tests check that each option has a help text).
def build_ledger_parser(prog: str = "kphi3-bench ledger") -> argparse.ArgumentParser:
    from . import ledger  # torch-free until its main() runs

    return ledger.build_parser(prog)


def build_model_ledger_parser(prog: str = "kphi3-bench ledger --model"
                              ) -> argparse.ArgumentParser:
    from . import model_ledger  # torch-free until its main() runs

    return model_ledger.build_parser(prog)


COMMANDS = {"kphi3-bench": build_parser, "kphi3-bench model": build_model_parser,
            "kphi3-bench plot": build_plot_parser, "kphi3-bench ledger": build_ledger_parser,
            "kphi3-bench ledger --model": build_model_ledger_parser}


def _positive_ints(value: str, what: str) -> List[int]:
    out = []
    for item in _split(value):
        try:
            n = int(item)
        except ValueError:
            raise UsageError(f"{what}: {item!r} is not an integer") from None
        if n <= 0:
            raise UsageError(f"{what}: every value must be positive, got {n}")
        out.append(n)
    return list(dict.fromkeys(out))


def _check_writable_file(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"--out {path}: is a directory; give a file name such as results.json")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise UsageError(f"--out {path}: cannot write there ({err.strerror or err})") from None
    if not existed:
        os.remove(path)


def _check_writable_dir(path: str, option: str = "--plot") -> None:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write there ({err.strerror or err})") from None


def resolve_device(name: Optional[str]):
    """The ``torch.device`` to run on; a UsageError when CUDA is asked for and missing."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (torch "
                         f"{torch.__version__}); use --device cpu")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def plan(args: argparse.Namespace) -> dict:
    """Validate every argument before anything runs; a UsageError says which one is wrong."""
    import torch

    from . import providers, shapes
    from .sweep import default_spread_threshold

    device = resolve_device(args.device)
    on_cuda = device.type == "cuda"
    quick = args.quick
    try:
        chosen_shapes = shapes.resolve_shapes(
            _split(args.shapes) if args.shapes else
            (shapes.QUICK_SHAPES if quick else list(shapes.SHAPES)))
        chosen_providers = providers.resolve_providers(
            _split(args.providers) if args.providers else providers.PROVIDER_NAMES)
        modes = [shapes.check_mode(m) for m in _split(args.modes)] if args.modes else \
            list(shapes.QUICK_MODES if quick else shapes.MODES)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.Ms:
        Ms = _positive_ints(args.Ms, "--M")
    elif quick:
        Ms = list(shapes.QUICK_M_CUDA if on_cuda else shapes.QUICK_M_CPU)
    else:
        Ms = list(shapes.DEFAULT_M_CUDA if on_cuda else shapes.DEFAULT_M_CPU)
    for flag in ("peak_tflops", "peak_gbps", "budget_s", "tolerance", "max_time"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for flag, option in (("min_reps", "--min-repeats"), ("threads", "--threads")):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"{option} must be positive, got {value}")
    if args.max_repeats is not None and args.max_repeats < 0:
        raise UsageError(f"--max-repeats must be 0 or more, got {args.max_repeats}")
    if args.spread_threshold is not None and not args.spread_threshold > 1:
        raise UsageError(f"--spread-threshold is a ratio p80/p20 and must exceed 1, got "
                         f"{args.spread_threshold}")
    if args.out:
        _check_writable_file(args.out)
    if args.plot:
        _check_writable_dir(args.plot)
    dtype = shapes.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    return dict(device=device, dtype=dtype, shapes=chosen_shapes, providers=chosen_providers,
                modes=modes, Ms=Ms,
                budget_s=args.budget_s or (0.1 if quick else 1.0),
                min_reps=args.min_reps or (3 if quick else 5),
                spread_threshold=args.spread_threshold or default_spread_threshold(device),
                max_repeats=args.max_repeats if args.max_repeats is not None else
                (QUICK_MAX_REPEATS if quick else MAX_REPEATS),
                max_time_s=args.max_time or (QUICK_MAX_TIME_S if quick else MAX_TIME_S),
                warmup_calls=QUICK_WARMUP_CALLS if quick else None)


def list_choices() -> str:
    from . import providers, shapes

    lines = ["Shapes (name: in->out, G; family):"]
    for s in shapes.SHAPES.values():
        lines.append(f"  {s.name:18s} {s.describe():22s} {shapes.FAMILIES[s.family].description}")
    lines.append("Providers:")
    for p in providers.default_providers().values():
        lines.append(f"  {p.name:14s} {p.description}")
    lines.append(f"Modes: {', '.join(shapes.MODES)}")
    lines.append(f"Dtypes: {', '.join(shapes.DTYPES)}")
    return "\n".join(lines)


def verdict(rows) -> tuple:
    """(exit status, the closing line): 1 when any row failed parity or raised."""
    from . import report

    failed = [r for r in rows if r.failed]
    timed = [r for r in rows if r.timed]
    skipped = [r for r in rows if not r.failed and not r.timed]
    parts = [f"{len(timed)} rows timed"]
    unstable = [r for r in timed if r.unstable]
    if unstable:
        parts.append(f"{len(unstable)} of them UNSTABLE ({report.unstable_kinds(rows)}; their "
                     "speedups are not results)")
    if skipped:
        reasons = sorted({r.status for r in skipped})
        parts.append(f"{len(skipped)} not run ({'; '.join(reasons)})")
    if failed:
        kinds = sorted({r.status for r in failed})
        names = sorted({r.provider for r in failed})
        return 1, (f"FAILED: {len(failed)} rows ({', '.join(kinds)}) from {', '.join(names)}; "
                   + ", ".join(parts) + ".")
    return 0, "OK: every row that ran passed parity; " + ", ".join(parts) + "."


def sweep_meta(cfg, info: dict, roof, command: str, no_memory: bool) -> dict:
    """What the JSON file and the table header say about the run as a whole (``cfg``: the
    ``SweepConfig``, ``roof``: its ``Roofline``)."""
    from . import memory, parity, shapes

    cuda = cfg.device.type == "cuda"
    timing = ("triton.testing.do_bench (CUDA events, L2 flushed), median of ~100 ms of calls" if cuda
              else f"wall clock, median of >= {cfg.min_reps} calls / {cfg.budget_s} s per row")
    warmup = ("one call per provider and input set" if cfg.warmup_calls is None else
              f"at most {cfg.warmup_calls} calls per provider")
    return {
        "command": command,
        "env": info,
        "dtype": shapes.dtype_name(cfg.dtype),
        "roofline": roof.to_dict(),
        "timing": timing + f"; warm-up excluded ({warmup}); inputs rotated over up to "
                           f"{cfg.max_sets} sets sized to exceed the last-level cache",
        "memory": "not measured" if no_memory else (memory.CUDA_METHOD if cuda else memory.CPU_METHOD),
        "stability": stability_meta(cfg),
        "parity": "rel err vs kphi3_kernels.reference.gpc_io in float64, tolerance "
                  f"{cfg.tolerance or parity.tolerance(cfg.dtype):g}",
        "shapes": {s.name: {"in": s.in_features, "out": s.out_features, "groups": s.groups}
                   for s in cfg.shapes},
        "M": list(cfg.Ms),
        "modes": list(cfg.modes),
        "providers": {p.name: p.description for p in cfg.providers},
    }


def stability_meta(cfg) -> dict:
    """How rows were judged stable, for the JSON and the report."""
    from .sweep import default_spread_threshold

    threshold = cfg.spread_threshold or default_spread_threshold(cfg.device)
    return {
        "spread_threshold": threshold,
        "max_repeats": cfg.max_repeats,
        "max_time_s": cfg.max_time_s,
        "rule": (f"a shape, M and mode's providers are timed together; the run is repeated "
                 f"(at most {cfg.max_repeats} times, within {cfg.max_time_s:g} s) while a row's "
                 f"p80/p20 exceeds {threshold:g} or a grouped provider's speedup over nn.Linear "
                 "exceeds nn.Linear's roofline time / its own (about G/2); the first stable run "
                 "is kept, else the least unstable one, its offending rows marked unstable"),
    }


def invoked_as(argv_given: bool) -> str:
    """How this run was started, for the record: ``python -m kphi3_bench.run`` or ``kphi3-bench``."""
    if argv_given or sys.argv[0].endswith(os.path.join("benchmarks", "run.py")):
        return "python -m kphi3_bench.run"
    return os.path.basename(sys.argv[0]) or "kphi3-bench"


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """(the parsed arguments, None), or (None, the exit status) when argparse exited: ``--help``
    (0) or a bad argument (2, the usage and the error already printed)."""
    try:
        return parser.parse_args(list(argv)), None
    except SystemExit as exit_:
        return None, int(exit_.code or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = invoked_as(argv is not None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"]:
        args, status = parse(build_model_parser(f"{prog} model"), argv[1:])
        if args is None:
            return status
        from . import model_bench

        return model_bench.run_model(args, argv[1:], prog=f"{prog} model")
    if argv[:2] == ["ledger", "--model"]:
        from . import model_ledger

        return model_ledger.main(argv[2:], prog=f"{prog} ledger --model")
    if argv[:1] == ["ledger"]:
        from . import ledger

        return ledger.main(argv[1:], prog=f"{prog} ledger")
    if argv[:1] == ["plot"]:
        args, status = parse(build_plot_parser(f"{prog} plot"), argv[1:])
        return status if args is None else plot_main(args)
    parser = build_parser()
    args, status = parse(parser, argv)
    if args is None:
        return status
    if args.list:
        print(list_choices())
        return 0
    try:
        config = plan(args)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"kphi3-bench: error: {err}", file=sys.stderr)
        return 2
    return run_layers(args, config, f"{prog} {shlex.join(argv)}".strip())


def run_layers(args: argparse.Namespace, config: dict, command: str) -> int:
    """The sweep that ``plan`` validated: run it, print the tables, write JSON and plots."""
    import torch

    from . import env, report, roofline
    from .sweep import SweepConfig, run_sweep

    device, dtype = config["device"], config["dtype"]
    if args.threads:
        torch.set_num_threads(args.threads)
    info = env.environment(device)
    if not args.no_progress:
        print("measuring the roofline ...", file=sys.stderr, flush=True)
    roof = roofline.roofline_for(device, dtype, args.peak_tflops, args.peak_gbps, quick=args.quick)
    cfg = SweepConfig(shapes=config["shapes"], Ms=config["Ms"], modes=config["modes"],
                      providers=config["providers"], dtype=dtype, device=device, roofline=roof,
                      env=env.row_env(info),
                      budget_s=config["budget_s"], min_reps=config["min_reps"],
                      spread_threshold=config["spread_threshold"],
                      max_repeats=config["max_repeats"], max_time_s=config["max_time_s"],
                      warmup_calls=config["warmup_calls"],
                      tolerance=args.tolerance, seed=args.seed,
                      measure_memory=not args.no_memory)
    rows = run_sweep(cfg, progress=not args.no_progress)

    meta = sweep_meta(cfg, info, roof, command, args.no_memory)
    print(report.format_report(rows, meta))
    status, closing = verdict(rows)
    try:
        if args.out:
            report.write_json(args.out, rows, meta)
            print(f"wrote {args.out}")
        if args.plot:
            for path in report.write_plots(rows, args.plot):
                print(f"wrote {path}")
    except (OSError, RuntimeError) as err:
        print(f"kphi3-bench: error: could not write the results: {err}", file=sys.stderr)
        status = 1
    print(closing)
    return status


def plot_main(args: argparse.Namespace) -> int:
    """``kphi3-bench plot``: the PNGs of a saved sweep (needs matplotlib, not torch)."""
    import json

    from . import report

    try:
        with open(args.json) as f:
            data = json.load(f)
        if not (isinstance(data, dict) and data.get("schema") == report.JSON_SCHEMA):
            raise ValueError(f"not a layer sweep's results (schema {report.JSON_SCHEMA!r}); "
                             "`kphi3-bench --out FILE.json` writes one")
        rows = report.rows_from_dicts(data["results"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"kphi3-bench plot: error: {args.json}: {err}", file=sys.stderr)
        return 2
    try:
        _check_writable_dir(args.out, "--out")
    except UsageError as err:
        print(f"kphi3-bench plot: error: {err}", file=sys.stderr)
        return 2
    try:
        for path in report.write_plots(rows, args.out):
            print(f"wrote {path}")
    except (OSError, RuntimeError) as err:
        print(f"kphi3-bench plot: error: could not write the plots: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
