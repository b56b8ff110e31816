"""The drop-in modules: original state-dict keys and shapes, init, group rule, activations,
forward and every parameter gradient against the float64 oracle, and the ``backend=`` override."""
import math

import pytest
import torch

import kphi3_kernels
from kphi3_kernels import (GroupedLinear, GroupedLinearFast, GroupedPointwiseConvolutionBlock,
                           GroupedPointwiseConvolutionBlockIO, InterleaveChannels,
                           InterleaveChannelsFast, SignedSquareRoot1, group_count)
from kphi3_kernels import reference as R

from _utils import DEVICE, FP32_TOL, assert_meets_contract, module_reference, rel_error, spy_impls

BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------------------
# The oracle for a module: reference.py on float64 copies of its state dict
# --------------------------------------------------------------------------------------------


def check_module(module, x, backend=None, use_global=None):
    """Output and the gradients of the input and of every parameter vs the float64 oracle."""
    x = x.detach().requires_grad_()
    params = dict(module.named_parameters())
    if use_global is not None:
        with kphi3_kernels.use_backend(use_global):
            y = module(x)
    else:
        y = module(x)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *params.values()], dy)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    y64 = module_reference(module, x64, p64)
    grads64 = torch.autograd.grad(y64, [x64, *p64.values()], dy.double())
    assert y.shape == y64.shape
    errs = {"out": rel_error(y, y64)}
    errs.update({n: rel_error(g, g64)
                 for n, g, g64 in zip(["x", *params], grads, grads64)})
    assert y.dtype == torch.float32  # the modules are checked in fp32: the contract's FP32_TOL
    assert_meets_contract(type(module).__name__, errs, torch.float32)


# --------------------------------------------------------------------------------------------
# State dicts with the original keys and shapes
# --------------------------------------------------------------------------------------------


def _original_state_dict(kind, cin, cout, G, bias):
    """What the ORIGINAL classes hold, written out by hand (docs/layers.md, state-dict keys)."""
    s, og = cin // G, cout // G

    def w(*shape):
        return torch.randn(*shape) / math.sqrt(shape[-2] if len(shape) == 3 else shape[-1])

    sd = {}
    if kind == "fast":
        sd["weight"] = w(G, s, og)
        if bias:
            sd["bias"] = torch.randn(G, og)
    elif kind == "slow":
        for n in range(G):
            sd[f"group_layers.{n}.weight"] = w(og, s)
            if bias:
                sd[f"group_layers.{n}.bias"] = torch.randn(og)
    elif G == 1:  # either block with one group
        sd["first_pointwise_conv.group_layers.0.weight"] = w(cout, cin)
        if bias:
            sd["first_pointwise_conv.group_layers.0.bias"] = torch.randn(cout)
    else:
        sd["first_pointwise_conv.weight"] = w(G, s, og)
        if bias:
            sd["first_pointwise_conv.bias"] = torch.randn(G, og)
        if kind == "io":
            sd["second_pointwise_conv.weight"] = w(G, s, og)
        elif cin >= cout:
            sd["second_pointwise_conv.weight"] = w(G, og, og)
        if bias and "second_pointwise_conv.weight" in sd:
            sd["second_pointwise_conv.bias"] = torch.randn(G, og)
    return sd


STATE_DICT_CASES = [
    # kind, in, out, groups-or-min, bias, leading shape
    ("fast", 15, 21, 3, True, (2, 5)),
    ("fast", 96, 160, 2, False, (7,)),
    ("slow", 15, 21, 3, True, (2, 5)),
    ("slow", 12, 8, 1, False, (3,)),
    ("io", 240, 400, 48, False, (2, 3, 3)),   # G = 5
    ("io", 240, 400, 48, True, (5,)),
    ("io", 20, 30, 32, False, (5,)),          # G = 1
    ("io", 20, 30, -1, True, (2, 3)),         # negative minimum: G = 1
    ("block", 240, 240, 48, False, (5,)),     # G = 5, in == out: second present
    ("block", 240, 400, 48, True, (2, 3)),    # in < out: no second
    ("block", 400, 240, 48, True, (1, 3)),    # in > out
    ("block", 20, 10, 32, False, (3,)),       # G = 1
    ("block", 10, 5, 2, False, (4,)),         # G = 5, og == 1
]


def _build(kind, cin, cout, g_or_min, bias, **kw):
    if kind == "fast":
        return GroupedLinearFast(cin, cout, g_or_min, bias=bias, **kw), g_or_min
    if kind == "slow":
        return GroupedLinear(cin, cout, g_or_min, bias=bias, **kw), g_or_min
    cls = GroupedPointwiseConvolutionBlockIO if kind == "io" else GroupedPointwiseConvolutionBlock
    m = cls(cin, cout, g_or_min, use_bias=bias, **kw)
    return m, group_count(cin, cout, g_or_min)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,cin,cout,g_or_min,bias,lead", STATE_DICT_CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{'b' if c[4] else 'nb'}"
                              for c in STATE_DICT_CASES])
def test_original_state_dict_loads_strict_and_matches_reference(kind, cin, cout, g_or_min, bias,
                                                                lead, backend):
    module, G = _build(kind, cin, cout, g_or_min, bias, backend=backend)
    module = module.to(DEVICE)
    assert module.num_groups == G
    sd = _original_state_dict(kind, cin, cout, G, bias)
    own = module.state_dict()
    assert sorted(own) == sorted(sd)
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    result = module.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in module.state_dict().items():
        assert torch.equal(v.cpu(), sd[k])
    check_module(module, torch.randn(*lead, cin, device=DEVICE))


@pytest.mark.parametrize("cin,cout,G,og", [(1280, 3840, 5, 768), (1280, 1280, 5, 256),
                                           (1280, 10240, 5, 2048), (5120, 1280, 20, 64)])
def test_released_shapes_state_dict(cin, cout, G, og):
    block = GroupedPointwiseConvolutionBlockIO(cin, cout, 256)
    assert block.num_groups == G
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == {
        "first_pointwise_conv.weight": (G, cin // G, og),
        "second_pointwise_conv.weight": (G, cin // G, og),
    }


def test_released_o_proj_forward_torch_backend():
    block = GroupedPointwiseConvolutionBlockIO(1280, 1280, 256, backend="torch")
    check_module(block, torch.randn(1, 3, 1280))


# --------------------------------------------------------------------------------------------
# Init
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cin,cout,G", [(240, 400, 5), (1280, 1280, 5), (96, 30, 3)])
def test_grouped_linear_fast_init_bounds(cin, cout, G):
    m = GroupedLinearFast(cin, cout, G)
    s, og = cin // G, cout // G
    fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(m.weight)
    assert fan_in == s * og  # torch's fan-in of a 3-D tensor: size(1) * size(2)
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(2/(1+5)), bound sqrt(3)*gain/sqrt(fan_in) = 1/sqrt(fan_in)
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + 5)) / math.sqrt(fan_in)
    assert math.isclose(bound, 1 / math.sqrt(fan_in))
    w = m.weight.detach()
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.97 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3)
    assert abs(w.mean().item()) < 0.05 * bound
    b = m.bias.detach()
    b_bound = 1 / math.sqrt(s)
    assert b.abs().max() <= b_bound
    assert b.abs().max() > 0.8 * b_bound
    assert len(torch.unique(w)) > 0.99 * w.numel()  # really random, not a constant fill


def test_blocks_init_children_like_grouped_linear_fast():
    torch.manual_seed(1)
    block = GroupedPointwiseConvolutionBlockIO(240, 400, 48, use_bias=True)
    torch.manual_seed(1)
    first = GroupedLinearFast(240, 400, 5, bias=True)
    assert torch.equal(block.first_pointwise_conv.weight, first.weight)
    assert torch.equal(block.first_pointwise_conv.bias, first.bias)
    assert not torch.equal(block.first_pointwise_conv.weight, block.second_pointwise_conv.weight)


def test_grouped_linear_init_is_nn_linear():
    torch.manual_seed(2)
    m = GroupedLinear(12, 8, 2)
    torch.manual_seed(2)
    a, b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
    assert torch.equal(m.group_layers[0].weight, a.weight)
    assert torch.equal(m.group_layers[1].bias, b.bias)


# --------------------------------------------------------------------------------------------
# Group rule, attributes, GroupedLinear vs GroupedLinearFast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GroupedPointwiseConvolutionBlockIO, GroupedPointwiseConvolutionBlock])
@pytest.mark.parametrize("cin,cout,m", [(1280, 3840, 256), (5120, 1280, 256), (96, 64, 32),
                                        (90, 60, 7), (64, 64, -1), (30, 50, 100)])
def test_num_groups_follows_group_rule(cls, cin, cout, m):
    block = cls(cin, cout, m)
    assert block.num_groups == group_count(cin, cout, m)
    if block.num_groups == 1:
        assert isinstance(block.first_pointwise_conv, GroupedLinear)
        assert not hasattr(block, "second_pointwise_conv")
    else:
        assert isinstance(block.first_pointwise_conv, GroupedLinearFast)
        assert block.first_pointwise_conv.num_groups == block.num_groups


def test_block_zero_min_channels_raises():
    for cls in (GroupedPointwiseConvolutionBlockIO, GroupedPointwiseConvolutionBlock):
        with pytest.raises(ValueError, match="min_channels_per_group"):
            cls(64, 64, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G,bias", [(3, True), (5, False)])
def test_grouped_linear_equals_grouped_linear_fast(G, bias, backend):
    slow = GroupedLinear(G * 7, G * 4, G, bias=bias, backend=backend).to(DEVICE)
    fast = GroupedLinearFast(G * 7, G * 4, G, bias=bias, backend=backend).to(DEVICE)
    with torch.no_grad():
        fast.weight.copy_(torch.stack([l.weight.t() for l in slow.group_layers]))
        if bias:
            fast.bias.copy_(torch.stack([l.bias for l in slow.group_layers]))
    x = torch.randn(3, 5, G * 7, device=DEVICE)
    assert rel_error(slow(x), fast(x)) < FP32_TOL
    check_module(slow, x)  # and every group_layers gradient vs the oracle


# --------------------------------------------------------------------------------------------
# Activations, interleave module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,cin,cout,bias", [
    (GroupedPointwiseConvolutionBlockIO, 240, 400, False),
    (GroupedPointwiseConvolutionBlockIO, 20, 30, True),    # G = 1
    (GroupedPointwiseConvolutionBlock, 240, 400, True),    # in < out
    (GroupedPointwiseConvolutionBlock, 400, 240, False),   # in > out
    (GroupedPointwiseConvolutionBlock, 20, 10, True),      # G = 1
], ids=["io-G5", "io-G1", "block-in<out", "block-in>out", "block-G1"])
def test_signed_square_root_activation(cls, cin, cout, bias, backend):
    block = cls(cin, cout, 48, use_bias=bias, activation=SignedSquareRoot1,
                backend=backend).to(DEVICE)
    check_module(block, torch.randn(2, 3, cin, device=DEVICE) * 3)


def test_signed_square_root1_is_the_reference_function():
    # A plain function, as in the original (its values: tests/test_original_fidelity.py).
    assert not isinstance(SignedSquareRoot1, type)
    x = torch.randn(4, 5, dtype=torch.float64) * 3
    assert torch.equal(SignedSquareRoot1(x), R.signed_square_root1(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,step,last_dim", [((2, 5, 12), 3, 2), ((2, 3, 4, 30), 5, 3),
                                                 ((3, 7, 48), 48, 2), ((1, 2, 3, 8), 1, 3)])
def test_interleave_module(shape, step, last_dim, backend):
    m = InterleaveChannelsFast(step, last_dim, backend=backend)
    x = torch.randn(*shape, device=DEVICE)
    assert torch.equal(m(x), R.interleave(x, step))
    check_module(m, x)


# --------------------------------------------------------------------------------------------
# The backend= module kwarg
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module_backend,global_backend", [("torch", "triton"), ("triton", "torch"),
                                                           (None, "torch"), (None, "triton")])
def test_module_backend_overrides_global_flag(module_backend, global_backend, monkeypatch):
    expected = module_backend or global_backend
    calls = spy_impls(monkeypatch)
    blocks = [
        (GroupedLinearFast(15, 21, 3, backend=module_backend), 15),
        (GroupedLinear(15, 21, 3, backend=module_backend), 15),
        (GroupedPointwiseConvolutionBlockIO(15, 21, 5, backend=module_backend), 15),  # G = 3
        (GroupedPointwiseConvolutionBlock(15, 21, 5, backend=module_backend), 15),
        # with an activation the non-IO block is composed from its children: they must follow
        (GroupedPointwiseConvolutionBlock(21, 15, 7, activation=SignedSquareRoot1,
                                          backend=module_backend), 21),
        (InterleaveChannelsFast(3, 2, backend=module_backend), 15),
        (InterleaveChannels(3, 2, backend=module_backend), 15),
    ]
    for block, cin in blocks:
        block.to(DEVICE)
        calls.clear()
        x = torch.randn(2, 3, cin, device=DEVICE, requires_grad=True)
        with kphi3_kernels.use_backend(global_backend):
            y = block(x)
            y.backward(torch.randn_like(y))
        ran = {b for b, _ in calls}
        assert ran == {expected}, (type(block).__name__, calls)


def test_block_backend_assignment_reaches_children():
    block = GroupedPointwiseConvolutionBlock(21, 15, 7, activation=SignedSquareRoot1)
    assert block.backend is None
    block.backend = "Torch"
    assert block.backend == "torch"
    for child in (block.first_pointwise_conv, block.second_pointwise_conv, block.interleave_layer):
        assert child.backend == "torch"
    block.backend = None
    assert block.first_pointwise_conv.backend is None


def test_module_backend_kwarg_rejects_unknown_name():
    for make in (lambda: GroupedLinearFast(4, 4, 2, backend="cuda"),
                 lambda: GroupedPointwiseConvolutionBlockIO(64, 64, 32, backend="fast"),
                 lambda: InterleaveChannelsFast(2, 2, backend=""),
                 lambda: InterleaveChannels(2, 2, backend="Fast")):
        with pytest.raises(ValueError, match="auto, triton, torch"):
            make()


# --------------------------------------------------------------------------------------------
# Meta tensors and deferred initialisation
# --------------------------------------------------------------------------------------------

META_MODULES = {
    "fast": lambda b: GroupedLinearFast(12, 6, 3, backend=b),
    "slow": lambda b: GroupedLinear(12, 6, 3, backend=b),
    "slow-G1": lambda b: GroupedLinear(12, 6, 1, backend=b),
    "io": lambda b: GroupedPointwiseConvolutionBlockIO(12, 6, 4, use_bias=True, backend=b),
    "io-G1": lambda b: GroupedPointwiseConvolutionBlockIO(12, 6, 32, backend=b),
    "block": lambda b: GroupedPointwiseConvolutionBlock(12, 12, 4, use_bias=True, backend=b),
    "block-in<out": lambda b: GroupedPointwiseConvolutionBlock(12, 24, 4, backend=b),
    "block-act": lambda b: GroupedPointwiseConvolutionBlock(12, 12, 4, activation=SignedSquareRoot1,
                                                            backend=b),
    "interleave": lambda b: InterleaveChannelsFast(3, 2, backend=b),
    "interleave-original": lambda b: InterleaveChannels(3, 2, backend=b),
}


@pytest.mark.parametrize("backend", [None, "torch", "triton"])
@pytest.mark.parametrize("name", list(META_MODULES))
def test_module_on_meta_tensors_like_nn_linear(name, backend, monkeypatch):
    """Built under torch.device("meta") and called on a meta input, a module returns a meta
    tensor of the right shape (and a meta gradient), whatever the backend, running no kernel."""
    from _utils import forbid_launch

    with torch.device("meta"):
        module = META_MODULES[name](backend)
    assert all(p.is_meta for p in module.parameters())
    forbid_launch(monkeypatch)
    x = torch.empty(2, 5, 12, device="meta", requires_grad=True)
    y = module(x)
    width = getattr(module, "out_features", 12)
    assert y.is_meta and y.shape == (2, 5, width)
    y.sum().backward()
    assert x.grad.is_meta and x.grad.shape == x.shape


@pytest.mark.parametrize("name", list(META_MODULES))
def test_meta_module_materialises_with_to_empty_and_reset_parameters(name):
    with torch.device("meta"):
        module = META_MODULES[name]("torch")
    module.to_empty(device=DEVICE)
    for p in module.parameters():
        with torch.no_grad():
            p.fill_(float("nan"))  # to_empty leaves garbage: every value must be re-initialised
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
    assert all(torch.isfinite(p).all() for p in module.parameters())
    if any(True for _ in module.parameters()):
        check_module(module, torch.randn(2, 3, 12, device=DEVICE))


def test_reset_parameters_draws_like_the_constructor():
    torch.manual_seed(3)
    built = GroupedPointwiseConvolutionBlockIO(240, 400, 48, use_bias=True)
    with torch.device("meta"):
        deferred = GroupedPointwiseConvolutionBlockIO(240, 400, 48, use_bias=True)
    deferred.to_empty(device="cpu")
    torch.manual_seed(3)
    deferred.reset_parameters()
    for (k, a), (_, b) in zip(built.state_dict().items(), deferred.state_dict().items()):
        assert torch.equal(a, b), k
