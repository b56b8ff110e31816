"""The benchmark suite's command line as a user meets it: one family of options, usage errors
before the heavy imports, numbers for people, the summary printed first, results kept when a run
is interrupted, the ledger's summary, and plots checked by their layout (ticks, labels, legend and
notes that do not overlap), not only by their existence.

Nothing here times anything for real: the sweeps run on a tiny shape with a fake timer.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from kphi3_bench import cli, ledger, model_bench, providers, report, roofline, run, shapes, timing
from kphi3_bench.shapes import Shape
from kphi3_bench.sweep import SweepConfig, run_sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = Shape("tiny-io", "tiny", "io", 64, 128, 16)  # G = 4
CPU = torch.device("cpu")
HEAVY = ("torch", "transformers", "matplotlib", "triton", "kphi3_kernels", "kphi3_model")


class FakeTimer:
    """Calls nothing: every provider gets ``times[name]`` = (median, p20, p80) in ms. After
    ``interrupt_after`` runs it raises KeyboardInterrupt, as Ctrl-C would."""

    def __init__(self, times, interrupt_after=None):
        self.times, self.interrupt_after, self.runs = times, interrupt_after, 0

    def __call__(self, fns, device, grad_to_none, budget_s, min_reps, **_):
        if self.interrupt_after is not None and self.runs >= self.interrupt_after:
            raise KeyboardInterrupt
        self.runs += 1
        return {name: timing.Timing(*self.times.get(name, (5.0, 4.9, 5.1)), reps=min_reps,
                                    method="fake") for name in fns}


# Under the roofline's bound on the speed-up at every M of these tests (1.25x at M = 64).
STEADY = {"nn.Linear": (9.3, 9.2, 9.4), "reference": (7.8, 7.7, 7.9), "torch": (8.0, 7.9, 8.1)}
NOISY_LINEAR = dict(STEADY, **{"nn.Linear": (3.0, 0.9, 6.2)})


def _rows(times=STEADY, Ms=(5, 64), modes=("fwd", "fwd+bwd"), with_triton=True, **kwargs):
    chosen = [providers.LinearProvider(), providers.ReferenceProvider(),
              providers.TorchBackendProvider()]
    if with_triton:
        chosen.append(providers.TritonProvider())  # "needs a GPU" on a CPU
    cfg = SweepConfig(shapes=[TINY], Ms=list(Ms), modes=list(modes), providers=chosen,
                      dtype=torch.float32, device=CPU,
                      roofline=roofline.Roofline(1.0, 10.0, "test", "test"), budget_s=0.0,
                      min_reps=2, measure_memory=False, timer=FakeTimer(times), **kwargs)
    rows = run_sweep(cfg, progress=False)
    for r in rows:
        r.env = {"device_name": "CPU (test)"}
    return rows


def _meta():
    return {"env": {"device_name": "cpu", "torch": "t", "triton": "t", "transformers": "t",
                    "date": "d"}, "dtype": "fp32", "timing": "t", "memory": "m",
            "roofline": roofline.Roofline(1.0, 10.0, "test", "test").to_dict()}


# --- one family of options ----------------------------------------------------------------------

def _option_strings(parser):
    return {s for a in parser._actions for s in a.option_strings}


def _visible(parser):
    return {s for a in parser._actions if a.help != "==SUPPRESS==" for s in a.option_strings}


def test_the_same_idea_has_the_same_option_name_in_every_command():
    sweep, model = cli.build_parser(), cli.build_model_parser()
    ledger_, model_ledger = cli.build_ledger_parser(), cli.build_model_ledger_parser()
    for parser in (sweep, ledger_, model_ledger):
        assert {"--M", "--out", "--dtype"} <= _visible(parser), parser.prog
    assert {"--out", "--dtype", "--quick", "--no-progress"} <= _visible(model)
    assert "--quick" in _visible(ledger_) and "--quick" in _visible(sweep)
    # The old spellings still parse, to the same place, and are not advertised.
    assert cli.build_parser().parse_args(["--m", "7", "--json", "a.json"]).Ms == "7"
    assert cli.build_parser().parse_args(["--json", "a.json"]).out == "a.json"
    assert cli.build_parser().parse_args(["--min-reps", "4"]).min_reps == 4
    args = ledger_.parse_args(["--m", "16", "--json", "l.json", "--dtypes", "fp32"])
    assert (args.m, args.json, args.dtypes) == ("16", "l.json", "fp32")
    assert model_ledger.parse_args(["--json", "m.json"]).json == "m.json"
    assert model.parse_args(["--json", "m.json"]).out == "m.json"
    for parser in (sweep, ledger_, model_ledger, model):
        hidden = _option_strings(parser) - _visible(parser)
        assert hidden <= {"--m", "--json", "--dtypes", "--tokens", "--min-reps"}
        assert not any(h in parser.format_help().split() for h in hidden)


def test_committed_results_commands_still_parse():
    for path in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        data = json.loads(path.read_text())
        command = (data.get("meta") or {}).get("command", "") if isinstance(data, dict) else ""
        for prefix, build in (("python -m kphi3_bench.run ", cli.build_parser),
                              ("python -m kphi3_bench.model_bench ", cli.build_model_parser)):
            if command.startswith(prefix):
                build().parse_args(command[len(prefix):].split())


@pytest.mark.parametrize("argv,needle", [
    (["--shapes", "nope"], "unknown shape 'nope'"),
    (["--M", "0"], "must be positive"),
    (["--providers", "magic"], "unknown provider 'magic'"),
    (["--resume"], "--resume continues the file given with --out"),
    (["model", "--variants", "nope"], "unknown variant 'nope'"),
    (["model", "--steps", "0"], "--steps must be positive"),
    (["ledger", "--M", "0"], "must be positive"),
    (["ledger", "--ops", "nope"], "unknown op 'nope'"),
    (["ledger", "--shapes", "nope"], "unknown shape 'nope'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_usage_errors_come_before_the_heavy_imports(argv, needle):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kphi3_bench.run", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU cannot run")
def test_a_provider_or_variant_that_cannot_run_here_is_a_clear_error(capsys):
    assert run.main(["--providers", "triton", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--providers: cannot run on cpu here (triton: needs a GPU" in err
    assert run.main(["model", "--variants", "kphi3-triton", "--no-progress"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# --- numbers for people -----------------------------------------------------------------------

@pytest.mark.parametrize("ms,text", [(14760.0, "14.8 s"), (1.476, "1.48 ms"), (0.0123, "12.3 us"),
                                     (250.0, "250 ms"), (0.5, "500 us"), (1.0e6, "1000 s")])
def test_times_are_written_in_a_unit_that_fits_without_exponents(ms, text):
    assert report.fmt_time(ms) == text


def test_plain_numbers_never_use_exponent_notation():
    for value in (1.234e-7, 3.2e-5, 0.000123, 0.5, 1.0, 12.5, 1476.0, 1.5e7, 123456789.0):
        assert "e" not in report.plain(value), value
    assert report.plain(0.000123) == "0.000123" and report.plain(1476.2) == "1476"
    assert report.plain(None) == "-" and report.fmt_time(None) == "-"


def test_a_roofline_fraction_above_one_is_capped_with_a_note():
    from kphi3_bench.sweep import capped_fraction

    assert capped_fraction(0.5) == (0.5, "")
    fraction, note = capped_fraction(1.299)
    assert fraction == 1.0 and "130% of the measured peak" in note and "measured low" in note


def test_the_model_table_prints_times_in_units_not_exponents():
    row = model_bench.ModelRow(variant="phi3-dense", task="train", family="kphi3", dtype="fp32",
                               status="ok", tokens_per_s=34.7, median_ms=14760.0, p20_ms=14500.0,
                               p80_ms=15100.0, tokens=512, first_call_s=20.5, params=10 ** 8,
                               state_mb=1234.5, peak_mb=99.0, parity="n/a", shape="s",
                               env={"device_name": "cpu"})
    meta = {"env": {"device_name": "cpu", "torch": "t", "transformers": "t", "date": "d"},
            "dtype": "fp32", "family": "kphi3", "attention": "a", "timing": "t", "memory": "m"}
    text = model_bench.format_table([row], meta)
    assert "14.8 s" in text and "20.5 s" in text and "e+" not in text


# --- the summary printed first --------------------------------------------------------------

def test_the_summary_gives_fractions_of_nn_linear_beside_two_over_g_within_100_columns():
    rows = _rows()
    text = report.quick_summary(rows)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 100
    header = next(line for line in lines if line.startswith("shape"))
    assert header.split() == ["shape", "G", "M", "mode", "nn.Linear", "kernels", "torch",
                              "reference", "2/G"]
    first = next(line for line in lines if line.startswith(TINY.name)).split()
    # tiny-io, G 4, M 5, fwd, nn.Linear 9.3 ms, kernels -, torch 8/9.3, reference 7.8/9.3, 2/G.
    assert first == [TINY.name, "4", "5", "fwd", "9.3", "ms", "-", "0.86", "0.84", "0.50"]
    assert "kernels = triton: not run (needs a GPU)" in text
    full = report.format_summary_report(rows, _meta())
    assert max(map(len, full.splitlines())) <= 100 and "Detailed results" not in full
    with_tables = report.format_summary_report(rows, _meta(), tables=True)
    assert with_tables.index("Time per call as a fraction") < with_tables.index("Detailed")


def test_an_unstable_row_is_starred_in_the_summary_and_explained_below():
    rows = _rows(NOISY_LINEAR, max_repeats=0, with_triton=False)
    text = report.format_summary_report(rows, _meta())
    assert "3 ms*" in text and "0.00" not in text
    assert "*: UNSTABLE, the row's timing stayed noisy or beat nn.Linear" in text
    assert max(map(len, text.splitlines())) <= 100


def test_a_noisy_run_is_timed_again_with_twice_the_calls():
    budgets = []

    class NoisyOnce(FakeTimer):
        def __call__(self, fns, device, grad_to_none, budget_s, min_reps, **kw):
            budgets.append((budget_s, min_reps))
            return super().__call__(fns, device, grad_to_none, budget_s, min_reps, **kw)

    timer = NoisyOnce(NOISY_LINEAR)
    cfg = SweepConfig(shapes=[TINY], Ms=[5], modes=["fwd"],
                      providers=[providers.LinearProvider(), providers.ReferenceProvider()],
                      dtype=torch.float32, device=CPU,
                      roofline=roofline.Roofline(1.0, 10.0, "t", "t"), budget_s=0.25, min_reps=3,
                      max_repeats=2, max_time_s=60.0, measure_memory=False, timer=timer)
    run_sweep(cfg, progress=False)
    assert budgets == [(0.25, 3), (0.5, 6), (1.0, 12)]


# --- results kept when a run is interrupted ---------------------------------------------------

@pytest.fixture
def tiny_cli(monkeypatch):
    """``run.main`` on the tiny shape; the fake timer given to ``use`` replaces the real one."""
    monkeypatch.setitem(shapes.SHAPES, TINY.name, TINY)
    monkeypatch.setattr(cli, "SHAPE_NAMES", cli.SHAPE_NAMES + (TINY.name,))

    def use(timer):
        monkeypatch.setattr(timing, "bench_many", timer)
    return use


TINY_ARGS = ["--shapes", TINY.name, "--M", "3,5,7", "--providers", "nn.Linear,reference",
             "--modes", "fwd", "--no-progress", "--no-memory", "--peak-tflops", "1",
             "--peak-gbps", "10"]


def test_an_interrupted_sweep_keeps_its_rows_and_resume_times_only_the_rest(tiny_cli, tmp_path,
                                                                            capsys):
    out = tmp_path / "sweep.json"
    tiny_cli(FakeTimer(STEADY, interrupt_after=2))  # Ctrl-C during the third timing
    assert run.main(TINY_ARGS + ["--out", str(out)]) == 130
    kept = json.loads(out.read_text())
    assert kept["complete"] is False
    assert sorted((r["M"], r["provider"]) for r in kept["results"]) == [
        (3, "nn.Linear"), (3, "reference"), (5, "nn.Linear"), (5, "reference")]
    err = capsys.readouterr().err
    assert f"the rows timed so far are in {out}" in err and "--resume" in err
    assert f"kphi3-bench plot {out} --out DIR" in err
    # The partial file plots as it is.
    assert run.main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0

    timer = FakeTimer(STEADY)
    tiny_cli(timer)
    assert run.main(TINY_ARGS + ["--out", str(out), "--resume"]) == 0
    assert timer.runs == 1  # only M = 7 was timed again
    done = json.loads(out.read_text())
    assert done["complete"] is True
    assert sorted((r["M"], r["provider"]) for r in done["results"]) == [
        (m, p) for m in (3, 5, 7) for p in ("nn.Linear", "reference")]


def test_an_interrupted_sweep_without_out_says_how_to_keep_rows(tiny_cli, capsys):
    tiny_cli(FakeTimer(STEADY, interrupt_after=0))
    assert run.main(TINY_ARGS) == 130
    assert "give --out FILE.json" in capsys.readouterr().err


def test_the_progress_bar_counts_only_rows_that_run():
    from kphi3_bench.sweep import Sweep

    cfg = SweepConfig(shapes=[TINY], Ms=[3, 5], modes=["fwd", "fwd+bwd"],
                      providers=[providers.LinearProvider(), providers.TritonProvider()],
                      dtype=torch.float32, device=CPU,
                      roofline=roofline.Roofline(1.0, 10.0, "t", "t"),
                      done=frozenset({(TINY.name, 3, "fwd")}))
    expected = 3 if torch.cuda.is_available() is False else 6
    assert Sweep(cfg).total() == expected  # triton needs a GPU; one point already done


def test_an_interrupted_model_benchmark_keeps_its_rows(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_variant(self, variant):
        calls.append(variant)
        if len(calls) > 1:
            raise KeyboardInterrupt
        for task in model_bench.TASKS:
            self._row(variant, task, "ok", median_ms=10.0, tokens_per_s=100.0)

    totals = []

    class Counting(model_bench.Progress):
        def __init__(self, total, **kw):
            totals.append(total)
            super().__init__(total, **kw)

    monkeypatch.setattr(model_bench.ModelBench, "_run_variant", fake_variant)
    monkeypatch.setattr(model_bench, "Progress", Counting)
    out = tmp_path / "model.json"
    assert model_bench.main(["--device", "cpu", "--out", str(out), "--no-progress"]) == 130
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and len(kept["results"]) == 2
    assert "interrupted; the rows timed so far are in" in capsys.readouterr().err
    assert totals == [4]  # kphi3-torch and phi3-dense, 2 tasks each: not the GPU-only variants


def test_an_interrupted_ledger_keeps_its_rows(monkeypatch, tmp_path):
    counted = []
    original = ledger.triton_launches

    def interrupt_at_the_fourth(p, mode, io_forward="auto"):
        if len(counted) == 3:
            raise KeyboardInterrupt
        counted.append(p)
        return original(p, mode, io_forward)

    monkeypatch.setattr(ledger, "triton_launches", interrupt_at_the_fourth)
    monkeypatch.setattr(ledger, "WRITE_INTERVAL_S", 0.0)
    out = tmp_path / "ledger.json"
    assert ledger.main(["--shapes", "kphi3-qkv", "--M", "16", "--triton-only", "--out",
                        str(out)]) == 130
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and len(kept["rows"]) == 3


# --- the ledger: a summary first, every launch on request, equal dtypes once --------------------

def test_the_ledger_prints_a_summary_first_and_equal_dtypes_once(capsys):
    argv = ["--shapes", "kphi3", "--M", "16,2048", "--dtype", "bf16,fp16"]
    assert ledger.main(argv) == 0
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 100
    assert "(bf16/fp16: the same prediction)" in text
    table = [line for line in text.splitlines() if line.startswith("kphi3 ")]
    assert len(table) == 2 * len(ledger.OPS)  # one line per M and op, not per dtype or shape
    assert "One decoder layer" in text and "its 4 projections' fwd + bwd" in text
    assert "Every launch" not in text
    assert ledger.main(argv + ["--detail"]) == 0
    detail = capsys.readouterr().out
    assert "Every launch of the Triton path" in detail
    assert "gpc_io kphi3-qkv M=16 fwd bf16/fp16" in detail  # the dtypes share a row


def test_dedupe_keeps_rows_that_differ():
    rows = ledger.build_ledger([shapes.SHAPES["kphi3-o"]], [16], ["fwd"], ["bf16", "fp16", "fp32"],
                               ["gpc_io"], baselines=False)
    labels = [label for label, _ in ledger.dedupe(rows, ledger.h200_model())]
    assert labels == ["bf16/fp16", "fp32"]


# --- plots --------------------------------------------------------------------------------------

def _figure(rows):
    import matplotlib

    matplotlib.use("Agg")
    return report.family_figure(rows, TINY.family)


def _boxes_overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_the_plot_shows_speedup_with_readable_ticks_and_a_legend_clear_of_the_notes():
    import matplotlib.pyplot as plt

    rows = _rows(NOISY_LINEAR, Ms=(1, 16, 256, 2048), max_repeats=0)
    fig = _figure(rows)
    try:
        renderer = fig.canvas.get_renderer()
        axes = fig.axes
        assert len(axes) == 2  # one shape, two modes
        for ax in axes:
            y_labels = [t.get_text() for t in ax.get_yticklabels()
                        if t.get_text() and ax.get_ylim()[0] <= t.get_position()[1]
                        <= ax.get_ylim()[1]]
            assert len(y_labels) >= 3 and all(label.endswith("x") for label in y_labels)
            assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "16", "256", "2048"]
            assert ax.get_xscale() == "log"
            assert ax.get_ylabel() in ("", "speed-up over nn.Linear")
        assert axes[-1].get_xlabel() == "M (tokens)"
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert {"reference", "torch", "nn.Linear (1x)"} <= set(labels)
        assert any(label.startswith("FLOP ideal") for label in labels)
        notes = [t for t in fig.texts if t.get_text()]
        assert any("triton: not run (needs a GPU)" in t.get_text() for t in notes)
        assert any("hollow points: UNSTABLE" in t.get_text() for t in notes)
        boxes = [legend.get_window_extent(renderer)] + [t.get_window_extent(renderer)
                                                        for t in notes]
        panels = [ax.get_tightbbox(renderer) for ax in axes]
        for i, a in enumerate(boxes):
            assert all(not _boxes_overlap(a, b) for b in boxes[i + 1:] + panels)
            assert 0 <= a.x0 and a.x1 <= fig.bbox.width and 0 <= a.y0  # inside the figure
        # The FLOP ideal G/2 = 2x is drawn as a line at 2.
        ideal = [line for line in axes[0].get_lines() if line.get_label().startswith("FLOP")]
        assert ideal and list(ideal[0].get_ydata()) == [2.0, 2.0]
    finally:
        plt.close(fig)


def test_a_speedup_that_spans_decades_gets_a_log_axis():
    import matplotlib.pyplot as plt

    times = dict(STEADY, reference=(0.05, 0.049, 0.051))  # 186x: past a decade from 1x
    fig = _figure(_rows(times, Ms=(1, 16), with_triton=False))
    try:
        assert all(ax.get_yscale() == "log" for ax in fig.axes)
    finally:
        plt.close(fig)


# --- the command line imports nothing of the suite (tests/test_import_graph.py: no cycles) -----

def test_every_subcommand_parses_through_the_cli_module_alone():
    from test_import_graph import PACKAGES, imports_of, module_names

    modules = module_names("benchmarks", PACKAGES["benchmarks"])
    imports = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    assert "kphi3_bench.run" not in imports["kphi3_bench.model_bench"]
    assert "kphi3_bench.cli" in imports["kphi3_bench.model_bench"]
    assert imports["kphi3_bench.cli"] == set()


# --- the results page counts no UNSTABLE row ---------------------------------------------------

def test_the_results_page_never_counts_an_unstable_row(tmp_path):
    from kphi3_bench import results_readme

    rows = _rows(dict(STEADY, torch=(8.5, 6.0, 9.5)), Ms=(5,), modes=("fwd",), with_triton=False,
                 spread_threshold=1.2, max_repeats=0)
    torch_row = next(r for r in rows if r.provider == "torch")
    assert torch_row.unstable
    table = results_readme.backend_vs_reference_table(rows)
    assert "0 stable rows" in table and "(1 UNSTABLE rows not counted)" in table
    torch_row.roofline_fraction = 0.9
    assert "| torch |" not in results_readme.roofline_markdown(rows)
