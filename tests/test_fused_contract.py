"""The fused decoder keeps the op-level path's contract, on both backends.

- A fusion runs only where every module it skips is the one the model built (same object, same
  class, no hook, no wrapped forward, no activation added to a block); anything else runs the
  op-level path, with the op-level values, and says so.
- The SiLU product and its gradients overflow nowhere that torch's ``up * F.silu(gate)`` does not.
- One dtype rule for residuals, and one ``requires_grad`` for every output, on both backends.
- Every argument is checked before anything launches, with an error naming the function called.
- ``fused_decoder=True`` that leaves a part unfused logs one warning per model that names it.
"""
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kphi3_kernels import fused, layout, reference

from _utils import DEVICE, FP32_TOL, rel_error
from test_fused_decoder import BACKENDS, _batch, _model, requires_triton

EPS = 1e-5


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _op_level_logits(model, batch):
    model.config.fused_decoder = False
    try:
        return _logits(model, batch)
    finally:
        model.config.fused_decoder = True


def _fresh_block_like(block):
    from kphi3_kernels import GroupedPointwiseConvolutionBlockIO

    new = GroupedPointwiseConvolutionBlockIO(block.in_features, block.out_features,
                                             block.min_channels_per_group,
                                             backend=block.backend).to(DEVICE)
    new.load_state_dict(block.state_dict())
    return new


def _wrap_forward(module):
    original = module.forward
    module.forward = lambda *a, **k: original(*a, **k) * 0.5  # an adapter's wrapper
    return module


# Each replacement changes what the op-level path computes, or might, and keeps the module
# tree a model can run: (where under layers[0], the replacement, the fusion that must stop).
REPLACEMENTS = {
    "gelu-activation": ("mlp.activation_fn", lambda m: nn.GELU(), "silu(gate) * up + down_proj"),
    "relu-activation": ("mlp.activation_fn", lambda m: nn.ReLU(), "silu(gate) * up + down_proj"),
    "new-silu-activation": ("mlp.activation_fn", lambda m: type(m)(),
                            "silu(gate) * up + down_proj"),
    "new-norm": ("post_attention_layernorm", lambda m: _copy_norm(m, scale=2.0),
                 "post_attention_layernorm + gate_up_proj"),
    "new-down-proj": ("mlp.down_proj", _fresh_block_like, "silu(gate) * up + down_proj"),
    "new-qkv-proj": ("self_attn.qkv_proj", _fresh_block_like, "input_layernorm + qkv_proj"),
    "wrapped-down-proj": ("mlp.down_proj", _wrap_forward, "silu(gate) * up + down_proj"),
    "wrapped-norm": ("input_layernorm", _wrap_forward, "input_layernorm + qkv_proj"),
    "identity-dropout": ("resid_attn_dropout", lambda m: nn.Identity(),
                         "attention residual add + post_attention_layernorm"),
}


def _copy_norm(norm, scale):
    new = type(norm)(norm.weight.shape[0], eps=norm.variance_epsilon).to(DEVICE)
    with torch.no_grad():
        new.weight.copy_(norm.weight * scale)
    return new


def _replace(layer, path, make):
    owner_path, _, name = path.rpartition(".")
    owner = layer.get_submodule(owner_path) if owner_path else layer
    new = make(getattr(owner, name))
    if new is not getattr(owner, name):
        setattr(owner, name, new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", REPLACEMENTS)
def test_a_replaced_module_runs_the_op_level_path(kind, training, backend):
    """A module that is not the one the model built keeps its own forward: the fused model
    computes what the op-level model computes with the same modules, and explain says so."""
    path, make, fusion = REPLACEMENTS[kind]
    model = _model(kernel_backend=backend, fused_decoder=True)
    model.train(training)
    _replace(model.model.layers[0], path, make)
    text = model.model.explain_fused_decoder(DEVICE)
    line = next(l for l in text.splitlines() if l.startswith("layers.0") and f"({fusion})" in l)
    assert "op-level" in line and path.rpartition(".")[2] in line, line
    batch = _batch()
    got = _logits(model, batch)
    want = _op_level_logits(model, batch)
    assert rel_error(got, want) < FP32_TOL


@requires_triton
def test_a_block_given_an_activation_runs_the_op_level_path():
    model = _model(kernel_backend="triton", fused_decoder=True)
    model.model.layers[1].mlp.down_proj.activation = torch.tanh
    text = model.model.explain_fused_decoder(DEVICE)
    assert "down_proj has an activation" in text, text
    batch = _batch()
    assert rel_error(_logits(model, batch), _op_level_logits(model, batch)) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_identity_residual_dropout_trains(backend):
    """The dropout check reads ``p`` only from the dropout the model built: a replacement
    (here nn.Identity) keeps the op-level add, in training too, instead of failing."""
    model = _model(kernel_backend=backend, fused_decoder=True, resid_pdrop=0.1).train()
    for layer in model.model.layers:
        layer.resid_attn_dropout = nn.Identity()
        layer.resid_mlp_dropout = nn.Identity()
    out = model(**_batch())
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.explain_fused_decoder(DEVICE).count("resid_attn_dropout is an Identity") \
        == 2 * 3


# ---- the SiLU product: no overflow where torch has none -----------------------------------

G, S, OG = 2, 8, 4


def _extreme_gate_up(gate: float, up: float, rows: int = 3) -> torch.Tensor:
    gu = torch.empty(rows, 2 * G * S, device=DEVICE)
    gu[:, :G * S] = gate
    gu[:, G * S:] = up
    return gu


def _same_values(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), (got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want)), (got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0.0)


# exp(-gate) overflows to inf for gate = -1e20, as in torch's own SiLU: the result is -0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate,up", [(-88.0, 1e37), (-1e20, 1e20), (30.0, 1e37), (-20.0, -3e38)])
def test_the_activation_producer_overflows_where_torch_does(gate, up, backend):
    gu = _extreme_gate_up(gate, up)
    t = fused.silu_mul_to_layout(gu, G, backend=backend)
    want = fused.silu_mul_to_layout(gu, G, backend="torch")  # torch's up * F.silu(gate)
    gate_t, up_t = gu.chunk(2, dim=-1)
    assert torch.isfinite(want).any() == torch.isfinite(up_t * F.silu(gate_t)).any()
    _same_values(t, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_activation_gradients_overflow_where_torch_does(backend):
    """d(up) = dh * silu(gate) and d(gate) = (dh * up) * silu'(gate): with dh about 1e37 and
    gate = -88, ``dh * gate`` would overflow first; torch's order gives finite gradients."""
    gu = _extreme_gate_up(-88.0, 1.0)
    w = torch.ones(G, S, OG, device=DEVICE)
    dy = torch.full((gu.shape[0], G * OG), 1e36, device=DEVICE)  # dh = 2 * OG * 1e36
    grads = {}
    for name in (backend, "torch"):
        leaf = gu.clone().requires_grad_(True)
        fused.silu_mul_gpc_io(leaf, w, w, backend=name).backward(dy)
        grads[name] = leaf.grad
    assert torch.isfinite(grads["torch"]).all()
    _same_values(grads[backend], grads["torch"])


# ---- one dtype rule for residuals, one requires_grad for every output ---------------------


def _head_operands(x_dtype, residual_dtype, param_dtype):
    C = G * S
    x = torch.randn(5, C, device=DEVICE).to(x_dtype)
    r = torch.randn(5, C, device=DEVICE).to(residual_dtype)
    nw = (1 + 0.1 * torch.randn(C, device=DEVICE)).to(param_dtype)
    w1, w2 = (torch.randn(G, S, OG, device=DEVICE).mul(S ** -0.5).to(param_dtype)
              for _ in range(2))
    return x, r, nw, w1, w2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_residual_that_promotes_away_from_the_weights_is_a_type_error(residual_dtype, backend):
    x, r, nw, w1, w2 = _head_operands(torch.float16, residual_dtype, torch.float16)
    with pytest.raises(TypeError, match=r"rms_norm_gpc_io: the normalized input's dtype"):
        fused.rms_norm_gpc_io(x, nw, EPS, w1, w2, residual=r, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_residual_that_promotes_to_the_weights_dtype_is_added_as_plus_adds(backend):
    x, r, nw, w1, w2 = _head_operands(torch.float16, torch.float32, torch.float32)
    h, y = fused.rms_norm_gpc_io(x, nw, EPS, w1, w2, residual=r, backend=backend)
    assert h.dtype == y.dtype == torch.float32
    assert torch.equal(h, r + x)
    _, y_torch = fused.rms_norm_gpc_io(x, nw, EPS, w1, w2, residual=r, backend="torch")
    assert rel_error(y, y_torch) < FP32_TOL


def _norm(x, nw):
    """Phi-3's RMSNorm, plainly."""
    return nw * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def _silu_mul(gu):
    gate, up = gu.chunk(2, dim=-1)
    return up * F.silu(gate)


# The plain composition of each fused function (torch ops, the layout's and the reference's
# functions), whose outputs' requires_grad every backend must give.
PLAIN = {
    "rms_norm": lambda a: (_norm(a[0], a[1]),),
    "add_rms_norm": lambda a: (a[0] + a[1], _norm(a[0] + a[1], a[2])),
    "rms_norm_gpc_io": lambda a: (reference.gpc_io(_norm(a[0], a[1]), a[2], a[3]),),
    "rms_norm_gpc_io-residual": lambda a: (a[4] + a[0], reference.gpc_io(
        _norm(a[4] + a[0], a[1]), a[2], a[3])),
    "silu_mul_to_layout": lambda a: (layout.to_residue_layout(_silu_mul(a[0]), G),),
    "gpc_io_from_layout": lambda a: (reference.gpc_io(
        layout.from_residue_layout(a[0], G, G * S), a[1], a[2]),),
    "silu_mul_gpc_io-residual": lambda a: (a[3] + reference.gpc_io(_silu_mul(a[0]), a[1], a[2]),),
}


def _public_calls():
    """(name, call(backend, inputs) -> outputs, differentiable inputs) of each fused function."""
    C = G * S
    x, r, nw, w1, w2 = _head_operands(torch.float32, torch.float32, torch.float32)
    gu = torch.randn(5, 2 * C, device=DEVICE)
    stream = torch.randn(5, G * OG, device=DEVICE)
    t = fused.silu_mul_to_layout(gu, G, backend="torch")
    as_tuple = lambda out: out if isinstance(out, tuple) else (out,)  # noqa: E731
    return [
        ("rms_norm", lambda b, a: as_tuple(fused.rms_norm(a[0], a[1], EPS, backend=b)), [x, nw]),
        ("add_rms_norm", lambda b, a: fused.add_rms_norm(a[0], a[1], a[2], EPS, backend=b),
         [r, x, nw]),
        ("rms_norm_gpc_io", lambda b, a: as_tuple(fused.rms_norm_gpc_io(
            a[0], a[1], EPS, a[2], a[3], backend=b)), [x, nw, w1, w2]),
        ("rms_norm_gpc_io-residual", lambda b, a: fused.rms_norm_gpc_io(
            a[0], a[1], EPS, a[2], a[3], residual=a[4], backend=b), [x, nw, w1, w2, r]),
        ("silu_mul_to_layout", lambda b, a: as_tuple(fused.silu_mul_to_layout(a[0], G, backend=b)),
         [gu]),
        ("gpc_io_from_layout", lambda b, a: as_tuple(fused.gpc_io_from_layout(
            a[0], a[1], a[2], backend=b)), [t, w1, w2]),
        ("silu_mul_gpc_io-residual", lambda b, a: as_tuple(fused.silu_mul_gpc_io(
            a[0], a[1], a[2], residual=a[3], backend=b)), [gu, w1, w2, stream]),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(7), ids=[c[0] for c in _public_calls()])
def test_every_output_requires_grad_as_the_plain_composition_gives(index, backend):
    """For every subset of differentiable inputs that require grad, each output's
    ``requires_grad`` is the one the plain composition of torch ops gives, on both backends."""
    name, call, inputs = _public_calls()[index]
    assert set(PLAIN) == {c[0] for c in _public_calls()}
    for mask in range(1 << len(inputs)):
        args = [t.detach().requires_grad_(bool(mask >> i & 1)) for i, t in enumerate(inputs)]
        got = [o.requires_grad for o in call(backend, args)]
        want = [o.requires_grad for o in PLAIN[name](args)]
        assert got == want, f"{name}, inputs requiring grad {mask:b}: {backend} {got}, plain {want}"


# ---- arguments checked before anything launches, naming the function called -----------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_residual_names_add_rms_norm(backend):
    x, _, nw, _, _ = _head_operands(torch.float32, torch.float32, torch.float32)
    with pytest.raises(TypeError, match="add_rms_norm: residual must be a torch.Tensor, got NoneType"):
        fused.add_rms_norm(None, x, nw, EPS, backend=backend)


# eps = 0: the kernels' masked-off rows past the last one compute rsqrt(0), never stored.
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [np.float32(1e-5), np.float64(1e-5), np.float16(1e-5), 0, 1e-5])
def test_eps_is_any_real_scalar(eps, backend):
    x, r, nw, _, _ = _head_operands(torch.float32, torch.float32, torch.float32)
    n = fused.rms_norm(x, nw, eps, backend=backend)
    assert rel_error(n, fused.rms_norm(x, nw, float(eps), backend="torch")) < FP32_TOL
    h, n = fused.add_rms_norm(r, x, nw, eps, backend=backend)
    assert torch.isfinite(n).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [np.bool_(True), torch.tensor(1e-5), "1e-5", None, complex(1e-5)])
def test_eps_that_is_no_real_scalar_is_refused(eps, backend):
    x, _, nw, _, _ = _head_operands(torch.float32, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="rms_norm: eps must be a non-negative number"):
        fused.rms_norm(x, nw, eps, backend=backend)


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "rms_norm_gpc_io",
                                  "silu_mul_to_layout", "silu_mul_gpc_io", "gpc_io_from_layout"])
def test_a_bad_backend_names_the_function_called(name):
    x, r, nw, w1, w2 = _head_operands(torch.float32, torch.float32, torch.float32)
    gu = torch.randn(5, 2 * G * S, device=DEVICE)
    calls = {
        "rms_norm": lambda: fused.rms_norm(x, nw, EPS, backend="cuda"),
        "add_rms_norm": lambda: fused.add_rms_norm(r, x, nw, EPS, backend="cuda"),
        "rms_norm_gpc_io": lambda: fused.rms_norm_gpc_io(x, nw, EPS, w1, w2, backend="cuda"),
        "silu_mul_to_layout": lambda: fused.silu_mul_to_layout(gu, G, backend="cuda"),
        "silu_mul_gpc_io": lambda: fused.silu_mul_gpc_io(gu, w1, w2, backend="cuda"),
        "gpc_io_from_layout": lambda: fused.gpc_io_from_layout(
            fused.silu_mul_to_layout(gu, G, backend="torch"), w1, w2, backend="cuda"),
    }
    with pytest.raises(ValueError, match=f"^{name}: unknown kernel backend 'cuda'"):
        calls[name]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_weight_on_another_device_names_rms_norm_gpc_io(backend):
    x, _, nw, w1, w2 = _head_operands(torch.float32, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="rms_norm_gpc_io: a parameter is on meta"):
        fused.rms_norm_gpc_io(x, nw, EPS, w1.to("meta"), w2, backend=backend)


# ---- one warning per model for what fused_decoder=True leaves unfused -------------------------


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "kphi3_model"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unfused_part_is_named_once_per_model(caplog, backend):
    """The same rule on both backends: each fuses what it can, and says what it leaves."""
    model = _model(kernel_backend=backend, fused_decoder=True, hidden_act="gelu")
    batch = _batch()
    with caplog.at_level(logging.WARNING, logger="kphi3_model"):
        model(**batch)
        model(**batch)
    (message,) = _warnings(caplog)
    assert "silu(gate) * up + down_proj in layers 0, 1" in message, message
    assert "hidden_act is 'gelu'" in message and "down_proj + residual add" in message, message
    caplog.clear()
    other = _model(kernel_backend=backend, fused_decoder=True, hidden_act="gelu")
    with caplog.at_level(logging.WARNING, logger="kphi3_model"):
        other(**batch)
    assert len(_warnings(caplog)) == 1  # per model, not per process


@pytest.mark.parametrize("over", [
    pytest.param(dict(kernel_backend="triton", fused_decoder=True), id="all-fused",
                 marks=requires_triton),
    pytest.param(dict(kernel_backend="torch", fused_decoder=True), id="torch-backend"),
    pytest.param(dict(kernel_backend="triton", fused_decoder=False), id="not-asked",
                 marks=requires_triton),
])
def test_no_warning_where_nothing_asked_for_is_left_unfused(over, caplog):
    model = _model(**over)
    with caplog.at_level(logging.WARNING, logger="kphi3_model"):
        model(**_batch())
    assert not _warnings(caplog)


# ---- the plan: decided once per state, never stale ----------------------------------------


@requires_triton
def test_the_plan_is_decided_once_per_state_and_again_when_it_changes(monkeypatch):
    """The forward reads a plan decided once per device, training mode and module state: a
    replaced module, a hook, the training mode or the backend in force decide it again."""
    import kphi3_kernels

    from kphi3_model import modeling_kphi3

    model = _model(kernel_backend="triton", fused_decoder=True)
    layer = model.model.layers[0]
    decided = []
    plan_of = modeling_kphi3.FusionPlan.from_fusions
    monkeypatch.setattr(modeling_kphi3.FusionPlan, "from_fusions",
                        lambda fusions: decided.append(fusions) or plan_of(fusions))
    batch = _batch()

    def decisions(step):  # how many layers decided their plan again during ``step``
        decided.clear()
        step()
        return len(decided)

    layers = len(model.model.layers)
    assert decisions(lambda: _logits(model, batch)) == layers
    assert decisions(lambda: _logits(model, batch)) == 0      # cached
    handle = layer.mlp.down_proj.register_forward_hook(lambda *_: None)
    assert decisions(lambda: _logits(model, batch)) == 1      # a hook, in layer 0
    assert not layer.fusion_plan(DEVICE).tail
    handle.remove()
    assert decisions(lambda: _logits(model, batch)) == 0      # back to the first state
    assert layer.fusion_plan(DEVICE).tail
    layer.mlp.activation_fn = nn.GELU()
    assert decisions(lambda: _logits(model, batch)) == 1      # a replaced module
    assert not layer.fusion_plan(DEVICE).tail
    model.train(not model.training)
    assert decisions(lambda: _logits(model, batch)) == layers  # the training mode
    plan = layer.fusion_plan(DEVICE)
    model.set_kernel_backend("torch")                           # the backend
    assert decisions(lambda: _logits(model, batch)) == layers
    # decided again (its reasons name the backend), to the same plan: every fused operator
    # runs on both backends
    assert layer.fusion_plan(DEVICE) == plan and plan.gate_up_head


@pytest.mark.parametrize("fused_decoder", [False, True])
def test_a_foreign_mlp_gets_the_plain_call(fused_decoder):
    """A replaced MLP (any module of one input) runs as it is, fused decoder or not."""
    model = _model(kernel_backend="torch", fused_decoder=fused_decoder)

    class Doubling(nn.Module):
        def forward(self, x):
            return 2 * x

    for layer in model.model.layers:
        layer.mlp = Doubling()
    out = model(**_batch())
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["silu_mul_gpc_io", "rms_norm_gpc_io", "add_rms_norm"])
def test_a_second_derivative_names_the_op_level_path(call, backend):
    x, r, nw, w1, w2 = _head_operands(torch.float32, torch.float32, torch.float32)
    gu = torch.randn(5, 2 * G * S, device=DEVICE)
    leaf = {"silu_mul_gpc_io": gu, "rms_norm_gpc_io": x, "add_rms_norm": x}[call].requires_grad_()
    out = {"silu_mul_gpc_io": lambda: fused.silu_mul_gpc_io(leaf, w1, w2, backend=backend),
           "rms_norm_gpc_io": lambda: fused.rms_norm_gpc_io(leaf, nw, EPS, w1, w2,
                                                            backend=backend),
           "add_rms_norm": lambda: fused.add_rms_norm(r, leaf, nw, EPS, backend=backend)[1],
           }[call]()
    (grad,) = torch.autograd.grad((out * out).sum(), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match=f"_{backend}: a second derivative through the fused "
                                           "decoder.*op-level path supports gradients of any "
                                           "order"):
        grad.sum().backward()
