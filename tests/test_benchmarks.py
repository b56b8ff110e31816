"""The benchmark suite (benchmarks/): the quick sweep end to end, the parity gate, the counts and
the roofline, the argument errors, the GPU script's dry run and the model benchmark's plumbing.

Timings are never asserted (they are noise on a shared CPU); what a run writes and refuses is.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kphi3_bench import (cli, gpu_check, memory, model_bench, parity, providers, report, roofline,
                         run, shapes, timing)
from kphi3_bench.shapes import Shape
from kphi3_bench.sweep import SweepConfig, run_sweep
from kphi3_bench.timing import quantiles_ms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("provider", "op", "shape", "M", "dtype", "mode", "median_ms", "device_name", "torch",
            "triton", "transformers", "date")
TINY = Shape("tiny-io", "tiny", "io", 64, 128, 16)  # G = 4
CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"


def _load(path):
    with open(path) as f:
        return json.load(f, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


# --- --quick, end to end ----------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of --quick")
def test_quick_runs_end_to_end_and_writes_json_and_plots(tmp_path):
    out, plots = tmp_path / "quick.json", tmp_path / "plots"
    proc = subprocess.run(
        [sys.executable, "-m", "kphi3_bench.run", "--quick", "--out", str(out), "--plot", str(plots),
         "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = _load(out)
    rows = data["results"]
    assert data["meta"]["env"]["device_name"] and data["meta"]["roofline"]["peak_tflops"] > 0
    assert "measured dense-matmul peak" in data["meta"]["roofline"]["tflops_source"]
    for row in rows:
        assert all(key in row for key in REQUIRED), sorted(set(REQUIRED) - set(row))
    assert {r["provider"] for r in rows} == set(providers.PROVIDER_NAMES)
    assert {r["shape"] for r in rows} == set(shapes.QUICK_SHAPES)
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["status"] == "needs a GPU" and r["median_ms"] is None for r in triton)
    others = [r for r in rows if r["provider"] != "triton"]
    assert all(r["status"] == "ok" and r["median_ms"] > 0 for r in others)
    assert all(r["parity"] == parity.DENSE_BASELINE for r in others if r["provider"] == "nn.Linear")
    assert all(r["parity"].startswith("ok") for r in others if r["provider"] != "nn.Linear")
    assert all(r["speedup_vs_linear"] > 0 and r["roofline_fraction"] > 0 for r in others)
    # Every timed row says whether its measurement was stable, and why not when it was not.
    assert all(isinstance(r["stable"], bool) and r["repeats"] >= 1 for r in others)
    assert all(r["unstable_reason"] for r in others if not r["stable"])
    assert data["meta"]["stability"]["spread_threshold"] == 1.5
    if any(not r["stable"] for r in others):
        assert "UNSTABLE" in proc.stdout and "timed rows unstable" in proc.stdout

    # The summary comes first, fits 100 columns, and says why the kernels did not run.
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= 100
    header = next(line for line in lines if line.startswith("shape"))
    assert header.split() == ["shape", "G", "M", "mode", "nn.Linear", "kernels", "torch",
                              "reference", "2/G"]
    assert "kernels = triton: not run (needs a GPU)" in proc.stdout
    assert "e+" not in proc.stdout and "e-0" not in proc.stdout  # no exponent notation

    pngs = sorted(plots.glob("*.png"))
    assert [p.stem for p in pngs] == ["kphi3"]  # one figure per shape family
    assert all(_png_size(p)[0] >= 1000 and _png_size(p)[1] >= 700 for p in pngs)


# --- the parity gate --------------------------------------------------------------------------

class WrongForward(providers.ReferenceProvider):
    """The reference, 0.1 % off: fails an fp32 parity check; counts its calls."""

    name = "wrong-forward"

    def __init__(self):
        self.calls = 0

    def bind(self, shape, params):
        inner = super().bind(shape, params)

        def fn(x):
            self.calls += 1
            return inner(x) * 1.001
        return fn


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, dy):
        return dy * 2


class WrongGrad(providers.ReferenceProvider):
    """A right forward whose gradients are twice too large."""

    name = "wrong-grad"

    def bind(self, shape, params):
        inner = super().bind(shape, params)
        return lambda x: _ScaleGrad.apply(inner(x))


class NaNOutput(providers.ReferenceProvider):
    name = "nan-output"

    def bind(self, shape, params):
        inner = super().bind(shape, params)
        return lambda x: inner(x) + float("nan")


def _sweep(provider_list, modes=("fwd", "fwd+bwd"), Ms=(5,), dtype=torch.float32, **kwargs):
    roof = roofline.Roofline(1.0, 10.0, "test", "test")
    cfg = SweepConfig(shapes=[TINY], Ms=list(Ms), modes=list(modes), providers=provider_list,
                      dtype=dtype, device=CPU, roofline=roof, budget_s=0.0, min_reps=2,
                      measure_memory=False, **kwargs)
    return run_sweep(cfg, progress=False)


def test_parity_gate_refuses_a_wrong_provider_and_times_the_right_ones(tmp_path):
    wrong = WrongForward()
    rows = _sweep([providers.LinearProvider(), providers.ReferenceProvider(),
                   providers.TorchBackendProvider(), wrong, WrongGrad(), NaNOutput()])
    by = {(r.provider, r.mode): r for r in rows}

    for mode in ("fwd", "fwd+bwd"):
        r = by["wrong-forward", mode]
        assert r.status == "parity failed" and r.failed and r.median_ms is None
        assert r.parity.startswith("FAILED") and r.parity_rel_err == pytest.approx(1e-3, rel=1e-2)
        assert by["reference", mode].status == "ok" and by["reference", mode].median_ms > 0
        assert by["torch", mode].status == "ok" and by["torch", mode].parity.startswith("ok")
        assert by["nn.Linear", mode].parity == parity.DENSE_BASELINE
        assert by["nan-output", mode].status == "parity failed"
        assert math.isinf(by["nan-output", mode].parity_rel_err)
    # Run once, by the check, for each mode's parity (forward and with gradients): never timed.
    assert wrong.calls == 1
    # Gradients are checked only for the modes that need them.
    assert by["wrong-grad", "fwd"].status == "ok" and by["wrong-grad", "fwd"].median_ms > 0
    assert by["wrong-grad", "fwd+bwd"].status == "parity failed"
    assert "dx" in by["wrong-grad", "fwd+bwd"].parity

    status, closing = run.verdict(rows)
    assert status == 1 and "wrong-forward" in closing and "wrong-grad" in closing
    table = report.format_report(rows, _meta())
    assert "PARITY FAILED" in table or "FAILED (rel err" in table
    path = tmp_path / "rows.json"
    report.write_json(str(path), rows, _meta())
    assert _load(path)["results"][-1]["parity_rel_err"] == "inf"  # strict JSON, no Infinity


def _meta():
    return {"env": {"device_name": "cpu", "torch": "t", "triton": "t", "transformers": "t",
                    "date": "d"}, "dtype": "fp32", "timing": "t", "memory": "m",
            "roofline": roofline.Roofline(1.0, 10.0, "test", "test").to_dict()}


ORIGINAL_DEFAULT_PROVIDERS = providers.default_providers


def test_cli_exit_status_is_1_when_a_provider_fails_parity(monkeypatch, tmp_path, capsys):
    def with_broken():
        found = dict(ORIGINAL_DEFAULT_PROVIDERS())
        found["wrong-forward"] = WrongForward()
        return found

    monkeypatch.setattr(providers, "default_providers", with_broken)
    monkeypatch.setitem(shapes.SHAPES, TINY.name, TINY)
    # The torch-free checks (cli.py) know the names from their own copies.
    monkeypatch.setattr(cli, "SHAPE_NAMES", cli.SHAPE_NAMES + (TINY.name,))
    monkeypatch.setattr(cli, "PROVIDER_NAMES", cli.PROVIDER_NAMES + ("wrong-forward",))
    out = tmp_path / "r.json"
    status = run.main(["--shapes", TINY.name, "--M", "3", "--providers", "reference,wrong-forward",
                       "--modes", "fwd", "--budget-s", "0.001", "--min-reps", "1", "--no-progress",
                       "--peak-tflops", "1", "--peak-gbps", "10", "--out", str(out)])
    printed = capsys.readouterr()
    assert status == 1
    assert "FAILED" in printed.out and "wrong-forward" in printed.out
    rows = {r["provider"]: r for r in _load(out)["results"]}
    assert rows["wrong-forward"]["status"] == "parity failed"
    assert rows["wrong-forward"]["median_ms"] is None
    assert rows["reference"]["status"] == "ok"


class Raises(providers.ReferenceProvider):
    name = "raises"

    def bind(self, shape, params):
        def fn(x):
            raise RuntimeError("kernel exploded")
        return fn


def test_a_provider_that_raises_is_a_row_with_the_error():
    rows = _sweep([providers.ReferenceProvider(), Raises()], modes=("fwd",))
    by = {r.provider: r for r in rows}
    assert by["raises"].status == "error" and "RuntimeError: kernel exploded" in by["raises"].error
    assert by["reference"].status == "ok"
    status, closing = run.verdict(rows)
    assert status == 1 and "raises" in closing
    assert "kernel exploded" in report.detailed_table(rows)


def test_triton_is_shown_as_needing_a_gpu_on_cpu_even_when_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = _sweep([providers.TritonProvider()], modes=("fwd",))
    assert [r.status for r in rows] == ["needs a GPU"] and rows[0].median_ms is None
    assert run.verdict(rows)[0] == 0


# --- stable rows: re-timing and marking -------------------------------------------------------

class FakeTimer:
    """A timer that calls nothing: run i of each mode gets ``script[i]`` (the last one repeats),
    ``{provider: (median, p20, p80)}`` in ms; it records which providers each run timed."""

    def __init__(self, *script):
        self.script, self.runs = script, []

    def __call__(self, fns, device, grad_to_none, budget_s, min_reps):
        self.runs.append(sorted(fns))
        step = self.script[min(len(self.runs) - 1, len(self.script) - 1)]
        return {name: timing.Timing(*step[name], reps=min_reps, method="fake") for name in fns}


STEADY = {"nn.Linear": (9.3, 9.2, 9.4), "reference": (6.0, 5.9, 6.1)}  # 1.55x, under G/2 = 2


def _timed(timer, **kwargs):
    rows = _sweep([providers.LinearProvider(), providers.ReferenceProvider()], modes=("fwd",),
                  timer=timer, **kwargs)
    return {r.provider: r for r in rows}, rows


def test_an_outlier_run_is_timed_again_with_every_provider_and_the_stable_run_kept():
    # A nn.Linear outlier (30.5 ms; reference "7.56x" past the ideal 2x), then a steady run.
    outlier = {"nn.Linear": (30.5, 30.0, 31.0), "reference": (4.03, 4.0, 4.1)}
    timer = FakeTimer(outlier, STEADY)
    by, rows = _timed(timer)
    assert timer.runs == [["nn.Linear", "reference"]] * 2  # both providers, in both runs
    assert all(r.stable is True and r.unstable_reason == "" and r.repeats == 2 for r in rows)
    assert by["nn.Linear"].median_ms == 9.3 and by["reference"].median_ms == 6.0
    assert by["reference"].speedup_vs_linear == pytest.approx(9.3 / 6.0)
    # A spread outlier (p20-p80 0.9-6.2 ms) is timed again just the same.
    noisy = dict(STEADY, **{"nn.Linear": (3.0, 0.9, 6.2)})
    timer = FakeTimer(noisy, STEADY)
    by, rows = _timed(timer)
    assert len(timer.runs) == 2 and all(r.stable for r in rows)
    assert "UNSTABLE" not in report.format_report(rows, _meta())


def test_a_row_that_stays_noisy_is_marked_unstable_with_the_reason(tmp_path):
    noisy = dict(STEADY, **{"nn.Linear": (3.0, 0.9, 6.2)})
    timer = FakeTimer(noisy)
    by, rows = _timed(timer, max_repeats=2)
    assert len(timer.runs) == 3  # the first run and two repeats
    linear = by["nn.Linear"]
    assert linear.stable is False and linear.repeats == 3
    assert "noisy: its call times varied too much (p80 = 6.89x p20, at most 1.5x accepted)" in \
        linear.unstable_reason
    assert "timed 3 times, unstable every time" in linear.unstable_reason
    assert by["reference"].stable is True  # its own measurement was fine
    # The table, the summary, the closing line and the JSON say so.
    text = report.format_report(rows, _meta())
    assert "1.00x UNSTABLE" in text and "3 ms UNSTABLE" in text
    assert "1 of 2 timed rows unstable (1 noisy)" in text
    assert "rerun on an idle machine" in text  # and what to do about it
    status, closing = run.verdict(rows)
    assert status == 0 and "1 of them UNSTABLE (1 noisy" in closing
    report.write_json(str(tmp_path / "r.json"), rows, _meta())
    saved = {r["provider"]: r for r in _load(tmp_path / "r.json")["results"]}
    linear = saved["nn.Linear"]
    assert linear["stable"] is False and "noisy" in linear["unstable_reason"]
    assert saved["reference"]["stable"] is True and saved["reference"]["unstable_reason"] == ""
    # The threshold is the caller's: at 10 the same run is stable at once.
    timer = FakeTimer(noisy)
    assert all(r.stable for r in _timed(timer, spread_threshold=10.0)[1]) and len(timer.runs) == 1


def test_a_speedup_above_the_ideal_is_flagged_and_counted(tmp_path):
    from kphi3_bench import results_readme

    too_fast = {"nn.Linear": (30.5, 30.0, 31.0), "reference": (1.55, 1.5, 1.6)}  # 19.7x > 2x
    timer = FakeTimer(too_fast)
    by, rows = _timed(timer, max_repeats=1)
    ref = by["reference"]
    assert len(timer.runs) == 2 and ref.stable is False and by["nn.Linear"].stable is True
    assert 1.5 < ref.roofline_speedup_vs_linear <= TINY.groups / 2  # memory-bound: a bit < G/2
    assert "above the ideal: 19.68x faster than nn.Linear, more than the" in ref.unstable_reason
    assert "19.68x UNSTABLE" in report.detailed_table(rows)
    assert "(19.68x) UNSTABLE" in report.summary_table(rows)
    assert "1 of 2 timed rows unstable (1 above the ideal)" in report.format_report(rows, _meta())
    # The results page marks and counts it too.
    env = {"device": "cpu", "device_name": "CPU (test)", "torch": "t", "triton": "t",
           "transformers": "t", "date": "2026-01-01T00:00:00+00:00", "python": "3"}
    for r in rows:
        r.env = env
    report.write_json(str(tmp_path / "cpu.json"), rows, dict(_meta(), command="c", env=env))
    (tmp_path / "README.md").write_text(f"{results_readme.BEGIN}\n{results_readme.END}\n")
    assert results_readme.main(["--dir", str(tmp_path)]) == 0
    page = (tmp_path / "README.md").read_text()
    assert "(19.68x) UNSTABLE" in page and "1 of 2 timed rows unstable" in page


def test_no_repeat_past_max_time_and_a_failing_call_is_an_error_row(capsys):
    noisy = dict(STEADY, **{"nn.Linear": (3.0, 0.9, 6.2)})
    timer = FakeTimer(noisy)
    by, _ = _timed(timer, max_time_s=0.0)
    assert len(timer.runs) == 1 and by["nn.Linear"].stable is False
    assert ("timed once, not again: another run would have taken this row past --max-time 0 s"
            in by["nn.Linear"].unstable_reason)
    # The line printed as it happens says what the row's time is worth, and what to do.
    printed = capsys.readouterr().err
    assert "UNSTABLE nn.Linear tiny-io M=5 fwd: noisy: its call times varied too much" in printed
    assert ("This time is not a result: rerun on an idle machine, or give each row more time "
            "with a larger --max-time (e.g. --max-time 10)." in printed)

    class FailsOnce(FakeTimer):
        def __call__(self, fns, *args):
            if not self.runs:
                self.runs.append(sorted(fns))
                raise timing.CallFailed("reference", RuntimeError("kernel exploded"))
            return super().__call__(fns, *args)

    timer = FailsOnce(STEADY)
    by, rows = _timed(timer)
    assert by["reference"].status == "error" and "kernel exploded" in by["reference"].error
    assert by["nn.Linear"].status == "ok" and by["nn.Linear"].stable is True
    assert timer.runs == [["nn.Linear", "reference"], ["nn.Linear"]]


def test_interleaved_cpu_timing_alternates_the_providers():
    order = []
    fns = {name: (lambda name=name: order.append(name)) for name in "abc"}
    got = timing.bench_cpu_interleaved(fns, {}, budget_s=0.0, min_reps=3, warmup=0)
    assert order == list("abc" "cba" "abc")  # one call each per pass, every other pass reversed
    assert all(t.reps == 3 for t in got.values())
    assert timing.spread(timing.Timing(2.0, 1.0, 3.0, 3, "")) == 3.0

    def boom():
        raise ValueError("no")
    with pytest.raises(timing.CallFailed) as failed:
        timing.bench_cpu_interleaved({"a": fns["a"], "b": boom}, {}, budget_s=0.0, min_reps=1,
                                     warmup=0)
    assert failed.value.name == "b"


# --- the grouped_mm provider ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_provider_matches_the_reference_or_says_why_not(dtype):
    provider = providers.GroupedMMProvider()
    rows = _sweep([provider], dtype=dtype, timer=FakeTimer({"grouped_mm": (1.0, 1.0, 1.0)}))
    reason = provider.unavailable(CPU, dtype)
    if reason is not None:
        assert reason.startswith("unavailable: ") and all(r.status == reason for r in rows)
    else:
        for r in rows:  # forward and, for fwd+bwd, dx, dw1 and dw2 against float64
            assert r.status == "ok" and r.parity.startswith("ok"), r.parity
            assert r.parity_rel_err <= parity.tolerance(dtype)
    assert run.verdict(rows)[0] == 0


def test_grouped_mm_refusals_are_reported_not_raised(monkeypatch):
    reason = providers.GroupedMMProvider().unavailable(CPU, torch.float64)  # torch takes no fp64
    assert reason.startswith("unavailable: ") and "fp64 on cpu" in reason
    monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    providers._grouped_mm_refusal.cache_clear()
    try:
        assert providers.grouped_mm_function() == (None, "")
        assert "has no grouped_mm" in providers.GroupedMMProvider().unavailable(CPU, torch.float32)
    finally:
        providers._grouped_mm_refusal.cache_clear()


# --- counts and roofline ----------------------------------------------------------------------

def test_released_shapes_and_group_counts():
    got = {s.name: (s.in_features, s.out_features, s.groups) for s in shapes.SHAPES.values()}
    assert got["kphi3-qkv"] == (1280, 3840, 5)
    assert got["kphi3-o"] == (1280, 1280, 5)
    assert got["kphi3-gate_up"] == (1280, 10240, 5)
    assert got["kphi3-down"] == (5120, 1280, 20)
    assert got["phi3-mini-qkv"] == (3072, 9216, 12)
    assert got["phi3-mini-down"] == (8192, 3072, 32)
    assert [s.name for s in shapes.resolve_shapes(["kphi3"])] == [
        "kphi3-qkv", "kphi3-o", "kphi3-gate_up", "kphi3-down"]


def test_flop_byte_and_parameter_counts():
    qkv, down = shapes.SHAPES["kphi3-qkv"], shapes.SHAPES["kphi3-down"]
    M = 2048
    assert shapes.flops(qkv, M, "fwd") == 4 * M * 1280 * 3840 // 5 == 8_053_063_680
    assert shapes.flops(qkv, M, "fwd", dense=True) == 2 * M * 1280 * 3840
    assert shapes.flops(qkv, M, "bwd") == 2 * shapes.flops(qkv, M, "fwd")
    assert shapes.flops(qkv, M, "fwd+bwd") == 3 * shapes.flops(qkv, M, "fwd")
    assert shapes.flops(down, M, "fwd") == 4 * M * 5120 * 1280 // 20
    for s in (qkv, down):  # docs/performance.md: the ideal IO-block / nn.Linear ratio is 2 / G
        assert shapes.flops(s, M, "fwd") / shapes.flops(s, M, "fwd", dense=True) == 2 / s.groups
        assert shapes.params(s) / shapes.params(s, dense=True) == 2 / s.groups
        assert shapes.ideal_speedup(s) == s.groups / 2
    assert shapes.params(qkv) == 2 * 5 * 256 * 768
    assert shapes.min_bytes(qkv, 1, "fwd", 2) == 2 * (1280 + 2 * 1280 * 3840 // 5 + 3840)
    assert shapes.min_bytes(qkv, M, "bwd", 4) == 4 * (M * 3840 + 2 * M * 1280 + 2 * shapes.params(qkv))


def test_h200_roofline_from_spec(monkeypatch):
    monkeypatch.setattr(roofline, "device_name", lambda device: "NVIDIA H200")
    roof = roofline.roofline_for(torch.device("cuda"), torch.bfloat16)
    assert (roof.peak_tflops, roof.peak_gbps) == (790.0, 4300.0)
    assert "H200" in roof.tflops_source and "H200" in roof.gbps_source
    qkv = shapes.SHAPES["kphi3-qkv"]
    # M = 2048, bf16: compute-bound at 790 TFLOP/s.
    f, b = shapes.flops(qkv, 2048, "fwd"), shapes.min_bytes(qkv, 2048, "fwd", 2)
    assert roof.bound(f, b) == "compute"
    assert roof.time_s(f, b) == pytest.approx(8_053_063_680 / 790e12)
    assert roof.fraction(f, b, 2 * roof.time_s(f, b)) == pytest.approx(0.5)
    # M = 1: memory-bound, the weights dominate; IO block / nn.Linear is about 2 / G.
    f1, b1 = shapes.flops(qkv, 1, "fwd"), shapes.min_bytes(qkv, 1, "fwd", 2)
    fd, bd = shapes.flops(qkv, 1, "fwd", True), shapes.min_bytes(qkv, 1, "fwd", 2, True)
    assert roof.bound(f1, b1) == "memory"
    assert roof.time_s(f1, b1) == pytest.approx(b1 / 4.3e12)
    assert roof.time_s(f1, b1) / roof.time_s(fd, bd) == pytest.approx(2 / 5, rel=0.01)
    given = roofline.roofline_for(torch.device("cuda"), torch.bfloat16, peak_tflops=100, peak_gbps=1000)
    assert (given.peak_tflops, given.tflops_source) == (100, "given by --peak-tflops")


def test_cpu_roofline_is_measured_and_labelled():
    roof = roofline.roofline_for(CPU, torch.float32, quick=True)
    assert roof.peak_tflops > 0 and roof.peak_gbps > 0
    assert roof.tflops_source.startswith("measured dense-matmul peak")
    assert roof.gbps_source.startswith("measured copy bandwidth")


def test_timing_quantiles_and_cpu_peak_memory():
    assert quantiles_ms([0.001, 0.002, 0.003, 0.004, 0.005]) == pytest.approx([3.0, 1.8, 4.2])
    peak, method = memory.peak_bytes(lambda: torch.ones(1 << 20), CPU)
    assert method == memory.CPU_METHOD
    assert peak is None or peak >= 4 << 20  # None: the profiler gave nothing (then "n/a")


# --- bad arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("argv,needle", [
    (["--shapes", "kphi3-nope"], "unknown shape 'kphi3-nope'"),
    (["--M", "0"], "must be positive, got 0"),
    (["--M", "16,-2"], "must be positive, got -2"),
    (["--M", "lots"], "'lots' is not an integer"),
    (["--providers", "cuBLAS-magic"], "unknown provider 'cuBLAS-magic'"),
    (["--modes", "sideways"], "unknown mode 'sideways'"),
    (["--out", "/nonexistent-dir/sub/r.json"], "cannot write there"),
    (["--dtype", "fp8"], "invalid choice"),
    (["--budget-s", "-1"], "must be positive"),
    (["--min-repeats", "0"], "--min-repeats must be positive"),
    (["--max-repeats", "-1"], "--max-repeats must be 0 or more"),
    (["--max-time", "0"], "--max-time must be positive"),
    (["--spread-threshold", "0.9"], "must exceed 1"),
])
def test_bad_arguments_give_a_clear_error_and_exit_2(argv, needle, capsys):
    assert run.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err


def test_unwritable_outputs_are_refused_before_anything_runs(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert run.main(["--out", str(tmp_path)]) == 2  # a directory
    assert "is a directory" in capsys.readouterr().err
    assert run.main(["--plot", str(a_file / "plots")]) == 2  # below a regular file
    assert "--plot" in capsys.readouterr().err
    assert run.main(["--out", str(a_file / "r.json")]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_bad_argument_exit_status_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "kphi3_bench.run", "--shapes", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown shape 'nope'" in proc.stderr


# --- the command line: help texts, lazy imports, the plot command -------------------------------

HEAVY = ("torch", "transformers", "matplotlib", "triton", "kphi3_kernels", "kphi3_model")


@pytest.mark.parametrize("command", [[], ["model"], ["plot"], ["ledger"], ["ledger", "--model"]],
                         ids=["sweep", "model", "plot", "ledger", "model-ledger"])
def test_help_imports_neither_torch_nor_the_kernels(command):
    """`--help` must print at once: no torch, transformers, matplotlib or kernels imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "kphi3_bench.run", *command,
                           "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "kphi3_bench" in imported  # -X importtime did report (run itself runs as __main__)
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


def _parsers():
    from kphi3_bench import results_readme

    found = {name: build() for name, build in run.COMMANDS.items()}
    found["python -m kphi3_bench.results_readme"] = results_readme.build_parser()
    return found


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_has_a_help_text(name):
    parser = _parsers()[name]
    missing = [action.option_strings or [action.dest] for action in parser._actions
               if not isinstance(action, argparse._HelpAction)
               and not (action.help and action.help.strip())]
    assert not missing, f"{name}: options without a help text: {missing}"


def test_the_help_texts_quote_what_the_sweep_uses():
    """run.py writes these out so that --help needs no torch; they must match their sources."""
    from kphi3_bench import sweep

    assert run.FAMILY_NAMES == tuple(shapes.FAMILIES) == tuple(model_bench.MODEL_FAMILIES)
    assert run.PROVIDER_NAMES == providers.PROVIDER_NAMES
    assert run.MODES == shapes.MODES and run.DTYPE_NAMES == tuple(shapes.DTYPES)
    assert (run.DEFAULT_M_CUDA, run.DEFAULT_M_CPU) == (shapes.DEFAULT_M_CUDA, shapes.DEFAULT_M_CPU)
    assert run.QUICK_SHAPES == shapes.QUICK_SHAPES and run.QUICK_MODES == shapes.QUICK_MODES
    assert cli.SHAPE_NAMES == tuple(shapes.SHAPES)
    assert (run.QUICK_M_CPU, run.QUICK_M_CUDA) == (shapes.QUICK_M_CPU, shapes.QUICK_M_CUDA)
    assert run.SPREAD_THRESHOLD == sweep.SPREAD_THRESHOLD
    assert run.MODEL_VARIANTS == model_bench.VARIANTS and run.MODEL_COMPILED == model_bench.COMPILED


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == PNG
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_command_replots_a_saved_sweep(tmp_path, capsys):
    timer = FakeTimer(dict(STEADY, **{"nn.Linear": (3.0, 0.9, 6.2)}))  # nn.Linear unstable
    rows = _sweep([providers.LinearProvider(), providers.ReferenceProvider()], Ms=(5, 64),
                  timer=timer, max_repeats=0)
    saved = tmp_path / "sweep.json"
    report.write_json(str(saved), rows, _meta())
    assert run.main(["plot", str(saved), "--out", str(tmp_path / "plots")]) == 0
    png = tmp_path / "plots" / f"{TINY.family}.png"
    assert f"wrote {png}" in capsys.readouterr().out
    width, height = _png_size(png)
    assert width >= 1000 and height >= 700
    # A file that is not a layer sweep's results, or none at all, is refused with status 2.
    other = tmp_path / "model.json"
    other.write_text(json.dumps({"schema": "kphi3-bench-model/1", "meta": {}, "results": []}))
    assert run.main(["plot", str(other), "--out", str(tmp_path / "p")]) == 2
    assert "not a layer sweep's results" in capsys.readouterr().err
    assert run.main(["plot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "p")]) == 2
    assert run.main(["plot", str(saved)]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err


# --- gpu_check and the model benchmark --------------------------------------------------------

def test_gpu_check_without_a_gpu_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("there is a GPU")
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_model_benchmark_on_a_tiny_model(monkeypatch, tmp_path):
    pytest.importorskip("kphi3_model")
    monkeypatch.setitem(model_bench.MODEL_FAMILIES, "tiny",
                        model_bench.ModelFamily(64, 128, 16, heads=4, vocab=128, pad_token_id=127))
    out = tmp_path / "model.json"
    status = model_bench.main(["--family", "tiny", "--layers", "1", "--batch", "1", "--seq", "8",
                               "--prompt", "4", "--new-tokens", "3", "--steps", "2", "--device",
                               "cpu", "--out", str(out), "--no-progress"])
    assert status == 0
    rows = {(r["variant"], r["task"]): r for r in _load(out)["results"]}
    assert set(rows) == {(v, t) for v in model_bench.VARIANTS for t in model_bench.TASKS}
    assert rows["kphi3-triton", "train"]["status"] == "needs a GPU"
    assert rows["kphi3-fused", "train"]["status"] == "needs a GPU"
    for variant in ("kphi3-torch", "phi3-dense"):
        for task in model_bench.TASKS:
            r = rows[variant, task]
            assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["state_mb"] > 0
    assert rows["kphi3-torch", "train"]["parity"].startswith("ok")
    assert rows["phi3-dense", "train"]["speedup_vs_dense"] == pytest.approx(1.0)
    assert rows["kphi3-torch", "train"]["params"] < rows["phi3-dense", "train"]["params"]


def test_model_benchmark_reports_a_missing_model_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "kphi3_model", None)  # import fails
    with pytest.raises(RuntimeError, match="kphi3_model is not importable"):
        model_bench._model_classes()


def test_results_readme_is_generated_from_the_json(tmp_path):
    from kphi3_bench import results_readme
    from kphi3_bench.sweep import Row, fill_speedups

    env = {"device": "cpu", "device_name": "CPU (test)", "torch": "t", "triton": "t",
           "transformers": "t", "date": "2026-01-01T00:00:00+00:00"}
    qkv = shapes.SHAPES["kphi3-qkv"]
    rows = [Row(provider=p, op="qkv", shape=qkv.name, family="kphi3", in_features=1280,
                out_features=3840, groups=5, M=2048, dtype="fp32", mode="fwd", status="ok",
                median_ms=ms, roofline_fraction=0.5, env=env)
            for p, ms in (("nn.Linear", 10.0), ("torch", 4.0))]
    fill_speedups(rows)
    meta = dict(_meta(), command="python -m benchmarks.run --shapes kphi3", env=dict(env, python="3"))
    report.write_json(str(tmp_path / "cpu-2026-01-01.json"), rows, meta)
    (tmp_path / "README.md").write_text(f"# Results\n\nkept\n\n{results_readme.BEGIN}\nold\n"
                                        f"{results_readme.END}\n\nalso kept\n")
    assert results_readme.main(["--dir", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "kept" in text and "also kept" in text and "\nold\n" not in text
    assert "python -m benchmarks.run --shapes kphi3" in text
    assert "| kphi3-qkv | 5 | fwd | 10 | 4 | 0.40 | 0.40 |" in text  # torch / nn.Linear, ideal 2/G
    assert "4 (2.50x)" in text
