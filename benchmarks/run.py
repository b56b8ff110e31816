"""``python -m kphi3_bench.run`` / ``kphi3-bench``: sweep the grouped layers, compare providers.

Examples::

    kphi3-bench --quick                                  # a first try (15-25 s on 2 cores)
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
provider failed parity or raised, 2 for bad arguments (a provider named in ``--providers`` that
cannot run here included), 130 when interrupted. Unstable rows do not change it: they are
noise, not errors, and the closing line counts them.

The parsers and every check that needs no torch live in ``cli.py``, shared by every subcommand;
this module imports neither torch nor the kernels at import time (together they take 10-20 s to
import on a small CPU): ``--help`` and usage errors come at once, and each subcommand imports
what it needs once its arguments are checked. With ``--out``, the JSON file is rewritten after
every timed row (``"complete": false`` until the end): an interrupted run keeps its rows,
``kphi3-bench plot`` plots them and ``--resume`` times only what is missing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence

from . import cli
from .cli import (  # noqa: F401  (re-exported: the names scripts and tests know run.py by)
    COMMANDS, DEFAULT_M_CPU, DEFAULT_M_CUDA, DTYPE_NAMES, FAMILY_NAMES, MAX_REPEATS, MAX_TIME_S,
    MODEL_COMPILED, MODEL_DEFAULT_SIZES, MODEL_VARIANTS, MODES, PROVIDER_NAMES, QUICK_M_CPU,
    QUICK_M_CUDA, QUICK_MAX_REPEATS, QUICK_MAX_TIME_S, QUICK_MODES, QUICK_SHAPES, QUICK_TAKES,
    SPREAD_THRESHOLD, UsageError, build_ledger_parser, build_model_ledger_parser,
    build_model_parser, build_parser, build_plot_parser, parse, resolve_device)

_split, _positive_ints, _check_writable_dir = cli.split_list, cli.positive_ints, cli.check_writable_dir


def plan(args: argparse.Namespace) -> dict:
    """Resolve the arguments that ``cli.check_sweep_args`` checked into what the sweep runs
    (this imports torch); a UsageError when a provider named in --providers cannot run here."""
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
    dtype = shapes.DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    if args.providers:
        refuse_unavailable(chosen_providers, device, dtype)
    return dict(device=device, dtype=dtype, shapes=chosen_shapes, providers=chosen_providers,
                modes=modes, Ms=Ms,
                budget_s=args.budget_s or (0.1 if quick else 1.0),
                min_reps=args.min_reps or (3 if quick else 5),
                spread_threshold=args.spread_threshold or default_spread_threshold(device),
                max_repeats=args.max_repeats if args.max_repeats is not None else
                (QUICK_MAX_REPEATS if quick else MAX_REPEATS),
                max_time_s=args.max_time or (QUICK_MAX_TIME_S if quick else MAX_TIME_S),
                warmup_calls=None)


def refuse_unavailable(chosen, device, dtype) -> None:
    """A provider asked for by name that cannot run on this device is an error, not a silent
    "0 rows timed": say which and why."""
    cannot = [(p.name, p.unavailable(device, dtype)) for p in chosen]
    cannot = [(name, why) for name, why in cannot if why is not None]
    if cannot:
        reasons = "; ".join(f"{name}: {why}" for name, why in cannot)
        raise UsageError(f"--providers: cannot run on {device.type} here ({reasons}); leave "
                         "them out, or run on a machine that has what they need")


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
                 f"(at most {cfg.max_repeats} times, within {cfg.max_time_s:g} s, each repeat "
                 f"with twice the calls of the run before) while a row's p80/p20 exceeds "
                 f"{threshold:g} or a grouped provider's speedup over nn.Linear "
                 "exceeds nn.Linear's roofline time / its own (about G/2"
                 + ("" if cfg.device.type == "cuda" else "; 1.5x that on a CPU, whose nn.Linear "
                    "runs below its roofline at small M") + "); the first stable run "
                 "is kept, else the least unstable one, its offending rows marked unstable"),
    }


def invoked_as(argv_given: bool) -> str:
    """How this run was started, for the record: ``python -m kphi3_bench.run`` or ``kphi3-bench``."""
    if argv_given or sys.argv[0].endswith(os.path.join("benchmarks", "run.py")):
        return "python -m kphi3_bench.run"
    return os.path.basename(sys.argv[0]) or "kphi3-bench"


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = invoked_as(argv is not None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"]:
        parser = build_model_parser(f"{prog} model")
        args, status = parse(parser, argv[1:])
        if args is None:
            return status
        try:
            cli.check_model_args(args)  # before torch and transformers are imported
        except UsageError as err:
            return cli.usage_error(parser, err)
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
    parser = build_parser(prog)
    args, status = parse(parser, argv)
    if args is None:
        return status
    if args.list:
        print(list_choices())
        return 0
    try:
        cli.check_sweep_args(args)  # before torch: a typo costs no import time
        config = plan(args)
    except UsageError as err:
        return cli.usage_error(parser, err)
    return run_layers(args, config, f"{prog} {shlex.join(argv)}".strip())


def resumed_rows(args: argparse.Namespace) -> list:
    """The rows of ``--out`` that ``--resume`` keeps (none when the file is not there yet)."""
    from . import report

    if not (args.resume and os.path.isfile(args.out)):
        return []
    return report.rows_from_dicts(report.load_rows(args.out))


def run_layers(args: argparse.Namespace, config: dict, command: str) -> int:
    """The sweep that ``plan`` resolved: run it, print the summary (and the tables with
    ``--table``), write JSON and plots. ``--out`` is rewritten after every timed row, so that
    an interrupted run (Ctrl-C) keeps what it measured."""
    import torch

    from . import env, report, roofline
    from .sweep import SweepConfig, done_points, run_sweep

    device, dtype = config["device"], config["dtype"]
    if args.threads:
        torch.set_num_threads(args.threads)
    info = env.environment(device)
    previous = resumed_rows(args)
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
                      measure_memory=not args.no_memory, done=done_points(previous))
    meta = sweep_meta(cfg, info, roof, command, args.no_memory)
    if args.out:
        cfg.on_rows = lambda rows: report.write_json(args.out, previous + list(rows), meta,
                                                     complete=False)
    try:
        rows = previous + run_sweep(cfg, progress=not args.no_progress)
    except KeyboardInterrupt:
        return interrupted(args, command)

    print(report.format_summary_report(rows, meta, tables=args.table))
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
    print("\n".join(report.wrap_lines([closing])))
    return status


def interrupted(args: argparse.Namespace, command: str) -> int:
    """Ctrl-C: say what was kept and how to go on; exit status 130 (the shell's for SIGINT)."""
    if not args.out:
        print("kphi3-bench: interrupted; nothing kept (give --out FILE.json to keep the rows of "
              "a long run as they finish)", file=sys.stderr)
        return 130
    resume = command if "--resume" in command.split() else f"{command} --resume"
    print(f"kphi3-bench: interrupted; the rows timed so far are in {args.out}. Plot them with "
          f"`kphi3-bench plot {args.out} --out DIR`; time the rest with `{resume}`",
          file=sys.stderr)
    return 130


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
