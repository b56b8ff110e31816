"""The command line of every ``kphi3-bench`` subcommand: the parsers, the shared option names and
the checks that need no torch.

Every subcommand (``kphi3-bench``, ``model``, ``plot``, ``ledger``, ``ledger --model``) builds its
parser here and spells one idea one way: ``--M`` (token counts), ``--dtype``, ``--out`` (the
results file), ``--quick``, ``--no-progress``. Older spellings (``--m``, ``--json``, ``--dtypes``,
``--tokens`` of the sweep) stay as hidden aliases, so that the commands recorded with committed
results still run.

This module imports neither torch nor the kernels (together they take 10-20 s to import on a small
CPU): ``--help`` and every usage error come at once, before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Iterable, List, Optional, Sequence


class UsageError(ValueError):
    """A bad command-line argument; the command prints it and exits with status 2."""


# What the help texts quote, written out so that `--help` needs no torch. tests/test_benchmarks.py
# checks that these copies match shapes.py, providers.py, sweep.py and model_bench.py.
FAMILY_NAMES = ("kphi3", "phi3-mini")
PROJECTIONS = ("qkv", "o", "gate_up", "down")
SHAPE_NAMES = tuple(f"{f}-{p}" for f in FAMILY_NAMES for p in PROJECTIONS)
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
GPU_ONLY_VARIANTS = ("kphi3-triton", "kphi3-fused")

# Re-timing of unstable rows: how often and for how long (a row = one shape, M and mode, all its
# providers together). A retry makes twice the calls of the run before; --quick allows one, the
# full sweep at least one for a row whose first run took up to 10 s.
MAX_REPEATS, QUICK_MAX_REPEATS = 3, 1
MAX_TIME_S, QUICK_MAX_TIME_S = 30.0, 4.0

# The model benchmark's sizes when not given: (--quick, CUDA, CPU).
MODEL_DEFAULT_SIZES = {"layers": (2, 2, 2), "batch": (1, 8, 2), "seq": (64, 1024, 256),
                       "prompt": (8, 128, 32), "new_tokens": (8, 128, 32), "steps": (2, 10, 4)}

# The ledgers' grids (ledger.py reads them from here, for the ops and for --model).
LEDGER_OPS = ("grouped_linear", "gpc_io", "gpc_block", "interleave")
LEDGER_MODES = ("fwd", "bwd")
LEDGER_DEFAULT_M = (1, 16, 2048, 8192)
LEDGER_QUICK_M = (16, 8192)
LEDGER_DEFAULT_SHAPES = ("kphi3", "phi3-mini")
LEDGER_DEFAULT_DTYPES = ("bf16", "fp16")
LAUNCH_OVERHEAD_US = 2.0
MODEL_LEDGER_FAMILIES = ("kphi3", "phi3-mini")
MODEL_LEDGER_TOKENS, MODEL_LEDGER_BATCH, MODEL_LEDGER_CACHE = 8192, 4, 2048
MODEL_LEDGER_DECODE_BATCHES = (1, 16)

# How long --quick takes on a 2-core CPU: `time kphi3-bench --quick` took 24 s with a cold
# torch.compile cache and 13 s with a warm one (2026-12-07; the README has every command's time).
QUICK_TAKES = "15-25 s on a 2-core CPU"


# ----------------------------------------------------------------------------------------------
# Small helpers every command shares
# ----------------------------------------------------------------------------------------------


def split_list(value: str) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise UsageError(f"expected a comma-separated list, got {value!r}")
    return items


def csv(values: Iterable) -> str:
    return ",".join(map(str, values))


def positive_ints(value: str, what: str) -> List[int]:
    out = []
    for item in split_list(value):
        try:
            n = int(item)
        except ValueError:
            raise UsageError(f"{what}: {item!r} is not an integer") from None
        if n <= 0:
            raise UsageError(f"{what}: every value must be positive, got {n}")
        out.append(n)
    return list(dict.fromkeys(out))


def check_choices(values: Sequence[str], known: Sequence[str], what: str,
                  case_insensitive: bool = False) -> List[str]:
    """``values`` when each is one of ``known``; a UsageError naming the first that is not."""
    by_key = {(k.lower() if case_insensitive else k): k for k in known}
    chosen = []
    for v in values:
        key = v.lower() if case_insensitive else v
        if key not in by_key:
            raise UsageError(f"unknown {what} {v!r}; known {what}s: {', '.join(known)}")
        chosen.append(by_key[key])
    return list(dict.fromkeys(chosen))


def check_shape_names(values: Sequence[str]) -> None:
    """Shape or family names (the same check as ``shapes.resolve_shapes``, without torch)."""
    for v in values:
        if v not in SHAPE_NAMES and v not in FAMILY_NAMES:
            raise UsageError(f"unknown shape {v!r}; known shapes: {', '.join(SHAPE_NAMES)}; "
                             f"families: {', '.join(FAMILY_NAMES)}")


def check_writable_file(path: str, option: str = "--out") -> None:
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory; give a file name such as "
                         "results.json")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    if not existed:
        os.remove(path)


def check_writable_dir(path: str, option: str = "--plot") -> None:
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


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """(the parsed arguments, None), or (None, the exit status) when argparse exited: ``--help``
    (0) or a bad argument (2, the usage and the error already printed)."""
    try:
        return parser.parse_args(list(argv)), None
    except SystemExit as exit_:
        return None, int(exit_.code or 0)


def usage_error(parser: argparse.ArgumentParser, err: Exception) -> int:
    """Print the usage and ``err`` the way argparse does; the exit status 2."""
    import sys

    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {err}", file=sys.stderr)
    return 2


def hidden_alias(parser: argparse.ArgumentParser, old: str, dest: str, **kwargs) -> None:
    """An old spelling of an option that still works but is not shown in ``--help``."""
    parser.add_argument(old, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS,
                        **kwargs)


# ----------------------------------------------------------------------------------------------
# The options shared by several commands: one spelling, one help text
# ----------------------------------------------------------------------------------------------


def add_out(parser: argparse.ArgumentParser, what: str, dest: str = "out") -> None:
    parser.add_argument("--out", dest=dest, metavar="FILE.json",
                        help=f"write {what} as JSON, rewritten as each row finishes (an "
                             "interrupted run keeps what it measured)")
    hidden_alias(parser, "--json", dest)


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr (UNSTABLE, PARITY FAILED and ERROR lines "
                             "are still written there)")


# ----------------------------------------------------------------------------------------------
# kphi3-bench: the layer sweep
# ----------------------------------------------------------------------------------------------


def build_parser(prog: str = "kphi3-bench") -> argparse.ArgumentParser:
    """The sweep's options (``kphi3-bench [options]``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark KPhi-3's grouped layers (the IO block) against nn.Linear and the "
                    "PyTorch paths, with a parity check before every timing. Four more commands: "
                    "`kphi3-bench model --help` (the model-level benchmark), "
                    "`kphi3-bench plot --help` (plot a saved sweep again), "
                    "`kphi3-bench ledger --help` (the predicted H200 cost of every launch) and "
                    "`kphi3-bench ledger --model --help` (the predicted cost of one decoder "
                    "layer).",
        epilog="exit status: 0 when every row that ran passed parity and raised nothing, 1 when a "
               "provider failed parity or raised, 2 for bad arguments (a provider named in "
               "--providers that cannot run here included), 130 when interrupted",
    )
    p.add_argument("--shapes", metavar="LIST",
                   help="comma-separated shape or family names (default: all; families: "
                        f"{', '.join(FAMILY_NAMES)}; see --list)")
    p.add_argument("--M", dest="Ms", metavar="LIST",
                   help=f"comma-separated token counts (default: {csv(DEFAULT_M_CUDA)} on "
                        f"CUDA, {csv(DEFAULT_M_CPU)} on CPU)")
    hidden_alias(p, "--m", "Ms")
    hidden_alias(p, "--tokens", "Ms")
    p.add_argument("--providers", metavar="LIST",
                   help=f"comma-separated providers (default: all: {csv(PROVIDER_NAMES)}); one "
                        "named here that cannot run on this device is an error")
    p.add_argument("--modes", metavar="LIST",
                   help=f"comma-separated modes (default: all: {csv(MODES)})")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true",
                   help=f"a reduced sweep ({csv(QUICK_SHAPES)}; M {csv(QUICK_M_CPU)} on CPU, "
                        f"{csv(QUICK_M_CUDA)} on CUDA; {csv(QUICK_MODES)}; shorter timings) "
                        f"that takes {QUICK_TAKES}")
    add_out(p, "every row (times, spreads, roofline, parity, environment)")
    p.add_argument("--resume", action="store_true",
                   help="with --out: keep the rows already in that file and time only the "
                        "shapes, M and modes it lacks (continues an interrupted run)")
    p.add_argument("--plot", metavar="DIR",
                   help="write PNG plots (speed-up over nn.Linear against M, one per family)")
    p.add_argument("--table", action="store_true",
                   help="also print the full tables (every provider's time, spread, TFLOP/s, "
                        "roofline fraction, memory, parity) after the summary")
    p.add_argument("--peak-tflops", type=float, metavar="X",
                   help="roofline compute peak (default: the measured peak of an H200 in "
                        "bf16/fp16, else measured here)")
    p.add_argument("--peak-gbps", type=float, metavar="X",
                   help="roofline bandwidth (default: the measured copy bandwidth of an H200, "
                        "else measured here)")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="CPU: seconds of timed calls per row and run (default 1, --quick 0.1)")
    p.add_argument("--min-repeats", dest="min_reps", type=int, metavar="N",
                   help="CPU: at least this many timed calls per provider and run (default 5, "
                        "--quick 3)")
    hidden_alias(p, "--min-reps", "min_reps", type=int)
    p.add_argument("--spread-threshold", type=float, metavar="X",
                   help="a run in which a row's p80/p20 exceeds X is timed again, with twice "
                        f"the calls (default {SPREAD_THRESHOLD['cpu']:g} on CPU, "
                        f"{SPREAD_THRESHOLD['cuda']:g} on CUDA); so is one in which a grouped "
                        "provider beats nn.Linear by more than the roofline allows")
    p.add_argument("--max-repeats", type=int, metavar="N",
                   help=f"time an unstable row's providers again at most N times (default "
                        f"{MAX_REPEATS}, --quick {QUICK_MAX_REPEATS}; 0: never); rows still "
                        "unstable are marked UNSTABLE")
    p.add_argument("--max-time", type=float, metavar="S",
                   help="no repeat that would take a row (all its providers, every run) past S "
                        f"seconds (default {MAX_TIME_S:g}, --quick {QUICK_MAX_TIME_S:g})")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="parity tolerance on the relative error (default: the numerics contract, "
                        "1e-5 fp32, 1e-2 fp16/bf16, and no worse than 2x the plain PyTorch path)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU: torch.set_num_threads (default: torch's choice, one per core)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the random inputs and weights (default 0)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    add_progress(p)
    p.add_argument("--list", action="store_true", help="list shapes, providers and modes, then exit")
    return p


def check_sweep_args(args: argparse.Namespace) -> None:
    """Every check of the sweep's arguments that needs no torch (names, numbers, paths)."""
    if args.shapes:
        check_shape_names(split_list(args.shapes))
    if args.providers:
        check_choices(split_list(args.providers), PROVIDER_NAMES, "provider",
                      case_insensitive=True)
    if args.modes:
        check_choices(split_list(args.modes), MODES, "mode")
    if args.Ms:
        positive_ints(args.Ms, "--M")
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
    if args.resume and not args.out:
        raise UsageError("--resume continues the file given with --out; give --out FILE.json")
    if args.out and not (args.resume and os.path.isfile(args.out)):
        check_writable_file(args.out)
    if args.plot:
        check_writable_dir(args.plot)
    if args.device == "cuda":
        resolve_device("cuda")


# ----------------------------------------------------------------------------------------------
# kphi3-bench model
# ----------------------------------------------------------------------------------------------


def build_model_parser(prog: str = "kphi3-bench model") -> argparse.ArgumentParser:
    """The model benchmark's options (``kphi3-bench model [options]``, ``model_bench.py``)."""
    def sizes(name: str) -> str:
        quick, cuda, cpu = MODEL_DEFAULT_SIZES[name]
        return f"default {cuda} CUDA, {cpu} CPU; --quick {quick}"

    p = argparse.ArgumentParser(
        prog=prog,
        description="Model-level benchmark: tokens/s of a training step and of generate, and "
                    "peak memory, for KPhi-3 on the Triton kernels, KPhi-3 on the torch backend "
                    "and the dense Phi-3 it replaces (same sizes).",
        epilog="exit status: 0 when every row that ran passed its checks, 1 when one failed, 2 "
               "for bad arguments (a GPU-only variant named in --variants on a CPU included), "
               "130 when interrupted")
    p.add_argument("--variants", metavar="LIST",
                   help=f"comma-separated (default: {', '.join(MODEL_VARIANTS)}; compiled: the "
                        f"same names + '{MODEL_COMPILED}')")
    p.add_argument("--compile", action="store_true",
                   help="also run each chosen variant compiled (torch.compile of the whole model, "
                        "fullgraph; generate with the static cache through transformers' compile "
                        "path)")
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
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes (a CPU smoke test of every variant that runs here)")
    add_out(p, "every row (tokens/s, times, memory, parity, environment)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the weights and the token ids (default 0)")
    add_progress(p)
    return p


def model_variants(args: argparse.Namespace) -> List[str]:
    """The variants to run, compiled ones added by ``--compile``; a UsageError for unknown ones."""
    known = MODEL_VARIANTS + tuple(v + MODEL_COMPILED for v in MODEL_VARIANTS)
    variants = split_list(args.variants) if args.variants else list(MODEL_VARIANTS)
    for v in variants:
        if v not in known:
            raise UsageError(f"unknown variant {v!r}; known variants: {', '.join(known)}")
    if args.compile:
        variants += [v + MODEL_COMPILED for v in variants
                     if not v.endswith(MODEL_COMPILED) and v + MODEL_COMPILED not in variants]
    return variants


def check_model_args(args: argparse.Namespace, families: Sequence[str] = FAMILY_NAMES
                     ) -> List[str]:
    """The torch-free checks of ``kphi3-bench model``; returns the variants to run."""
    variants = model_variants(args)
    if args.family not in families:
        raise UsageError(f"unknown family {args.family!r}; known families: "
                         f"{', '.join(families)}")
    for name in ("layers", "batch", "seq", "gen_batch", "prompt", "new_tokens", "steps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.out:
        check_writable_file(args.out)
    return variants


def refuse_gpu_only(variants: Sequence[str], named: bool, on_cuda: bool) -> None:
    """A GPU-only variant named on the command line cannot run on a CPU: say so (exit 2)."""
    if named and not on_cuda:
        gpu_only = [v for v in variants if v.split("+")[0] in GPU_ONLY_VARIANTS]
        if gpu_only:
            raise UsageError(f"--variants {', '.join(gpu_only)}: needs a CUDA GPU (the Triton "
                             "kernels); on this CPU run kphi3-torch and phi3-dense")


# ----------------------------------------------------------------------------------------------
# kphi3-bench plot
# ----------------------------------------------------------------------------------------------


def build_plot_parser(prog: str = "kphi3-bench plot") -> argparse.ArgumentParser:
    """``kphi3-bench plot FILE.json --out DIR``: the plots of a saved sweep, without re-running it."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Plot a saved sweep (a JSON file written by `kphi3-bench --out`, complete or "
                    "interrupted) again: one PNG per shape family, the speed-up over nn.Linear "
                    "against M, a panel per shape and mode, a line per provider.")
    p.add_argument("json", metavar="FILE.json", help="the results file of a layer sweep")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the PNG files")
    return p


# ----------------------------------------------------------------------------------------------
# kphi3-bench ledger [--model] (python -m kphi3_bench.ledger [--model])
# ----------------------------------------------------------------------------------------------


def _add_ledger_common(parser: argparse.ArgumentParser, what: str, markdown: str = "") -> None:
    """The options both ledgers share: the IO forward design, the cost model and the outputs."""
    parser.add_argument("--io-forward", choices=("auto", "split", "fused"), default="auto",
                        help="the IO block's forward design recorded for the Triton path "
                             "(triton_impl.IO_FORWARD; default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="compute ceiling in TFLOP/s (default: the H200 bf16 figure of "
                             "kphi3_bench.roofline, 790)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="memory ceiling in GB/s, read + write (default: the H200 copy figure "
                             "of kphi3_bench.roofline, 4300)")
    parser.add_argument("--launch-overhead-us", type=float, default=LAUNCH_OVERHEAD_US,
                        help="fixed cost added to every launch, in us (default: %(default)s)")
    parser.add_argument("--out", dest="json", metavar="FILE.json",
                        help=f"write {what} as JSON (--json, its former name, still works)")
    hidden_alias(parser, "--json", "json")
    parser.add_argument("--markdown", metavar="PATH",
                        help=f"write the generated markdown section{markdown} to PATH")
    parser.add_argument("--quiet", action="store_true", help="do not print the tables")


def _check_ledger_common(args: argparse.Namespace, files: Sequence[str] = ()) -> None:
    for flag in ("peak_tflops", "peak_gbps"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    for dest in ("json", "markdown") + tuple(files):
        path = getattr(args, dest)
        if path:
            check_writable_file(path, "--out" if dest == "json" else
                                f"--{dest.replace('_', '-')}")


def build_ledger_parser(prog: str = "kphi3-bench ledger") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=("The launch ledger: predicted H200 time of every launch of the Triton path, "
                     "the plain reference and nn.Linear, from FLOP and byte counts (nothing is "
                     "run or timed). Prints a summary per op and for the layer; --detail prints "
                     "every row and launch."))
    parser.add_argument("--model", action="store_true",
                        help="the model-level ledger instead: one decoder layer, dense Phi-3 "
                             "against KPhi-3 (its own options: --model --help)")
    parser.add_argument("--shapes", default=csv(LEDGER_DEFAULT_SHAPES),
                        help="comma-separated shape or family names of kphi3_bench.shapes "
                             "(default: %(default)s)")
    parser.add_argument("--ops", default=csv(LEDGER_OPS),
                        help="comma-separated ops (default: %(default)s)")
    parser.add_argument("--M", dest="m", default=None, metavar="LIST",
                        help=f"comma-separated token counts (default: {csv(LEDGER_DEFAULT_M)}; "
                             f"--quick {csv(LEDGER_QUICK_M)})")
    hidden_alias(parser, "--m", "m")
    parser.add_argument("--modes", default=csv(LEDGER_MODES),
                        help="fwd, bwd (the backward alone) or both (default: %(default)s)")
    parser.add_argument("--dtype", dest="dtypes", default=csv(LEDGER_DEFAULT_DTYPES),
                        metavar="LIST",
                        help="comma-separated dtypes: bf16, fp16, fp32 (default: %(default)s; "
                             "rows equal in every dtype are printed once; the default ceilings "
                             "are bf16's, give --peak-tflops for fp32)")
    hidden_alias(parser, "--dtypes", "dtypes")
    parser.add_argument("--quick", action="store_true",
                        help=f"M {csv(LEDGER_QUICK_M)} only (a decode and a training size)")
    parser.add_argument("--detail", action="store_true",
                        help="after the summary, every row and every launch of its Triton path")
    parser.add_argument("--triton-only", action="store_true",
                        help="count the Triton path and the floor only (skip reference and dense; "
                             "enough for the budget, and faster)")
    _add_ledger_common(parser, "every row, launch by launch (rewritten as rows are counted, so "
                               "an interrupted run keeps them)",
                       " (bf16 rows, or the first dtype's without bf16)")
    parser.add_argument("--write-budget", metavar="PATH",
                        help="write the Triton path's launches and bytes of every row as the "
                             "budget file PATH (e.g. benchmarks/results/ledger-budget.json)")
    parser.add_argument("--check-budget", metavar="PATH",
                        help="compare the Triton path with the budget file PATH on the budget's "
                             "own grid; exit 1 listing every row over budget")
    return parser


def check_ledger_args(args: argparse.Namespace) -> List[int]:
    """The torch-free checks of ``kphi3-bench ledger``; returns the token counts."""
    check_shape_names(split_list(args.shapes))
    check_choices(split_list(args.ops), LEDGER_OPS, "op")
    check_choices(split_list(args.modes), LEDGER_MODES, "mode")
    check_choices(split_list(args.dtypes), DTYPE_NAMES, "dtype")
    default = LEDGER_QUICK_M if args.quick else LEDGER_DEFAULT_M
    ms = positive_ints(args.m, "--M") if args.m else list(default)
    _check_ledger_common(args, ("write_budget",))
    if args.check_budget and not os.path.isfile(args.check_budget):
        raise UsageError(f"--check-budget {args.check_budget}: no such file")
    return ms


def build_model_ledger_parser(prog: str = "kphi3-bench ledger --model"
                              ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=("The model-level ledger: predicted H200 time of one decoder layer's "
                     "training step (forward + backward) and decode step for dense Phi-3, KPhi-3 "
                     "with the PyTorch reference and KPhi-3 with the op-level Triton kernels. "
                     "These are predictions from FLOP and byte counts, not measurements: nothing "
                     "is run or timed."))
    parser.add_argument("--families", default=csv(MODEL_LEDGER_FAMILIES),
                        help=f"comma-separated configs: {', '.join(FAMILY_NAMES)} "
                             "(default: %(default)s)")
    parser.add_argument("--M", "--tokens", dest="tokens", type=int, default=MODEL_LEDGER_TOKENS,
                        metavar="N",
                        help="training tokens per step, batch x seq (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=MODEL_LEDGER_BATCH,
                        help="training sequences per step; seq = tokens / batch "
                             "(default: %(default)s)")
    parser.add_argument("--decode-batches", default=csv(MODEL_LEDGER_DECODE_BATCHES),
                        help="comma-separated decode batch sizes, one new token each "
                             "(default: %(default)s)")
    parser.add_argument("--cache", type=int, default=MODEL_LEDGER_CACHE,
                        help="static KV cache length attended by a decode step "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16",
                        help="(default: %(default)s; the default ceilings are bf16's)")
    _add_ledger_common(parser, "the full result")
    return parser


def check_model_ledger_args(args: argparse.Namespace) -> List[int]:
    """The torch-free checks of ``kphi3-bench ledger --model``; returns the decode batches."""
    check_choices(split_list(args.families), MODEL_LEDGER_FAMILIES, "family")
    batches = positive_ints(args.decode_batches, "--decode-batches")
    if args.tokens <= 0 or args.batch <= 0 or args.cache <= 0 or args.tokens % args.batch:
        raise UsageError("--M (tokens), --batch and --cache must be positive, and the tokens a "
                         "multiple of the batch")
    _check_ledger_common(args)
    return batches


# Every command's parser, by how it is invoked (the tests check that each option has a help text).
COMMANDS = {"kphi3-bench": build_parser, "kphi3-bench model": build_model_parser,
            "kphi3-bench plot": build_plot_parser, "kphi3-bench ledger": build_ledger_parser,
            "kphi3-bench ledger --model": build_model_ledger_parser}
