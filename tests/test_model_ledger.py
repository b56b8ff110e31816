"""The model-level ledger (``kphi3_bench.model_ledger``): its formulas on cases computed by hand,
its projections against the op-level ledger, and the committed result.

Nothing here runs a kernel: projections are recorded on meta tensors and the rest of the layer
is arithmetic, so these tests take the same time with or without a GPU.
"""
import json
import os
import subprocess
import sys

import pytest
from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

from kphi3_bench import ledger
from kphi3_bench import model_ledger as ML
from kphi3_bench.shapes import FAMILIES, SHAPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMITTED = os.path.join(ROOT, "benchmarks", "results", "model-ledger-2026-12-07.json")
H200 = ledger.CostModel(790.0, 4300.0, 2.0)


@pytest.fixture(scope="module")
def kphi3_train():
    return ML.train_layer(ML.CONFIGS["kphi3"], 8192, 4, "bf16", H200)


# --- The rest of the layer, by hand -----------------------------------------------------------

def test_flash_attention_by_hand():
    # B = 2 sequences of T = 8, H = 4 query heads, Hkv = 2, D = 16, bf16.
    (fwd,) = ML.flash_attention(2, 8, 4, 2, 16, "bf16", "fwd").launches
    # Causal: half of 4 * B * H * T^2 * D.
    assert fwd.flops == 2 * 2 * 4 * 8 * 8 * 16 == 16_384
    # q, o: 2 * 8 * 4 * 16 = 1024 elements; k, v: 512 each; logsumexp 2 * 4 * 8 fp32.
    assert fwd.bytes == (1024 + 512 + 512 + 1024) * 2 + 64 * 4 == 6_400
    pre, main, convert = ML.flash_attention(2, 8, 4, 2, 16, "bf16", "bwd").launches
    assert (pre.flops, pre.bytes) == (0, 2 * 1024 * 2 + 64 * 4)
    assert main.flops == 5 * 2 * 4 * 8 * 8 * 16 == 40_960   # 2.5 x the forward
    # q, k, v, do read; logsumexp, rowsum read; dk, dv written; fp32 dq accumulator written.
    assert main.bytes == (1024 + 512 + 512 + 1024) * 2 + 2 * 64 * 4 + 2 * 512 * 2 + 1024 * 4
    assert (convert.flops, convert.bytes) == (0, 1024 * 4 + 1024 * 2)
    # FA2's accounting is torch.utils.flop_counter's (non-causal) halved. The FLOPs follow the
    # query heads; k and v are given q's heads, since torch 2.11's counter refuses broadcast ones.
    q = (2, 4, 8, 16)
    assert 2 * fwd.flops == sdpa_flop_count(q, q, q)
    assert 2 * main.flops == sdpa_backward_flop_count(q, q, q, q)


def test_flash_attention_realistic_by_hand():
    from dataclasses import replace

    # The released layer's attention: 4 sequences of 2048, 20 heads of 64. Causal forward
    # 2 * B * H * T^2 * D FLOPs at FlashAttention-2's 262 TFLOP/s (head dim 64, H100 SXM),
    # the backward's main kernel 2.5x that at 264; the data passes at the copy bandwidth.
    flops = 2 * 4 * 20 * 2048 * 2048 * 64
    (fwd,) = ML.flash_attention(4, 2048, 20, 20, 64, "bf16", "fwd").launches
    pre, main, convert = ML.flash_attention(4, 2048, 20, 20, 64, "bf16", "bwd").launches
    assert fwd.flops == flops and main.flops == flops * 5 // 2
    assert H200.realistic_us(fwd) == pytest.approx(2 + flops / 262e12 * 1e6)    # 166 us
    assert H200.realistic_us(main) == pytest.approx(2 + 2.5 * flops / 264e12 * 1e6)   # 409 us
    assert H200.realistic_us(pre) == pytest.approx(H200.time_us(pre.flops, pre.bytes))
    # FlashAttention-3's figures, the second line: 371 forward, 422 backward.
    fa3 = replace(H200, attention="fa3")
    assert fa3.realistic_us(fwd) == pytest.approx(2 + flops / 371e12 * 1e6)
    assert fa3.realistic_us(main) == pytest.approx(2 + 2.5 * flops / 422e12 * 1e6)
    # Speed of light charges the GEMM peak: 790 TFLOP/s.
    assert H200.time_us(fwd.flops, fwd.bytes) == pytest.approx(2 + flops / 790e12 * 1e6)
    # Head dims without a published figure take the largest published one below (else the
    # smallest): Phi-3-mini's 96 gets 64's.
    assert ledger.attention_tflops("fa2", 96, "bwd") == 264.0
    assert ledger.attention_tflops("fa3", 32, "fwd") == 371.0


def test_layer_realistic_column(kphi3_train):
    for path, p in kphi3_train["paths"].items():
        parts = sum(c["realistic_us"] for c in p["components"].values())
        assert p["realistic_us"] == pytest.approx(parts, abs=1e-3)
        assert p["realistic_tokens_per_s"] == pytest.approx(8192 / (p["realistic_us"] * 1e-6),
                                                            rel=1e-6)
        # Attention in both columns, the same on every path: the forward at 262 TFLOP/s, the
        # backward's main kernel at 264, its preprocess and dq conversion at the copy bandwidth.
        flops = 2 * 4 * 20 * 2048 ** 2 * 64
        pre, _, convert = ML.flash_attention(4, 2048, 20, 20, 64, "bf16", "bwd").launches
        assert p["components"]["attention"]["realistic_us"] == pytest.approx(
            2 + flops / 262e12 * 1e6 + 2 + 2.5 * flops / 264e12 * 1e6
            + H200.time_us(0, pre.bytes) + H200.time_us(0, convert.bytes), abs=1e-3)
    r, t = kphi3_train["realistic_ratios"], kphi3_train["paths"]
    assert r["fused_over_dense"] == pytest.approx(
        t["fused"]["realistic_us"] / t["dense"]["realistic_us"], abs=1e-4)
    assert set(kphi3_train["realistic_fa3_ratios"]) == set(r)


def test_decode_attention_by_hand():
    # b = 3 queries, cache of 10, H = 4, Hkv = 2, D = 8: read q, the cache's k and v, write o.
    a = ML.decode_attention(3, 10, 4, 2, 8, "bf16")
    assert a.flops == 4 * 3 * 4 * 10 * 8 == 3_840
    assert a.bytes == (2 * 3 * 4 * 8 + 2 * 3 * 10 * 2 * 8) * 2 == 2_304
    assert ML.cache_update(3, 2, 8, "bf16").bytes == 4 * 3 * 2 * 8 * 2


def test_norm_rope_activation_residual_bytes_by_hand():
    # RMSNorm over 100 x 64 bf16: x, weight in; y, fp32 inverse RMS out.
    n = ML.rms_norm(100, 64, "bf16", "fwd")
    assert (n.flops, n.bytes) == (0, 100 * 64 * 2 * 2 + 64 * 2 + 100 * 4) == (0, 26_128)
    # Backward: dy, x, weight, inverse RMS in; dx, dweight out.
    assert ML.rms_norm(100, 64, "bf16", "bwd").bytes == 3 * 6400 * 2 + 2 * 64 * 2 + 400
    # RoPE of q (4 heads) and k (2 heads) of 16 at 10 tokens: q, k read and written, cos, sin read.
    assert ML.rope(10, 4, 2, 16, "bf16", "fwd").bytes == (2 * 10 * 96 + 2 * 10 * 16) * 2
    # silu(gate) * up at 10 tokens, i = 32: gate_up [10, 64] -> [10, 32]; bwd adds d(gate_up).
    assert ML.activation(10, 32, "bf16", "fwd").bytes == (640 + 320) * 2
    assert ML.activation(10, 32, "bf16", "bwd").bytes == (320 + 640 + 640) * 2
    assert ML.residual_add(10, 64, "bf16", "bwd").bytes == 3 * 640 * 2
    rest = ML.rest_of_layer(ML.CONFIGS["kphi3"], 10, "bf16", "fwd")
    assert {k: v.count for k, v in rest.items()} == {"norms": 2, "rope": 1, "activation": 1,
                                                     "residuals": 2}


# --- The projections against the op-level ledger ----------------------------------------------

def test_configs_match_the_shape_table():
    for name, cfg in ML.CONFIGS.items():
        f = FAMILIES[name]
        assert (cfg.hidden, cfg.intermediate, cfg.min_channels_per_group) == \
            (f.hidden, f.intermediate, f.min_channels_per_group)
        assert [(s.in_features, s.out_features, s.groups) for s in ML.family_shapes(cfg)] == \
            [(SHAPES[f"{name}-{op}"].in_features, SHAPES[f"{name}-{op}"].out_features,
              SHAPES[f"{name}-{op}"].groups) for op in ML.PROJECTIONS]
    c = ML.CONFIGS["kphi3"]
    assert (c.heads, c.kv_heads, c.head_dim) == (20, 20, 64)
    assert [s.groups for s in ML.family_shapes(c)] == [5, 5, 5, 20]


def _summed(fn, mode, m=8192):
    paths = [fn(ledger.Problem("gpc_io", SHAPES[f"kphi3-{op}"], m, "bf16"), mode)
             for op in ML.PROJECTIONS]
    return {"launches": sum(p.count for p in paths), "flops": sum(p.flops for p in paths),
            "bytes": sum(p.bytes for p in paths),
            "time_us": pytest.approx(sum(p.time_us(H200) for p in paths), abs=1e-3),
            "realistic_us": pytest.approx(sum(p.realistic_us(H200) for p in paths), abs=1e-3)}


@pytest.mark.parametrize("path,fn", [("dense", ledger.dense_launches),
                                     ("triton", ledger.triton_launches)])
def test_projections_equal_the_op_level_ledger(kphi3_train, path, fn):
    got = kphi3_train["paths"][path]["components"]["projections"]
    for mode in ("fwd", "bwd"):
        assert got[mode] == _summed(fn, mode)


def test_decode_projections_equal_the_op_level_ledger():
    row = ML.decode_layer(ML.CONFIGS["kphi3"], 16, 2048, "bf16", H200)
    assert row["paths"]["triton"]["components"]["projections"]["fwd"] == \
        _summed(ledger.triton_launches, "fwd", 16)
    assert set(row["paths"]["dense"]["components"]["projections"]) == \
        {"fwd", "time_us", "realistic_us"}


def test_layer_totals_add_up(kphi3_train):
    for path, p in kphi3_train["paths"].items():
        parts = sum(c["time_us"] for c in p["components"].values())
        assert p["time_us"] == pytest.approx(parts, abs=1e-3)
        assert p["tokens_per_s"] == pytest.approx(8192 / (p["time_us"] * 1e-6), rel=1e-6)
        rest = sum(p["components"][name]["time_us"] for name in ML.REST)
        assert p["rest_us"] == pytest.approx(rest, abs=1e-3)
    # The rest of the layer is the same on every path; only the projections differ.
    comps = [p["components"] for p in kphi3_train["paths"].values()]
    assert all(c["attention"] == comps[0]["attention"] for c in comps)
    r = kphi3_train["ratios"]
    t = {k: v["time_us"] for k, v in kphi3_train["paths"].items()}
    assert r["triton_over_dense"] == pytest.approx(t["triton"] / t["dense"], abs=1e-4)


# --- Command line and committed result --------------------------------------------------------

def test_help_says_predictions_and_does_not_import_torch():
    code = ("import sys; from kphi3_bench import model_ledger as m; "
            "text = m.build_parser().format_help(); print(text); "
            "assert 'torch' not in sys.modules, 'importing the model ledger imported torch'")
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True,
                         text=True).stdout
    flat = " ".join(out.split())
    assert "predictions from FLOP and byte counts, not measurements" in flat
    assert "--tokens" in out and "--json" in out and "--markdown" in out
    with pytest.raises(SystemExit) as exc:
        ML.main(["--help"])
    assert exc.value.code == 0


def test_main_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "m.json", tmp_path / "m.md"
    assert ML.main(["--families", "kphi3", "--tokens", "256", "--batch", "2",
                    "--decode-batches", "1", "--json", str(out), "--markdown", str(md)]) == 0
    printed = capsys.readouterr().out
    assert "a prediction, not a measurement" in printed and "triton" in printed
    data = json.loads(out.read_text())
    assert data["schema"] == ML.SCHEMA
    assert [(r["task"], r["tokens"]) for r in data["train"] + data["decode"]] == \
        [("train", 256), ("decode", 1)]
    assert "not a measurement" in md.read_text()
    assert ML.main(["--families", "nope"]) == 2
    assert ML.main(["--tokens", "100", "--batch", "3"]) == 2
    assert "error" in capsys.readouterr().err


def test_the_ledger_with_model_is_the_model_ledger(tmp_path, capsys):
    """``python -m kphi3_bench.ledger --model`` and its former name write the same result."""
    argv = ["--families", "kphi3", "--tokens", "256", "--batch", "2", "--decode-batches", "1",
            "--quiet", "--out"]
    assert ledger.main(["--model"] + argv + [str(tmp_path / "a.json")]) == 0
    assert ML.main(argv + [str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    # Each records the command that wrote it.
    assert a.pop("command").startswith("python -m kphi3_bench.ledger --model --families kphi3")
    assert b.pop("command").startswith("python -m kphi3_bench.model_ledger --families kphi3")
    assert a == b
    assert ledger.main(["--model", "--families", "nope"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err


def test_committed_model_ledger_matches_the_code():
    with open(COMMITTED) as f:
        committed = json.load(f)
    fresh = json.loads(ML.dump_json(ML.build()))
    assert committed.pop("command") == "python -m kphi3_bench.model_ledger --json " \
        "benchmarks/results/model-ledger-2026-12-07.json --markdown " \
        "benchmarks/results/model-ledger-2026-12-07.md"
    assert fresh == committed, (
        "the committed model ledger is stale: regenerate it with python -m "
        "kphi3_bench.model_ledger --json benchmarks/results/model-ledger-<date>.json "
        "--markdown benchmarks/results/model-ledger-<date>.md")
