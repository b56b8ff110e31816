"""The MLP tail's three designs (``kphi3_bench.variants.time_mlp_tail``): what each launches on the
Triton backend, and that each computes the tail (output and gate_up gradient) like the float64
composition. Timings are never asserted."""
import pytest
import torch

from kphi3_bench import variants
from kphi3_bench.shapes import Shape
from kphi3_kernels.ops import launch

from _utils import requires_interpreter

TINY_DOWN = Shape("tiny-down", "tiny", "down", 80, 40, 16)  # G = 5, s = 16, og = 8
CPU = torch.device("cpu")


@requires_interpreter
def test_each_design_runs_its_own_launches(monkeypatch):
    designs, inputs = variants.mlp_tail_callables(TINY_DOWN, 13, torch.float32, CPU, "triton")
    seen = {}

    for name, fn in designs.items():
        names = seen[name] = []
        monkeypatch.setattr(launch, "FORCE_CONFIG", lambda spec, names=names: names.append(spec.name))
        leaves = [t.detach().requires_grad_() for t in inputs]
        fn(*leaves).sum().backward()
    # The composable form writes the layout's gradient and reads it back; the fused decoder's
    # one operator never does, and the op-level design never touches the layout.
    assert {"gpc_io_layout_bwd_dt_second", "gpc_io_layout_bwd_dt",
            "silu_mul_layout_bwd"} <= set(seen["two-operators"])
    assert not {"gpc_io_layout_bwd_dt", "silu_mul_layout_bwd"} & set(seen["one-operator"])
    assert "silu_mul_layout" in seen["one-operator"]
    assert not any("layout" in n for n in seen["op-level"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_interpreter)])
def test_time_mlp_tail_rows_agree_with_float64(backend):
    rows = variants.time_mlp_tail(CPU, torch.float32, [TINY_DOWN], [7], budget_s=0.05,
                                  backend=backend)
    assert [r["provider"] for r in rows] == list(variants.MLP_TAIL_DESIGNS)
    for r in rows:
        assert r["rel_error"] < 1e-5, r  # fp32: the contract's 1e-5 relative
        assert r["median_ms"] > 0 and r["vs_op_level"] > 0
