"""pytest-benchmark suite at model level: a training step and a short ``generate`` per variant.

    pytest benchmarks/test_bench_model.py --benchmark-only

Small sizes (the released KPhi-3 widths, 2 layers, a 64-token batch, 8 generated tokens) so that
it runs on a CPU too; ``python -m kphi3_bench.model_bench`` has the full-size measurement.
"""
import pytest
import torch

from kphi3_bench import model_bench

pytest.importorskip("kphi3_model", reason="the model benchmark needs the kphi3_model package")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SIZES = model_bench.ModelSizes(family="kphi3", layers=2, batch=1, seq=64, gen_batch=1, prompt=8,
                               new_tokens=8, steps=2)


@pytest.fixture(params=model_bench.VARIANTS)
def model(request):
    variant = request.param
    if variant in ("kphi3-triton", "kphi3-fused") and DEVICE.type != "cuda":
        pytest.skip("needs a GPU")
    built = model_bench.build_model(variant, SIZES, DTYPE, DEVICE)
    built.variant = variant
    yield built
    del built


def _ids(batch, length):
    return torch.randint(0, 32000, (batch, length), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def test_train_step(benchmark, model):
    ids = _ids(SIZES.batch, SIZES.seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync()

    step()  # warm-up: AdamW allocates its state
    benchmark.group = f"train step {SIZES.batch}x{SIZES.seq} tokens"
    benchmark.extra_info.update(variant=model.variant, tokens=SIZES.batch * SIZES.seq)
    benchmark.pedantic(step, rounds=3, iterations=1)


def test_generate(benchmark, model):
    prompt = _ids(SIZES.gen_batch, SIZES.prompt)
    model.eval()

    def generate():
        model.generate(prompt, max_new_tokens=SIZES.new_tokens, min_new_tokens=SIZES.new_tokens,
                       do_sample=False, pad_token_id=32000)
        _sync()

    generate()  # warm-up
    benchmark.group = f"generate {SIZES.new_tokens} tokens after {SIZES.prompt}"
    benchmark.extra_info.update(variant=model.variant, tokens=SIZES.gen_batch * SIZES.new_tokens)
    benchmark.pedantic(generate, rounds=3, iterations=1)


def test_compiled_rows_on_a_tiny_model(monkeypatch, tmp_path):
    """``--compile`` adds the compiled counterpart of each variant: timed after its compiled logits
    matched eager, with the first call (compile included) recorded. ``aot_eager`` keeps this fast;
    the command line defaults to Inductor."""
    import json

    monkeypatch.setitem(model_bench.MODEL_FAMILIES, "tiny",
                        model_bench.ModelFamily(80, 320, 16, heads=4, vocab=128, pad_token_id=127))
    out = tmp_path / "model.json"
    status = model_bench.main(["--family", "tiny", "--layers", "1", "--batch", "1", "--seq", "8",
                               "--prompt", "4", "--new-tokens", "3", "--steps", "2", "--device", "cpu",
                               "--variants", "kphi3-torch,phi3-dense", "--compile",
                               "--compile-backend", "aot_eager", "--out", str(out), "--no-progress"])
    assert status == 0
    payload = json.loads(out.read_text())
    rows = {(r["variant"], r["task"]): r for r in payload["results"]}
    variants = ("kphi3-torch", "phi3-dense", "kphi3-torch+compile", "phi3-dense+compile")
    assert set(rows) == {(v, t) for v in variants for t in model_bench.TASKS}
    for variant in variants:
        for task in model_bench.TASKS:
            r = rows[variant, task]
            assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["first_call_s"] > 0, r
            assert r["compile_backend"] == ("aot_eager" if variant.endswith("+compile") else "")
    assert "compiled vs eager" in rows["kphi3-torch+compile", "train"]["parity"]
    assert rows["phi3-dense+compile", "train"]["speedup_vs_dense"] == pytest.approx(1.0)
    assert "fullgraph=True" in payload["meta"]["compile"]
    # Unknown names are refused, compiled ones are known.
    assert model_bench.main(["--variants", "kphi3-torch+jit", "--no-progress"]) == 2
