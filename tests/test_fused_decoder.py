"""The fused decoder: the MLP activation writing down_proj's input in the block-residue layout,
and the IO block reading it (``kphi3_kernels.fused``, ``ops/triton_fused.py``, ``ops/rowwise.py``),
op by op against the float64 oracle and in the model against the op-level path.

The oracle of the fused pair is the op-level composition it replaces:
``gpc_io(up * silu(gate), W1, W2, b1, b2)`` in float64 (``reference.gpc_io``).
"""
import dataclasses
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

from kphi3_kernels import fused, layout, reference
from kphi3_kernels.ops import launch, outputs

from _utils import (DEVICE, FP32_TOL, INTERPRETING, check_parity, fused_model_failures,
                    rel_error, rounded_intermediate_bound)

requires_triton = pytest.mark.skipif(
    not (INTERPRETING or torch.cuda.is_available()),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
DTYPES = [torch.float32, torch.float16]


def on_backend(backend: str) -> str:
    """How ``explain_fused_decoder`` names the backend a fused part runs on."""
    return "on the Triton kernels" if backend == "triton" else "on the torch backend"


@dataclasses.dataclass
class MlpCase:
    G: int
    s: int            # input channels per group of down_proj
    og: int           # output channels per group
    lead: Tuple[int, ...]
    sliced: bool = False   # gate_up with column stride 2
    bias: bool = False

    def __str__(self):
        return (f"G{self.G}-s{self.s}-og{self.og}-{'x'.join(map(str, self.lead))}"
                f"{'-sliced' if self.sliced else ''}{'-bias' if self.bias else ''}")


CASES = [
    MlpCase(5, 12, 7, (13,), bias=True),          # R = 8 > ceil(12/5) = 3
    MlpCase(3, 10, 5, (2, 9)),                    # higher rank
    MlpCase(20, 24, 6, (7,), sliced=True),        # G = 20, non-contiguous gate_up
    MlpCase(8, 15, 6, (3, 5), bias=True),         # s not a multiple of G
    MlpCase(2, 36, 20, (70,)),                    # R = 24: several runs per K tile
    MlpCase(1, 16, 8, (5,), bias=True),           # G = 1: the layout is the input padded
    MlpCase(13, 13, 3, (1,)),                     # one row, s = G
]


def _operands(case: MlpCase, dtype: torch.dtype, device: str = DEVICE):
    C = case.G * case.s
    if case.sliced:
        base = torch.randn(*case.lead, 4 * C, device=device).to(dtype).requires_grad_(True)
        gu = base[..., ::2]
    else:
        gu = torch.randn(*case.lead, 2 * C, device=device).to(dtype).requires_grad_(True)
    scale = C ** -0.5
    w1 = (torch.randn(case.G, case.s, case.og, device=device) * scale).to(dtype).requires_grad_(True)
    w2 = (torch.randn(case.G, case.s, case.og, device=device) * scale).to(dtype).requires_grad_(True)
    b1 = b2 = None
    if case.bias:
        b1 = (torch.randn(case.G, case.og, device=device) * 0.5).to(dtype).requires_grad_(True)
        b2 = (torch.randn(case.G, case.og, device=device) * 0.5).to(dtype).requires_grad_(True)
    return gu, w1, w2, b1, b2


def _oracle(gu, w1, w2, b1, b2):
    gate, up = gu.chunk(2, dim=-1)
    return reference.gpc_io(up * F.silu(gate), w1, w2, b1, b2)


def _composed(gu, w1, w2, b1, b2, backend):
    t = fused.silu_mul_to_layout(gu, w1.shape[0], backend=backend)
    return fused.gpc_io_from_layout(t, w1, w2, b1, b2, backend=backend)


def _one_operator(gu, w1, w2, b1, b2, backend):
    return fused.silu_mul_gpc_io(gu, w1, w2, b1, b2, backend=backend)


# The producer and consumer of the layout as two operators, and the MLP tail as one.
FUSIONS = {"layout_ops": _composed, "mlp_tail": _one_operator}


def _dt_second_term(inputs64, dy64):
    """The part of the input gradient that the kernels round once (the term through W2)."""
    gu, w1, w2, _, _ = inputs64
    (dgu,) = torch.autograd.grad(_oracle(gu, torch.zeros_like(w1), w2, None, None), [gu], dy64)
    return dgu


def check_fused(case: MlpCase, backend: str, dtype: torch.dtype, fusion: str = "layout_ops"):
    """Output and every gradient of a fusion against the float64 oracle."""
    fn = FUSIONS[fusion]
    inputs = _operands(case, dtype)
    gu, w1 = inputs[0], inputs[1]
    dy = torch.randn(*gu.shape[:-1], w1.shape[0] * w1.shape[2], device=gu.device).to(dtype)
    names = ["y", "gate_up", "weight1", "weight2", "bias1", "bias2"][:1 + _tensors(inputs)]

    def rounded_dxi(inputs64, douts, want):
        # The composed pair's input gradient on Triton: its layout gradient rounds its second
        # term once before the sum (docs/numerics.md, "Rounded intermediates"), so it meets that
        # rounding bound. The MLP tail sums both terms in one accumulator: no such rounding.
        term = _dt_second_term(inputs64, douts[0].double())
        return {"gate_up": rounded_intermediate_bound(dtype, want["gate_up"], term)}

    baseline = (lambda *a: fn(*a, "torch")) if backend == "triton" else _oracle
    rounds = backend == "triton" and fusion == "layout_ops"
    got = check_parity(f"{case}/{backend}/{dtype}", lambda *a: fn(*a, backend), _oracle,
                       baseline, inputs, [dy], names, {n: dtype for n in names},
                       rounded_dxi if rounds else None)
    assert all(g.dtype == dtype for g in got.values())


def _tensors(inputs) -> int:
    return sum(isinstance(t, torch.Tensor) for t in inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fused_mlp_down_matches_the_float64_oracle(case, fusion, backend, dtype):
    check_fused(case, backend, dtype, fusion)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_padding_is_written_as_zeros_and_never_read(backend):
    """Outputs start poisoned (NaN): the producer must write every padding slot (zero), the
    layout's gradient too; finite garbage placed in the padding changes nothing downstream."""
    G, s, og = 5, 12, 7
    gu = torch.randn(11, 2 * G * s, device=DEVICE)
    t = fused.silu_mul_to_layout(gu, G, backend=backend)
    slots = layout.residue_slots(G * s, G, device=DEVICE)
    padding = torch.ones(t.shape[-1], dtype=torch.bool, device=DEVICE)
    padding[slots] = False
    assert padding.any() and torch.equal(t[:, padding], torch.zeros_like(t[:, padding]))
    w1 = torch.randn(G, s, og, device=DEVICE)
    w2 = torch.randn(G, s, og, device=DEVICE)
    y = fused.gpc_io_from_layout(t, w1, w2, backend=backend)
    garbage = t.clone()
    garbage[:, padding] = 1e3
    y_garbage = fused.gpc_io_from_layout(garbage, w1, w2, backend=backend)
    assert torch.equal(y, y_garbage)
    t_leaf = t.clone().requires_grad_(True)
    (dt,) = torch.autograd.grad(fused.gpc_io_from_layout(t_leaf, w1, w2, backend=backend),
                                [t_leaf], torch.randn_like(y))
    assert torch.equal(dt[:, padding], torch.zeros_like(dt[:, padding]))
    assert torch.isfinite(dt).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_consumer_equals_gpc_io_on_the_converted_input(backend):
    G, s, og = 4, 30, 9
    x = torch.randn(3, 8, G * s, device=DEVICE)
    w1, w2 = torch.randn(G, s, og, device=DEVICE), torch.randn(G, s, og, device=DEVICE)
    for pad in (8, 1, 16):
        t = layout.to_residue_layout(x, G, pad)
        y = fused.gpc_io_from_layout(t, w1, w2, backend=backend)
        assert rel_error(y, reference.gpc_io(x, w1, w2)) < FP32_TOL


def _layout_gpu_configs():
    from kphi3_kernels.ops.grouped_gemm import CUDA_CONFIGS

    return list(CUDA_CONFIGS)


@pytest.mark.skipif(not INTERPRETING, reason="forces configs through Triton's interpreter")
@pytest.mark.parametrize("config", _layout_gpu_configs(),
                         ids=lambda c: "{BLOCK_P}x{BLOCK_Q}x{BLOCK_K}".format(**c.kwargs)
                         + f"-w{c.num_warps}s{c.num_stages}")
def test_every_gpu_config_of_the_layout_gemms_interpreted(config, monkeypatch):
    """Each config the autotuner may pick, on shapes with partial tiles in every dimension:
    M = 130 rows (P of fwd / dt, K of dW), og = 70 (Q of fwd / dW, K of dt), G*R = 2*72 = 144
    (K of fwd, Q of dt, P of dW; R = 72 is not a multiple of BLOCK_K). The MLP tail's d(gate_up)
    also on G = 7 with R = 8 (G*R = 56): its tiles meet up to 5 residues, the last one cut."""
    forced = []

    def force(spec):
        if not spec.name.startswith(("gpc_io_layout", "mlp_tail")):
            return None
        forced.append(spec.name)
        return config

    monkeypatch.setattr(launch, "FORCE_CONFIG", force)
    for fusion in FUSIONS:
        check_fused(MlpCase(2, 140, 70, (130,), bias=True), "triton", torch.float32, fusion)
    check_fused(MlpCase(7, 20, 9, (67,)), "triton", torch.float32, "mlp_tail")
    assert set(forced) == {"gpc_io_layout_fwd", "gpc_io_layout_bwd_dt_second",
                           "gpc_io_layout_bwd_dt", "gpc_io_layout_bwd_dw",
                           "mlp_tail_bwd_dgate_up"}


@requires_triton
@pytest.mark.parametrize("fusion", FUSIONS)
def test_weight_gradients_alone_and_frozen_weights(fusion):
    fn = FUSIONS[fusion]
    G, s, og = 5, 12, 7
    gu = torch.randn(9, 2 * G * s, device=DEVICE)
    w1 = torch.randn(G, s, og, device=DEVICE, requires_grad=True)
    w2 = torch.randn(G, s, og, device=DEVICE)
    dy = torch.randn(9, G * og, device=DEVICE)
    for frozen_input in (True, False):
        x = gu.clone().requires_grad_(not frozen_input)
        targets = [w1] + ([] if frozen_input else [x])
        got = torch.autograd.grad(fn(x, w1, w2, None, None, "triton"), targets, dy)
        want = torch.autograd.grad(fn(x, w1, w2, None, None, "torch"), targets, dy)
        assert all(rel_error(a, b) < FP32_TOL for a, b in zip(got, want))
    with torch.no_grad():  # inference: no layout saved for a backward, same values
        assert rel_error(fn(gu, w1, w2, None, None, "triton"),
                         fn(gu, w1, w2, None, None, "torch")) < FP32_TOL


def test_bad_input_is_refused_before_any_launch():
    G, s, og = 5, 12, 7
    w = torch.randn(G, s, og)
    with pytest.raises(ValueError, match="even"):
        fused.silu_mul_to_layout(torch.randn(3, 2 * G * s + 1), G)
    with pytest.raises(ValueError, match="multiple of groups"):
        fused.silu_mul_to_layout(torch.randn(3, 2 * 61), G)
    with pytest.raises(TypeError, match="floating-point"):
        fused.silu_mul_to_layout(torch.ones(3, 2 * G * s, dtype=torch.long), G)
    with pytest.raises(ValueError, match="G\\*G\\*R"):
        fused.gpc_io_from_layout(torch.randn(3, G * s), w, w)
    with pytest.raises(ValueError, match="R >= ceil"):
        fused.gpc_io_from_layout(torch.randn(3, G * G * 2), w, w)
    with pytest.raises(ValueError, match="one shape"):
        fused.gpc_io_from_layout(torch.randn(3, G * G * 8), w, torch.randn(G, s, og + 1))
    with pytest.raises(TypeError, match="dtype"):
        fused.gpc_io_from_layout(torch.randn(3, G * G * 8, dtype=torch.float64), w, w)


# --------------------------------------------------------------------------------------------
# RMSNorm fused with the IO block after it
# --------------------------------------------------------------------------------------------

NORM_CASES = [
    MlpCase(5, 12, 7, (13,), bias=True),
    MlpCase(3, 10, 5, (2, 9), sliced=True),
    MlpCase(20, 24, 6, (7,)),
    MlpCase(8, 15, 6, (3, 5), bias=True),
    MlpCase(2, 36, 20, (70,), sliced=True),
    MlpCase(1, 16, 8, (5,)),
]


def _norm_operands(case: MlpCase, dtype: torch.dtype):
    C = case.G * case.s
    if case.sliced:
        base = torch.randn(*case.lead, 2 * C, device=DEVICE).to(dtype).requires_grad_(True)
        x = base[..., ::2]
    else:
        x = (torch.randn(*case.lead, C, device=DEVICE) * 3).to(dtype).requires_grad_(True)
    norm_weight = (1 + 0.5 * torch.randn(C, device=DEVICE)).to(dtype).requires_grad_(True)
    _, w1, w2, b1, b2 = _operands(case, dtype)
    return x, norm_weight, w1, w2, b1, b2


def _norm_oracle(x, norm_weight, w1, w2, b1, b2, eps=1e-5):
    xn = norm_weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return reference.gpc_io(xn, w1, w2, b1, b2)


def _norm_fused(x, norm_weight, w1, w2, b1, b2, backend, layout="block-residue"):
    return fused.rms_norm_gpc_io(x, norm_weight, 1e-5, w1, w2, b1, b2, layout=layout,
                                 backend=backend)


def check_norm_fused(case: MlpCase, backend: str, dtype: torch.dtype,
                     layout: str = "block-residue"):
    inputs = _norm_operands(case, dtype)
    x, w1 = inputs[0], inputs[2]
    dy = torch.randn(*x.shape[:-1], w1.shape[0] * w1.shape[2], device=DEVICE).to(dtype)
    names = ["y", "x", "norm_weight", "weight1", "weight2", "bias1", "bias2"][:1 + _tensors(inputs)]

    def rounded_dn(inputs64, douts, want):
        # The block's input gradient rounds its W2 term once (as the op-level IO block); the
        # norm's backward is linear in that gradient, so x's and the norm weight's gradients
        # carry the same relative bound.
        x64, nw64, w164, w264 = inputs64[:4]
        only2 = torch.autograd.grad(_norm_oracle(x64, nw64, torch.zeros_like(w164), w264,
                                                 None, None), [x64, nw64], douts[0].double())
        return {n: rounded_intermediate_bound(dtype, want[n], term)
                for n, term in zip(("x", "norm_weight"), only2)}

    baseline = (lambda *a: _norm_fused(*a, "torch")) if backend == "triton" else _norm_oracle
    got = check_parity(f"{case}/{backend}/{dtype}/{layout}",
                       lambda *a: _norm_fused(*a, backend, layout), _norm_oracle, baseline,
                       inputs, [dy], names, {n: dtype for n in names},
                       rounded_dn if backend == "triton" else None)
    assert all(g.dtype == dtype for g in got.values())


# Both backends have both heads (the torch one composes the same operators in PyTorch).
NORM_BACKEND_LAYOUTS = [("torch", "block-residue"), ("torch", "split"),
                        pytest.param("triton", "block-residue", marks=requires_triton),
                        pytest.param("triton", "split", marks=requires_triton)]


@pytest.mark.parametrize("backend,layout", NORM_BACKEND_LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_fused_norm_and_io_block_match_the_float64_oracle(case, dtype, backend, layout):
    check_norm_fused(case, backend, dtype, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["block-residue", "split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", NORM_CASES[:4], ids=str)
def test_norm_head_with_the_residual_add_matches_the_float64_oracle(case, dtype, layout, backend):
    """``(h, y) = rms_norm_gpc_io(x, ..., residual=r)``: ``h = r + x`` as ``+`` rounds it, ``y``
    the block of RMSNorm(h); gradients reach both from both outputs (h is the residual stream,
    used again later)."""
    x, norm_weight, w1, w2, b1, b2 = _norm_operands(case, dtype)
    r = (torch.randn(x.shape, device=DEVICE) * 2).to(dtype).requires_grad_(True)
    biases = [b for b in (b1, b2) if b is not None]
    inputs = [x, r, norm_weight, w1, w2] + biases
    names = ["h", "y", "x", "residual", "norm_weight", "weight1", "weight2",
             "bias1", "bias2"][:2 + len(inputs)]

    def run(backend):
        def fn(x, r, nw, w1, w2, *biases):
            b = list(biases) + [None] * (2 - len(biases))
            return fused.rms_norm_gpc_io(x, nw, 1e-5, w1, w2, *b, residual=r, layout=layout,
                                         backend=backend)
        return fn

    def oracle(x, r, nw, w1, w2, *biases):
        b = list(biases) + [None] * (2 - len(biases))
        h = r + x
        return h, _norm_oracle(h, nw, w1, w2, *b)

    def rounded_dn(inputs64, douts, want):
        # The head rounds its block's input gradient's W2 term once (as check_norm_fused); the
        # stream's gradient joins it in fp32, so the term through W2 alone is what is rounded.
        x64, r64, nw64, w164, w264 = inputs64[:5]
        _, y_only2 = oracle(x64, r64, nw64, torch.zeros_like(w164), w264)
        only2 = torch.autograd.grad(y_only2, [x64, r64, nw64], douts[1].double())
        return {n: rounded_intermediate_bound(dtype, want[n], term)
                for n, term in zip(("x", "residual", "norm_weight"), only2)}

    dh, dy = torch.randn_like(x), torch.randn(*x.shape[:-1], w1.shape[0] * w1.shape[2],
                                              device=DEVICE).to(dtype)
    triton = backend == "triton"
    got = check_parity(f"{case}/{dtype}/{layout}/{backend}/residual", run(backend), oracle,
                       run("torch") if triton else oracle, inputs, [dh, dy], names,
                       {n: dtype for n in names}, rounded_dn if triton else None)
    assert torch.equal(got["h"], r + x) and got["h"].dtype == dtype == got["y"].dtype
    assert torch.equal(got["x"], got["residual"])  # one gradient for both addends
    # Only h used: its gradient alone, no norm or block launch needed.
    h, _ = run(backend)(*inputs)
    gx, gr = torch.autograd.grad(h, [x, r], dh)
    assert torch.equal(gx, dh) and torch.equal(gr, dh)


@pytest.mark.skipif(not INTERPRETING, reason="forces configs through Triton's interpreter")
@pytest.mark.parametrize("config", _layout_gpu_configs(),
                         ids=lambda c: "{BLOCK_P}x{BLOCK_Q}x{BLOCK_K}".format(**c.kwargs)
                         + f"-w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("layout", ["block-residue", "split"])
def test_every_gpu_config_of_the_norm_head_interpreted(config, layout, monkeypatch):
    forced = []
    gemms = {"block-residue": {"gpc_io_layout_fwd", "gpc_io_layout_bwd_dw"},
             "split": {"gpc_io_fwd", "gpc_io_bwd_dw"}}[layout]

    def force(spec):
        if spec.name not in gemms and not spec.name.startswith("norm_io"):
            return None
        forced.append(spec.name)
        return config

    monkeypatch.setattr(launch, "FORCE_CONFIG", force)
    check_norm_fused(MlpCase(2, 140, 70, (130,), bias=True), "triton", torch.float32, layout)
    assert set(forced) == gemms | {"norm_io_bwd_dxi", "norm_io_bwd_dxn"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_norm_under_autocast_keeps_the_norm_in_fp32(backend):
    """Under autocast the norm reads fp32 x and weight; the block computes in the autocast
    dtype; gradients come back in each parameter's dtype, as with RMSNorm + autocast block."""
    G, s, og = 5, 12, 7
    inputs = [torch.randn(9, G * s, device=DEVICE, requires_grad=True),
              torch.randn(G * s, device=DEVICE, requires_grad=True),
              torch.randn(G, s, og, device=DEVICE, requires_grad=True),
              torch.randn(G, s, og, device=DEVICE, requires_grad=True)]
    names = ["y", "x", "norm_weight", "weight1", "weight2"]
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    half = torch.float16 if DEVICE == "cpu" else torch.bfloat16

    def run(backend):
        def fn(x, nw, w1, w2):
            with torch.autocast(device_type, dtype=half):
                return fused.rms_norm_gpc_io(x, nw, 1e-5, w1, w2, backend=backend)
        return fn

    def oracle(x, nw, w1, w2):
        # float64 on the values autocast gives the block: its weights rounded to the half dtype.
        return _norm_oracle(x, nw, _rounded_to(w1, half), _rounded_to(w2, half), None, None)

    def rounded_dn(inputs64, douts, want):
        x64, nw64, w164, w264 = inputs64
        only2 = torch.autograd.grad(oracle(x64, nw64, torch.zeros_like(w164), w264),
                                    [x64, nw64], douts[0].double())
        return {n: rounded_intermediate_bound(half, want[n], term)
                for n, term in zip(("x", "norm_weight"), only2)}

    def plain(x, nw, w1, w2):
        # RMSNorm (Phi-3's module) followed by the plain block, under the same autocast.
        with torch.autocast(device_type, dtype=half):
            n = nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
            return reference.gpc_io(n.to(half), w1.to(half), w2.to(half))

    dy = torch.randn(9, G * og, device=DEVICE)
    triton = backend == "triton"
    got = check_parity(f"rms_norm_gpc_io under autocast/{backend}", run(backend), oracle,
                       run("torch") if triton else plain, inputs, [dy], names,
                       {n: half for n in names}, rounded_dn if triton else None)
    assert got["y"].dtype == half
    assert [got[n].dtype for n in names[1:]] == [torch.float32] * 4


def _rounded_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` rounded to ``dtype`` and back, its gradient passed through unrounded."""
    return t + (t.detach().to(dtype).to(t.dtype) - t.detach())


def test_fused_norm_refuses_bad_input():
    G, s, og = 5, 12, 7
    w = torch.randn(G, s, og)
    with pytest.raises(ValueError, match="norm_weight must have shape"):
        fused.rms_norm_gpc_io(torch.randn(3, G * s), torch.randn(G * s + 1), 1e-5, w, w)
    with pytest.raises(ValueError, match="take 60 channels"):
        fused.rms_norm_gpc_io(torch.randn(3, G * s + 2), torch.randn(G * s), 1e-5, w, w)
    with pytest.raises(ValueError, match="eps"):
        fused.rms_norm_gpc_io(torch.randn(3, G * s), torch.randn(G * s), -1.0, w, w)


# --------------------------------------------------------------------------------------------
# In the model
# --------------------------------------------------------------------------------------------


# Two small models. "padded": down_proj 120 -> 48 in G = 8 groups of s = 15 (not a power of
# two, s not a multiple of G); qkv_proj and gate_up_proj (G = 4, s = 12) have a padded layout,
# so only the MLP tail is fused. "unpadded": every block's layout adds no channel (G = 2,
# s = 32 for qkv_proj and gate_up_proj, s = 48 for down_proj), so the norms are fused too.
WIDTHS = {
    "padded": dict(hidden_size=48, intermediate_size=120, min_channels_per_group=12),
    "unpadded": dict(hidden_size=64, intermediate_size=96, min_channels_per_group=32),
}
# Fusions that run, over two layers, five each: the two norm heads (block-residue layout where it
# adds no channel, else split), the MLP tail, the attention's residual add (in the norm head) and
# the MLP's (in down_proj's epilogue); the input norm runs inside its head.
FUSED_COUNT = {"padded": 10, "unpadded": 10}


def _config(widths="padded", **over):
    from kphi3_model import KPhi3Config

    kw = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
              eos_token_id=2, bos_token_id=1, max_position_embeddings=64,
              original_max_position_embeddings=64, **WIDTHS[widths])
    kw.update(over)
    return KPhi3Config(**kw)


def _model(dtype=torch.float32, widths="padded", **over):
    from kphi3_model import KPhi3ForCausalLM

    torch.manual_seed(0)
    model = KPhi3ForCausalLM(_config(widths, **over)).to(DEVICE, dtype)
    # Larger weights than the initializer's, so every path carries signal through both layers.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def _loss_and_grads(model, batch, fused_decoder: bool, autocast: Optional[torch.dtype] = None):
    """Logits, loss and every parameter's gradient; the forward under ``autocast`` if given."""
    model.config.fused_decoder = fused_decoder
    model.zero_grad(set_to_none=True)
    device_type = "cuda" if DEVICE == "cuda" else "cpu"
    with torch.autocast(device_type, dtype=autocast or torch.float16, enabled=autocast is not None):
        out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.detach().clone()
                                                     for n, p in model.named_parameters()}


def _batch(left_padded: bool = True):
    ids = torch.randint(3, 97, (3, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    if left_padded:
        mask[0, :4] = 0
        mask[1, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_fused_model_matches_the_op_level_model_and_the_float64_oracle(dtype, widths, backend):
    """The fused plan on either backend (on torch, the fused operators composed in PyTorch)
    against the op-level model and the float64 oracle."""
    check_fused_model(dtype, widths, backend)


# bf16: only on CUDA (the interpreter's bf16 tl.dot is wrong, docs/numerics.md).
@pytest.mark.gpu
@pytest.mark.parametrize("widths", WIDTHS)
def test_fused_model_bf16_cuda(widths):
    check_fused_model(torch.bfloat16, widths)


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("case", CASES[::2], ids=str)
def test_fused_mlp_down_bf16_cuda(case, fusion):
    check_fused(case, "triton", torch.bfloat16, fusion)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["block-residue", "split"])
@pytest.mark.parametrize("case", NORM_CASES[::2], ids=str)
def test_fused_norm_head_bf16_cuda(case, layout):
    check_norm_fused(case, "triton", torch.bfloat16, layout)


def check_fused_model(dtype: torch.dtype, widths: str, backend: str = "triton"):
    model = _model(dtype, widths, kernel_backend=backend, fused_decoder=True)
    text = model.model.explain_fused_decoder(DEVICE)
    assert text.count(on_backend(backend)) == FUSED_COUNT[widths], text
    batch = _batch()
    fused_run = _loss_and_grads(model, batch, True)
    unfused_run = _loss_and_grads(model, batch, False)
    plain_run = _loss_and_grads(_copy_of(model, dtype, widths), batch, False)
    oracle_run = _loss_and_grads(_copy_of(model, torch.float64, widths), batch, False)
    assert fused_run[2].keys() == oracle_run[2].keys()
    errs = [_model_errors(r, oracle_run) for r in (fused_run, unfused_run, plain_run)]
    failures = fused_model_failures(*errs, dtype)
    assert not failures, failures


def _copy_of(model, dtype: torch.dtype, widths: str):
    """The model's weights in ``dtype`` on the torch backend (op-level modules)."""
    copy = _model(dtype, widths, kernel_backend="torch")
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    return copy


def _model_errors(run, oracle_run):
    """Relative errors of the logits, the loss and every parameter's gradient."""
    (logits, loss, grads), (logits64, loss64, grads64) = run, oracle_run
    errs = {"logits": rel_error(logits, logits64), "loss": rel_error(loss, loss64)}
    errs.update({n: rel_error(grads[n], grads64[n]) for n in grads64})
    return errs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", WIDTHS)
def test_fused_model_with_gradient_checkpointing_and_padding(widths, backend):
    model = _model(widths=widths, kernel_backend=backend)
    model.gradient_checkpointing_enable()
    model.train()
    batch = _batch()
    logits_f, loss_f, grads_f = _loss_and_grads(model, batch, True)
    logits_u, loss_u, grads_u = _loss_and_grads(model, batch, False)
    assert rel_error(logits_f, logits_u) < FP32_TOL and rel_error(loss_f, loss_u) < FP32_TOL
    assert all(rel_error(grads_f[n], grads_u[n]) < FP32_TOL for n in grads_u)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", WIDTHS)
def test_fused_model_under_torch_compile(widths, backend):
    model = _model(widths=widths, kernel_backend=backend, fused_decoder=True)
    batch = _batch()
    eager = model(**batch)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out = compiled(**batch)
    out.loss.backward()
    assert rel_error(out.logits, eager.logits) < FP32_TOL
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("widths", WIDTHS)
def test_fused_model_generates_like_the_op_level_model(widths, backend):
    model = _model(widths=widths, kernel_backend=backend).eval()
    ids = torch.randint(3, 97, (2, 5), device=DEVICE)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    model.config.fused_decoder = False
    want = model.generate(ids, **kw)
    model.config.fused_decoder = True
    assert torch.equal(model.generate(ids, **kw), want)


def test_fused_decoder_flag_is_validated_saved_and_keeps_the_state_dict(tmp_path):
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    from kphi3_model import KPhi3Config, KPhi3ForCausalLM

    # The strict config refuses a non-bool on creation and on assignment.
    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match="fused_decoder"):
        _config(fused_decoder="yes")
    plain = _model()
    model = _model(fused_decoder=True)
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.save_pretrained(tmp_path)
    loaded = KPhi3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.fused_decoder is True
    assert KPhi3Config().fused_decoder is False
    plain.save_pretrained(tmp_path / "plain")
    switched = KPhi3ForCausalLM.from_pretrained(tmp_path / "plain", fused_decoder=True)
    assert switched.config.fused_decoder is True
    assert all(torch.equal(a, b) for a, b in zip(switched.state_dict().values(),
                                                 plain.state_dict().values()))


@pytest.mark.parametrize("over,why", [
    (dict(fused_decoder=False), "fused_decoder=False"),
    (dict(fused_decoder=True, min_channels_per_group=-1), "not a grouped IO block"),
    (dict(fused_decoder=True, min_channels_per_group=200), "not a grouped IO block"),
    (dict(fused_decoder=True, hidden_act="gelu_new"), "hidden_act"),
])
def test_the_op_level_path_runs_where_the_fused_one_cannot(over, why):
    model = _model(**over)
    text = model.model.explain_fused_decoder(DEVICE)
    # Six fusions per layer (two norms with their projections, the MLP tail, the residual
    # stream's three), two layers; the default backend is the torch one here, which fuses what
    # the reason does not stop (the residual stream's norms around a projection that is no
    # grouped block, say).
    lines = text.splitlines()
    assert len(lines) == 12 and why in text, text
    assert all("op-level" in line or on_backend("torch") in line or "runs as part of" in line
               for line in lines), text
    assert sum("op-level" in line for line in lines) >= 4, text
    batch = _batch(left_padded=False)
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_the_plan_does_not_depend_on_the_backend():
    """Every fused operator has both backends: one plan on either, and the text names the
    backend that runs it."""
    model = _model(widths="unpadded", kernel_backend="torch", fused_decoder=True)
    layer = model.model.layers[0]
    torch_plan = layer.fusion_plan(DEVICE)
    text = model.model.explain_fused_decoder(DEVICE)
    assert text.count(on_backend("torch")) == 10 and "op-level" not in text, text
    from kphi3_model.modeling_kphi3 import FusionPlan

    # input_layernorm runs inside its head (qkv_proj's), not as a launch of its own
    assert torch_plan == FusionPlan(qkv_head=True, gate_up_head=True, tail=True,
                                    input_norm=False, attn_add=True, down_add=True)
    if INTERPRETING or DEVICE == "cuda":
        model.set_kernel_backend("triton")
        assert layer.fusion_plan(DEVICE) == torch_plan


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_names_the_fused_path(backend):
    text = _model(widths="unpadded", kernel_backend=backend,
                  fused_decoder=True).model.explain_fused_decoder(DEVICE)
    assert text.count("block-residue layout") == 6 and "op-level" not in text, text
    assert "layers.1.self_attn (input_layernorm + qkv_proj)" in text
    # Where the layout would pad, the norm heads write channel order and its de-interleaved copy.
    text = _model(kernel_backend=backend, fused_decoder=True).model.explain_fused_decoder(DEVICE)
    assert text.count("de-interleaved (the block-residue layout would pad each group's 12 "
                      "channels to 32)") == 4 and "op-level" not in text, text


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_rows_give_empty_results_and_zero_weight_gradients(backend):
    G, s, og = 5, 12, 7
    w1 = torch.randn(G, s, og, device=DEVICE, requires_grad=True)
    w2 = torch.randn(G, s, og, device=DEVICE, requires_grad=True)
    nw = torch.randn(G * s, device=DEVICE, requires_grad=True)
    gu = torch.randn(0, 2 * G * s, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 0, G * s, device=DEVICE, requires_grad=True)
    for y, inputs in ((fused.silu_mul_gpc_io(gu, w1, w2, backend=backend), (gu, w1, w2)),
                      (fused.rms_norm_gpc_io(x, nw, 1e-5, w1, w2, backend=backend),
                       (x, nw, w1, w2))):
        assert y.shape == (*inputs[0].shape[:-1], G * og)
        grads = torch.autograd.grad(y.sum(), inputs)
        assert grads[0].shape == inputs[0].shape
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["down_proj", "post_attention_layernorm", "activation_fn"])
def test_a_hooked_module_keeps_its_own_forward(where, backend):
    """The fused operators read parameters without calling the modules' forward: a module with
    a hook (an adapter, a probe) makes its fusion fall back to the op-level path, and the hook
    runs."""
    model = _model(widths="unpadded", kernel_backend=backend, fused_decoder=True)
    layer = model.model.layers[0]
    owner = layer if where == "post_attention_layernorm" else layer.mlp
    module = owner.get_submodule(where)
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    try:
        text = model.model.explain_fused_decoder(DEVICE)
        # The hooked module's fusion and what depends on it fall back, in that layer only:
        # down_proj's residual add needs the MLP tail; the stream's fusions need the norms as
        # built (a hooked norm leaves its layer the other norm head and the tail).
        left = {"down_proj": 8, "post_attention_layernorm": 7, "activation_fn": 8}[where]
        assert "hooks" in text and text.count(on_backend(backend)) == left, text
        model(**_batch(left_padded=False))
        assert calls
    finally:
        handle.remove()
    assert model.model.explain_fused_decoder(DEVICE).count(on_backend(backend)) == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_active_residual_dropout_keeps_the_adds_apart(backend):
    """Dropout sits between a branch and its residual add: while it is active (training with
    resid_pdrop > 0) the adds run op-level; in eval mode, or with resid_pdrop = 0, fused."""
    model = _model(kernel_backend=backend, fused_decoder=True, resid_pdrop=0.1)
    model.train()
    text = model.model.explain_fused_decoder(DEVICE)
    assert text.count("residual dropout is active") == 6, text
    assert text.count(on_backend(backend)) == 6, text  # the two norm heads and the tail
    torch.manual_seed(1)
    out = model(**_batch(left_padded=False))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all()
                                            for p in model.parameters() if p.grad is not None)
    model.eval()
    assert model.model.explain_fused_decoder(DEVICE).count(on_backend(backend)) == 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_at_the_released_widths_names_the_split_heads(backend):
    from kphi3_model import KPhi3Config, KPhi3ForCausalLM

    config = KPhi3Config(num_hidden_layers=1, hidden_size=1280, intermediate_size=5120,
                         num_attention_heads=20, num_key_value_heads=20,
                         min_channels_per_group=256, kernel_backend=backend, fused_decoder=True)
    with torch.device("meta"):
        model = KPhi3ForCausalLM(config)
    text = model.model.explain_fused_decoder(DEVICE)
    assert text.count("would pad each group's 256 channels to 280") == 2, text
    assert text.count(on_backend(backend)) == 5 and "op-level" not in text, text


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_model_under_autocast_matches_the_op_level_model(backend):
    """fp32 weights under autocast: the residual stream stays fp32 through the fused norms and
    down_proj's epilogue (fp32 + half addends give fp32, as the unfused adds do)."""
    model = _model(kernel_backend=backend, fused_decoder=True)
    batch = _batch()
    half = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    runs = []
    for fused_decoder in (True, False):
        hidden = []
        handle = model.model.layers[0].register_forward_hook(
            lambda _m, _a, out: hidden.append(out[0] if isinstance(out, tuple) else out))
        try:
            runs.append(_loss_and_grads(model, batch, fused_decoder, autocast=half))
        finally:
            handle.remove()
        assert hidden[0].dtype == torch.float32
    # The plain PyTorch path under the same autocast.
    runs.append(_loss_and_grads(_copy_of(model, torch.float32, "padded"), batch, False, half))
    oracle_run = _loss_and_grads(_copy_of(model, torch.float64, "padded"), batch, False)
    failures = fused_model_failures(*[_model_errors(r, oracle_run) for r in runs], half)
    assert not failures, failures


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("min_channels", [-1, 200], ids=["dense", "G=1"])
def test_the_stream_fuses_around_projections_that_are_no_grouped_blocks(min_channels, backend):
    """Dense (or G = 1) projections have no norm heads and no fused MLP tail; the residual
    stream's norms still run as one launch each, the attention's add inside the second."""
    model = _model(kernel_backend=backend, fused_decoder=True,
                   min_channels_per_group=min_channels)
    text = model.model.explain_fused_decoder(DEVICE)
    assert text.count("one RMSNorm launch") == 2 and \
        text.count("post_attention_layernorm's launch") == 2, text
    assert text.count(on_backend(backend)) == 4, text
    batch = _batch()
    logits_f, loss_f, grads_f = _loss_and_grads(model, batch, True)
    logits_u, loss_u, grads_u = _loss_and_grads(model, batch, False)
    assert rel_error(logits_f, logits_u) < FP32_TOL and rel_error(loss_f, loss_u) < FP32_TOL
    assert all(rel_error(grads_f[n], grads_u[n]) < FP32_TOL for n in grads_u), \
        {n: rel_error(grads_f[n], grads_u[n]) for n in grads_u}


def test_d_view_charges_each_residue_a_tile_meets_and_orders_its_configs_by_that_work():
    from kphi3_kernels.ops.grouped_gemm import CUDA_CONFIGS, view_d_order, view_d_parts

    # down_proj at kphi3 (G = 20, R = 16: 320 slots): a 64-wide tile meets 4 residues, plus
    # the block's product; at phi3-mini (G = 32, R = 8) it meets 8.
    assert view_d_parts(64, 20, 16) == 5 and view_d_parts(64, 32, 8) == 9
    # R = 24, G = 8 (192 slots), 64-wide tiles: residues 0-2, 2-5, 5-7 -> 4, 5, 4 products.
    assert view_d_parts(64, 8, 24) == (4 + 5 + 4) / 3
    # G = 3 (72 slots), 32-wide tiles: residues 0-1, 1-2, and the cut last tile only 2.
    assert view_d_parts(32, 3, 24) == (3 + 3 + 2) / 3

    def first(K, G, R):
        kw = view_d_order(CUDA_CONFIGS, K, G, R)[0].kwargs
        return kw["BLOCK_Q"], kw["BLOCK_K"]

    assert first(64, 20, 16) == (64, 64)      # og = 64: 5 one-step products of 64
    assert first(96, 32, 8) == (32, 128)      # og = 96: 5 of 128, not 9 x 2 of 64


@requires_triton
@pytest.mark.parametrize("rows", [0, 1, 37])
def test_mlp_tail_backward_launchers_agree_on_strided_dy_and_empty_batches(rows):
    """The Triton launcher's d(gate_up) (one D-view launch) and weight gradients against the
    torch launcher's, with dy and gate_up column-strided views (stride 2) and with no rows."""
    from kphi3_kernels.ops import torch_impl, triton_fused

    G, s, og = 6, 22, 10
    R = layout.residue_run_length(G * s, G, 8)
    gate_up = torch.randn(rows, 4 * G * s, device=DEVICE)[:, ::2]
    dy = torch.randn(rows, 2 * G * og, device=DEVICE)[:, 1::2]
    w1 = torch.randn(G, s, og, device=DEVICE) * 0.3
    w2 = torch.randn(G, s, og, device=DEVICE) * 0.3
    t = torch_impl.silu_mul_layout_fwd(gate_up, G, R)
    got = triton_fused.mlp_tail_bwd(dy, gate_up, t, w1, w2)
    want = torch_impl.mlp_tail_bwd(dy, gate_up, t, w1, w2)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.isfinite(a).all()
        assert rel_error(a, b) < FP32_TOL


def test_the_activation_gradient_epilogue_is_refused_outside_a_d_view():
    from kphi3_kernels.ops.grouped_gemm import Operand, grouped_gemm

    dy, w = torch.randn(4, 6), torch.randn(2, 5, 3)
    out = torch.empty(4, 20)
    with pytest.raises(ValueError, match="act_grad needs a D view"):
        grouped_gemm(2, 4, 5, Operand(dy, 3, 6, 1), Operand(w, 15, 1, 3), 3,
                     Operand(out, 5, 20, 1), act_grad=(torch.randn(4, 20), 10))
