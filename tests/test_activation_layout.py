"""gate_up_proj's norm head writing the MLP tail's input: ``rms_norm_gpc_io(...,
activation_groups=G)`` returns ``silu_mul_to_layout(y, G)`` beside ``y = [gate | up]``, written
by the block's own launch (``grouped_gemm``'s ``ACT_LAYOUT`` epilogue: each program computes a
gate tile and the up tile of the same channels), and ``silu_mul_gpc_io(..., activation=a)``
starts from it instead of an activation pass.

The oracle is the unfused MLP in float64: ``gpc_io(up * silu(gate))`` of the norm head's
``gpc_io(RMSNorm(x))``; the baseline is the same backend without the activation output.
"""
import pytest
import torch

from kphi3_kernels import fused
from kphi3_kernels.layout import residue_run_length
from kphi3_kernels.ops import grouped_gemm, launch

from _utils import DEVICE, FP32_TOL, INTERPRETING, check_parity, rel_error
from test_fused_decoder import _norm_oracle, _oracle

requires_triton = pytest.mark.skipif(
    not (INTERPRETING or torch.cuda.is_available()),
    reason="the Triton kernels need a GPU or TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
HEADS = ["split", "block-residue"]

# (G, s, og) of gate_up_proj and the groups of down_proj: C = G*og/2 channels in Gd blocks.
FITTING = [
    (2, 24, 64, 4),    # C = 64, down blocks of 16: every 32-wide tile holds 2 blocks' ends
    (5, 16, 64, 4),    # C = 160, blocks of 40: tiles of 32 cut blocks, last channels split
    (4, 20, 32, 8),    # C = 64, blocks of 8 = G: one channel per run, R = 8
]
FALLBACK = [
    (3, 10, 20, 5),    # og = 20: no tile divides it, the activation pass runs after
    (5, 16, 64, 20),   # s = 8 < G = 20: a run with no channel, the activation pass runs after
]


def _operands(G, s, og, Gd, rows, dtype, bias=True):
    C = G * og // 2
    make = lambda *shape, scale=1.0: (torch.randn(*shape, device=DEVICE) * scale).to(dtype)  # noqa
    sd = C // Gd
    down_og = 3
    tensors = [make(*rows, G * s), 1 + 0.1 * make(G * s),
               make(G, s, og, scale=s ** -0.5), make(G, s, og, scale=s ** -0.5),
               make(Gd, sd, down_og, scale=sd ** -0.5), make(Gd, sd, down_og, scale=sd ** -0.5)]
    if bias:
        tensors += [make(G, og), make(G, og)]
    return [t.requires_grad_() for t in tensors]


def _mlp(backend, layout, with_activation, groups):
    def fn(x, nw, wg1, wg2, wd1, wd2, bg1=None, bg2=None):
        if with_activation:
            gu, a = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, bg1, bg2, layout=layout,
                                          activation_groups=groups, backend=backend)
        else:
            gu = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, bg1, bg2, layout=layout,
                                       backend=backend)
            a = None
        return fused.silu_mul_gpc_io(gu, wd1, wd2, activation=a, backend=backend)
    return fn


def _mlp_oracle(x, nw, wg1, wg2, wd1, wd2, bg1=None, bg2=None):
    return _oracle(_norm_oracle(x, nw, wg1, wg2, bg1, bg2), wd1, wd2, None, None)


def check_mlp(shape, backend, dtype, layout, rows=(37,), bias=True):
    G, s, og, Gd = shape
    inputs = _operands(G, s, og, Gd, rows, dtype, bias)
    dy = torch.randn(*rows, inputs[4].shape[0] * inputs[4].shape[2], device=DEVICE).to(dtype)
    names = ["y", "x", "norm_weight", "wg1", "wg2", "wd1", "wd2", "bg1", "bg2"][:1 + len(inputs)]
    check_parity(f"{shape}/{backend}/{dtype}/{layout}", _mlp(backend, layout, True, Gd),
                 _mlp_oracle, _mlp(backend, layout, False, Gd), inputs, [dy], names,
                 {n: dtype for n in names})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", HEADS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", FITTING + FALLBACK, ids=str)
def test_mlp_from_the_heads_activation_matches_the_oracle(shape, backend, layout, dtype):
    check_mlp(shape, backend, dtype, layout)


@requires_triton
@pytest.mark.parametrize("shape", FITTING + FALLBACK, ids=str)
def test_the_epilogue_runs_where_the_tile_fits(shape, monkeypatch):
    """The launch that writes the activation is the head's GEMM where ``activation_layout_fits``
    (no activation pass), else the activation pass after it; the layout equals the pass's,
    padding zero, on poisoned outputs."""
    from kphi3_kernels.ops import outputs, rowwise
    G, s, og, Gd = shape
    names = []
    real = launch.launch
    for module in (grouped_gemm, rowwise):  # each launcher's own binding of launch()
        monkeypatch.setattr(module, "launch", lambda spec: (names.append(spec.name), real(spec)))
    monkeypatch.setattr(outputs, "POISON", True)
    x, nw, wg1, wg2 = (t.detach() for t in _operands(G, s, og, Gd, (41,), torch.float32)[:4])
    gu, a = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, layout="split", activation_groups=Gd,
                                  backend="triton")
    run = residue_run_length(G * og // 2, Gd, 8)
    fits = grouped_gemm.activation_layout_fits(G, og, Gd, run)
    assert fits == (shape in FITTING)
    assert ("gpc_io_fwd_act_layout" in names) == fits
    assert ("silu_mul_layout" in names) == (not fits)
    # The same formula on the same rounded gate and up: bit for bit under the interpreter; a
    # GPU's compiler may contract the two kernels' arithmetic differently.
    want = rowwise.silu_mul_layout_fwd(gu, Gd, run)
    torch.testing.assert_close(a, want, rtol=0 if INTERPRETING else 1e-6,
                               atol=0 if INTERPRETING else 1e-6)


# Every config the launch may run: each one the register bound keeps divides og = 256 and the
# gate half's 640 channels.
FORCED_SHAPE = (5, 40, 256, 20)


def test_the_forced_configs_are_every_config_the_launch_may_run():
    bound = grouped_gemm._ACT_LAYOUT_ELEMENTS_PER_THREAD * 32
    may_run = [c for c in grouped_gemm.CUDA_CONFIGS
               if c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"] <= bound * c.num_warps]
    G, _, og, _ = FORCED_SHAPE
    assert list(grouped_gemm._act_layout_configs(grouped_gemm.CUDA_CONFIGS, og, G * og // 2)) \
        == may_run


@pytest.mark.skipif(not INTERPRETING, reason="forces configs through Triton's interpreter")
@pytest.mark.parametrize("config", grouped_gemm._act_layout_configs(
    grouped_gemm.CUDA_CONFIGS, 256, 640),
    ids=lambda c: "{BLOCK_P}x{BLOCK_Q}x{BLOCK_K}".format(**c.kwargs) + f"-w{c.num_warps}")
@pytest.mark.parametrize("layout", HEADS)
def test_every_gpu_config_of_the_activation_layout_interpreted(config, layout, monkeypatch):
    """Each config the autotuner may pick for the launch, on 70 rows (a partial row tile),
    s = 40 (a partial K tile of every BLOCK_K), og = 256 in G = 5 (the gate tiles of groups
    0 to 2 pair with up tiles 640 channels on, from the middle of group 2 to group 4) and
    down_proj's 640 channels in 20 blocks of 32 (R = 8: runs of one or two channels, up to 7
    slots of padding after a run's last channel), with biases, outputs poisoned. The launch is
    a forward: its block output against the float64 oracle, the layout against the activation
    pass on that output (the backward has no launch of its own here: the MLP test above)."""
    from kphi3_kernels.ops import outputs
    G, s, og, Gd = FORCED_SHAPE
    forced = []

    def force(spec):
        if not spec.name.endswith("_act_layout"):
            return None
        forced.append(spec.name)
        return config

    monkeypatch.setattr(launch, "FORCE_CONFIG", force)
    monkeypatch.setattr(outputs, "POISON", True)
    x, nw, wg1, wg2, _, _, bg1, bg2 = (t.detach() for t in _operands(G, s, og, Gd, (70,),
                                                                     torch.float32))
    gu, a = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, bg1, bg2, layout=layout,
                                  activation_groups=Gd, backend="triton")
    assert forced == [{"split": "gpc_io_fwd_act_layout",
                       "block-residue": "gpc_io_layout_fwd_act_layout"}[layout]]
    want = _norm_oracle(*(t.double() for t in (x, nw, wg1, wg2, bg1, bg2)))
    assert rel_error(gu, want) < FP32_TOL
    assert torch.equal(a, fused.silu_mul_to_layout(gu, Gd, backend="triton"))


def test_the_released_shapes_fit():
    """KPhi-3's and the phi3-mini-sized family's gate_up_proj write the activation in their
    launch: og = 2048 (G = 5) and down_proj's layout of G = 20, R = 16 (and the mini's)."""
    from kphi3_bench import shapes
    for family in ("kphi3", "phi3-mini"):
        gate_up, down = shapes.SHAPES[f"{family}-gate_up"], shapes.SHAPES[f"{family}-down"]
        run = residue_run_length(down.in_features, down.groups, 8)
        assert grouped_gemm.activation_layout_fits(gate_up.groups, gate_up.out_per_group,
                                                   down.groups, run)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_activation_is_refused_where_it_does_not_match(backend):
    G, s, og, Gd = FITTING[0]
    x, nw, wg1, wg2, wd1, wd2 = _operands(G, s, og, Gd, (6,), torch.float32, bias=False)
    with pytest.raises(ValueError, match="activation_groups=3"):
        fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, activation_groups=3, backend=backend)
    gu, a = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, activation_groups=Gd, backend=backend)
    assert not a.requires_grad
    with pytest.raises(ValueError, match="activation is"):
        fused.silu_mul_gpc_io(gu, wd1, wd2, activation=a[:, :-8], backend=backend)
    with pytest.raises(ValueError, match="activation is"):
        fused.silu_mul_gpc_io(gu, wd1, wd2, activation=a.half(), backend=backend)
    with pytest.raises(ValueError, match="requires grad"):
        fused.silu_mul_gpc_io(gu, wd1, wd2, activation=a.clone().requires_grad_(),
                              backend=backend)
    with pytest.raises(TypeError, match="activation must be a tensor"):
        fused.silu_mul_gpc_io(gu, wd1, wd2, activation=[a], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_head_returns_h_y_and_the_activation(backend):
    """With a residual (the attention's add before post_attention_layernorm): ``(h, y, a)``,
    the same ``h`` and ``y`` as without the activation, in the input's leading shape."""
    G, s, og, Gd = FITTING[1]
    x, nw, wg1, wg2 = (t.detach() for t in _operands(G, s, og, Gd, (2, 5), torch.float32)[:4])
    r = torch.randn_like(x)
    h, y, a = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, residual=r, activation_groups=Gd,
                                    backend=backend)
    h0, y0 = fused.rms_norm_gpc_io(x, nw, 1e-5, wg1, wg2, residual=r, backend=backend)
    assert torch.equal(h, h0) and torch.allclose(y, y0, rtol=1e-6, atol=1e-6)
    assert a.shape == (2, 5, Gd * Gd * residue_run_length(G * og // 2, Gd, 8))
    assert torch.allclose(a, fused.silu_mul_to_layout(y, Gd, backend=backend), atol=1e-6)
