"""pytest-benchmark suite of the IO block: every provider at a few representative shapes.

    pytest benchmarks --benchmark-only                          # run
    pytest benchmarks --benchmark-only --benchmark-autosave     # save under .benchmarks/
    pytest benchmarks --benchmark-only --benchmark-compare      # compare with the last save

Each test checks parity with the float64 reference first and fails (untimed) when it does not
hold; nn.Linear, a different function, is only timed. Groups are one shape, M, mode and dtype,
so pytest-benchmark's table compares the providers side by side. On a machine without CUDA the
Triton provider is skipped ("needs a GPU"), never run through the interpreter.
"""
import pytest
import torch

from kphi3_bench import parity, providers, shapes
from kphi3_bench.sweep import InputSet

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# G = 5 and G = 20 at the released shapes; decode (16) and prefill/training token counts: 2048
# on a GPU, 256 on a CPU (the sizes of `kphi3-bench --quick`; 2048 takes minutes on 2 cores).
LARGE_M = 2048 if DEVICE.type == "cuda" else 256
POINTS = [("kphi3-qkv", 16), ("kphi3-qkv", LARGE_M), ("kphi3-down", 16), ("kphi3-down", LARGE_M)]
MODES = ("fwd", "fwd+bwd")
PROVIDERS = providers.default_providers()  # one torch.compile provider: its compiles are reused


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name,M", POINTS, ids=[f"{s}-M{m}" for s, m in POINTS])
@pytest.mark.parametrize("provider_name", list(PROVIDERS))
def test_gpc_io(benchmark, provider_name, shape_name, M, mode):
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable(DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(reason)
    shape = shapes.SHAPES[shape_name]
    inputs = InputSet(shape, M, DTYPE, DEVICE, torch.Generator(device=DEVICE).manual_seed(0))
    weights = inputs.params(provider)
    fn = provider.bind(shape, weights)
    if provider.dense:
        verdict = parity.DENSE_BASELINE
    else:
        oracle = parity.Oracle(inputs.x, weights, inputs.dy)
        check = parity.check(fn, inputs.x, weights, inputs.dy, oracle, parity.tolerance(DTYPE),
                             grads=mode != "fwd")
        verdict = check.describe(mode)
        assert check.ok_for(mode), f"{provider_name} fails parity, not timed: {verdict}"

    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn(inputs.x)
            _sync()
    else:
        leaves = inputs.leaves()

        def call():
            for t in leaves:
                t.grad = None
            fn(inputs.x).backward(inputs.dy)
            _sync()

    for _ in range(2):  # warm-up, not timed (torch.compile compiles here)
        call()
    benchmark.group = f"{shape_name} ({shape.describe()}) M={M} {mode} {shapes.dtype_name(DTYPE)}"
    benchmark.extra_info.update(
        provider=provider_name, shape=shape_name, M=M, mode=mode, dtype=shapes.dtype_name(DTYPE),
        flops=shapes.flops(shape, M, mode, provider.dense),
        params=shapes.params(shape, provider.dense), parity=verdict)
    benchmark(call)
