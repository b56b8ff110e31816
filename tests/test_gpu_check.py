"""gpu_check's time limit: the step runner (order, skip for time, files as each step completes)
on a fake clock, the dry run on a CPU within its limit, the first-choice knob of the launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from kphi3_bench import gpu_check, gpu_steps, kernel_smoke
from kphi3_bench.gpu_steps import Plan, Runner, SkipStep, Step


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _load(path):
    with open(path) as f:
        return json.load(f)


def _step(name, clock, estimate, took=None, keys=(), log=None, files=None, body=None, needs=()):
    """A step whose plan says ``estimate`` seconds and whose body advances the fake clock by
    ``took`` (default: the estimate) and writes ``<name>.txt`` into the output folder."""
    def plan():
        return Plan(keys=frozenset(keys), run_s=estimate)

    def default_body(p, remaining):
        clock.now += estimate if took is None else took
        if log is not None:
            log.append(name)
        return {"ok": True}

    return Step(name, f"the {name} step", plan, body or default_body,
                files or [f"{name}.txt"], needs=needs)


def test_steps_run_in_order_and_one_that_does_not_fit_is_skipped(tmp_path):
    clock, ran = FakeClock(), []
    steps = [_step("a", clock, 10, log=ran), _step("big", clock, 70, log=ran),
             _step("c", clock, 30, log=ran), _step("d", clock, 25, log=ran),
             _step("e", clock, 5, log=ran)]
    summary = Runner(str(tmp_path), 60, clock=clock, echo=lambda line: None).run(steps)
    # a (10 s) leaves 50: big (70) is skipped, c (30) runs, leaving 20: d (25) is skipped, e runs.
    assert ran == ["a", "c", "e"]
    assert summary["order"] == ["a", "big", "c", "d", "e"]
    assert summary["skipped_for_time"] == ["big", "d"]
    status = {n: s["status"] for n, s in summary["steps"].items()}
    assert status == {"a": "ran", "big": "skipped for time", "c": "ran",
                      "d": "skipped for time", "e": "ran"}
    assert summary["steps"]["d"]["reason"] == "needs ~25 s, 20 s left"
    assert summary["steps"]["c"]["seconds"] == 30 and summary["steps"]["c"]["estimate_s"] == 30
    assert summary["ok"] and summary["finished"]
    text = (tmp_path / "summary.txt").read_text()
    assert "skipped for time: big, d" in text


def test_compiles_shared_with_an_earlier_step_are_not_counted_again(tmp_path):
    clock = FakeClock()
    steps = [_step("first", clock, 1, keys={"k1", "k2"}), _step("second", clock, 1, keys={"k2", "k3"})]
    summary = Runner(str(tmp_path), 100, clock=clock, compile_s=10,
                     echo=lambda line: None).run(steps)
    assert summary["steps"]["first"]["compiles"] == 2
    assert summary["steps"]["first"]["estimate_s"] == 21
    assert summary["steps"]["second"]["compiles"] == 1  # k2 was compiled by "first"
    assert summary["steps"]["second"]["estimate_s"] == 11
    assert summary["estimated_all_s"] == 32


def test_each_step_s_files_and_the_summary_are_written_as_it_completes(tmp_path):
    clock = FakeClock()
    seen = {}

    def writes(name):
        def body(plan, remaining):
            (tmp_path / f"{name}.txt").write_text(name)
            clock.now += 1
            return {"ok": True}
        return body

    def looks_back(plan, remaining):
        # While the third step runs, the first two are on disk, with the summary saying so.
        seen["summary"] = _load(tmp_path / "summary.json")
        seen["files"] = sorted(p.name for p in tmp_path.iterdir())
        raise RuntimeError("the GPU fell off")

    steps = [_step("one", clock, 1, body=writes("one")), _step("two", clock, 1, body=writes("two")),
             _step("three", clock, 1, body=looks_back), _step("four", clock, 1, body=writes("four"))]
    summary = Runner(str(tmp_path), 100, clock=clock, echo=lambda line: None).run(steps)
    assert {"one.txt", "two.txt", "summary.json", "summary.txt"} <= set(seen["files"])
    assert {n: s.get("status") for n, s in seen["summary"]["steps"].items()
            if s.get("status")} == {"one": "ran", "two": "ran"}
    assert not seen["summary"].get("finished")
    # A failing step is recorded and the next one still runs; the run is not ok.
    assert summary["steps"]["three"]["status"] == "failed"
    assert "the GPU fell off" in summary["steps"]["three"]["error"]
    assert summary["steps"]["four"]["status"] == "ran"
    assert not summary["ok"]


def test_a_step_needing_one_that_did_not_run_is_skipped(tmp_path):
    clock = FakeClock()
    steps = [_step("timing", clock, 500), _step("ledger", clock, 1, needs=("timing",)),
             Step("sanitizer", "", lambda: (_ for _ in ()).throw(SkipStep("no tool here")),
                  lambda p, r: {"ok": True})]
    summary = Runner(str(tmp_path), 60, clock=clock, echo=lambda line: None).run(steps)
    assert summary["steps"]["timing"]["status"] == "skipped for time"
    assert summary["steps"]["ledger"]["status"] == "skipped"
    assert "needs timing" in summary["steps"]["ledger"]["reason"]
    assert summary["steps"]["sanitizer"]["reason"] == "no tool here"
    assert summary["ok"]


def test_a_dry_run_writes_the_plans_of_the_steps_that_fit(tmp_path):
    clock = FakeClock()
    ran = []
    steps = [_step("a", clock, 40, log=ran), _step("b", clock, 40, log=ran),
             _step("c", clock, 15, log=ran)]
    summary = Runner(str(tmp_path), 60, dry_run=True, clock=clock,
                     echo=lambda line: None).run(steps)
    assert ran == []  # nothing runs in a dry run
    assert [summary["steps"][n]["status"] for n in "abc"] == ["planned", "skipped for time",
                                                              "planned"]
    assert summary["estimated_gpu_s"] == 55 and summary["estimated_all_s"] == 95
    assert sorted(p.name for p in tmp_path.glob("plan-*.json")) == ["plan-a.json", "plan-c.json"]
    plan = _load(tmp_path / "plan-a.json")
    assert plan["estimate_s"] == 40 and plan["would_write"] == ["a.txt"]


def test_a_step_running_past_the_limit_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_steps, "GRACE_S", 0.05)

    def slow(plan, remaining):
        time.sleep(5)
        return {"ok": True}

    start = time.monotonic()
    steps = [Step("slow", "", lambda: Plan(run_s=0.1), slow), _step("after", FakeClock(), 0)]
    summary = Runner(str(tmp_path), 0.3, hard_stop=True, echo=lambda line: None).run(steps)
    assert time.monotonic() - start < 2
    assert summary["steps"]["slow"]["status"] == "stopped at the time limit"
    assert not summary["steps"]["slow"]["ok"]


def test_a_killed_run_keeps_the_summary_of_the_steps_that_finished(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(gpu_steps.__file__))!r})
        import gpu_steps as g
        out = {str(tmp_path)!r}
        def first(plan, left):
            open(os.path.join(out, "first.txt"), "w").write("measured")
            return {{"ok": True}}
        def killed(plan, left):
            os.kill(os.getpid(), signal.SIGKILL)
        g.Runner(out, 60, echo=lambda line: None).run(
            [g.Step("first", "", lambda: g.Plan(run_s=1), first),
             g.Step("killed", "", lambda: g.Plan(run_s=1), killed)])
    """)
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -9
    summary = _load(tmp_path / "summary.json")
    assert summary["steps"]["first"]["status"] == "ran"
    assert (tmp_path / "first.txt").read_text() == "measured"
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_gpu_check_dry_run_fits_its_budget_on_a_cpu(tmp_path, capsys):
    """The dry run touches no GPU: it plans every step, prints compiles and estimates, and writes
    the plan of each step that fits within the limit, all within the limit itself."""
    out = tmp_path / "plan"
    start = time.monotonic()
    status = gpu_check.main(["--dry-run", "--budget-s", "60", "--out-dir", str(out)])
    took = time.monotonic() - start
    assert status == 0
    assert took < 60
    summary = _load(out / "summary.json")
    assert summary["dry_run"] and summary["finished"]
    assert summary["order"][:8] == ["env", "ceilings", "pytest -m gpu", "parity", "timing",
                                    "model train", "ledger", "sanitizer"]
    planned = [n for n in summary["order"] if summary["steps"][n]["status"] == "planned"]
    assert "env" in planned
    assert summary["estimated_gpu_s"] <= 60
    for name in planned:
        plan = _load(out / summary["steps"][name]["files"][0])
        assert plan["step"] == name and plan["estimate_s"] >= 0
    for name in summary["skipped_for_time"]:
        step = summary["steps"][name]
        assert step["estimate_s"] > step["remaining_at_start_s"]
        assert not (out / f"plan-{name}.json").exists()
    assert (out / "summary.txt").exists()
    # Every step with kernels says how many distinct compiles it needs.
    assert summary["steps"]["timing"]["compiles_total"] > 0
    assert summary["steps"]["timing"]["compiles"] > 0


def test_gpu_check_arguments():
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--dry-run", "--rehearse"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--dry-run", "--skip", "nothing-by-that-name"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--dry-run", "--budget-s", "0"])
    assert exit_.value.code == 2
    assert set(gpu_check.STEP_NAMES) >= {"env", "ceilings", "sanitizer", "autotune"}


def test_the_sanitized_launches_are_rebuilt_with_their_storages_shared():
    x = torch.empty(4, 8)
    args = {"x": x, "w": x[1], "t": x.t(), "n": 3, "flag": True}
    out = kernel_smoke.on_device(args, torch.device("cpu"))
    assert out["n"] == 3 and out["flag"] is True
    for name in ("x", "w", "t"):
        assert out[name].shape == args[name].shape and out[name].stride() == args[name].stride()
        assert out[name].storage_offset() == args[name].storage_offset()
    assert out["w"].untyped_storage().data_ptr() == out["x"].untyped_storage().data_ptr()
    assert out["x"].untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert torch.equal(out["w"], out["x"][1])


def test_first_choice_launches_configs0_without_autotuning(monkeypatch):
    import triton

    from kphi3_kernels.ops import launch as L

    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda **kw: calls.append(kw)

    spec = L.KernelLaunch(name="fake", kernel=Kernel(), grid=lambda meta: (1,), args={"n": 5},
                          configs=[triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2),
                                   triton.Config({"BLOCK": 128}, num_warps=8, num_stages=3)],
                          interpreter_config=triton.Config({"BLOCK": 16}))
    monkeypatch.setattr(L, "triton_interpreting", lambda: False)
    monkeypatch.setattr(L, "FIRST_CHOICE", True)
    L.launch(spec)
    assert calls == [{"n": 5, "BLOCK": 64, "num_warps": 4, "num_stages": 2}]


def test_gpu_check_rehearsal_exercises_the_steps_on_cpu(tmp_path):
    """--rehearse: the steps' logic on the CPU, torch backend for Triton, tiny shapes (the model
    step, the full sweep and the compile report are left out here: they take the most time)."""
    out = tmp_path / "gpu"
    assert gpu_check.main(["--rehearse", "--no-compile", "--out-dir", str(out),
                           "--skip", "model train,sweep,compile report"]) == 0
    summary = _load(out / "summary.json")
    assert summary["ok"] and summary["rehearsal"] and not summary["dry_run"]
    assert {"env", "ceilings", "pytest -m gpu", "parity", "timing", "ledger"} <= set(summary["steps"])
    assert summary["steps"]["sweep"]["reason"] == "--skip"
    assert summary["steps"]["sanitizer"]["reason"] == "needs a CUDA GPU"
    assert "-m gpu" in summary["steps"]["pytest -m gpu"]["command"]
    ceilings = _load(out / "ceilings.json")
    assert ceilings["tflops"] > 0 and ceilings["gbps"] > 0
    cases = _load(out / "parity.json")["cases"]
    assert {c["op"] for c in cases} == {"gpc_io", "grouped_linear", "gpc_block"}
    assert {c["dtype"] for c in cases} == {"bf16", "fp16"}
    assert all(c["ok"] and c["worst"] < 2e-2 for c in cases)
    rows = _load(summary["steps"]["timing"]["json"])["results"]
    assert {r["provider"] for r in rows} == {"torch", "reference", "nn.Linear"}
    assert all(r["status"] == "ok" for r in rows)
    # every reference and nn.Linear row that was timed has its ledger prediction beside it,
    # predicted with the ceilings this run measured
    ledger = _load(out / "ledger-vs-measured.json")
    assert ledger["model"]["peak_tflops"] == ceilings["tflops"]
    timed = {(r["provider"], r["shape"], r["M"], r["mode"]) for r in rows
             if r["provider"] in ("reference", "nn.Linear") and r["median_ms"] is not None}
    assert {(p["provider"], p["shape"], p["M"], p["mode"]) for p in ledger["rows"]} == timed
    assert all(p["predicted_us"] > 0 and p["measured_over_predicted"] > 0 for p in ledger["rows"])


def test_the_sanitizer_step_runs_both_tools_and_writes_their_output(tmp_path, monkeypatch):
    """compute-sanitizer is found on PATH; each tool's output and summary line are kept, and a
    tool that reports errors (its --error-exitcode) fails the step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "compute-sanitizer"
    fake.write_text("#!/bin/sh\n"
                    "echo \"========= $2 of: $5 $6 $7\"\n"
                    "if [ \"$2\" = memcheck ]; then echo '========= ERROR SUMMARY: 1 error'; exit 3; fi\n"
                    "echo '========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    tool = gpu_check.find_compute_sanitizer()
    assert tool == str(fake)
    out = tmp_path / "out"
    out.mkdir()
    result = gpu_check.run_sanitizer(str(out), tool, timeout_s=30)
    assert not result["ok"]
    race, mem = result["tools"]["racecheck"], result["tools"]["memcheck"]
    assert race["ok"] and "0 hazards" in race["summary"]
    assert not mem["ok"] and mem["returncode"] == 3 and "1 error" in mem["summary"]
    assert "kphi3_bench.kernel_smoke" in (out / "sanitizer-racecheck.txt").read_text()
    assert _load(out / "sanitizer.json")["tools"]["memcheck"]["returncode"] == 3
