"""Bad input: a ValueError / TypeError whose message names the argument and the problem, raised
by the one validation layer (``functional.py``, shared by both backends) before any kernel or
launcher runs (every launcher of both backends is replaced by one that fails the test), also
under fake tensors and under ``torch.compile``."""
import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kphi3_kernels as K
from kphi3_kernels import (GroupedLinear, GroupedLinearFast, GroupedPointwiseConvolutionBlock,
                           GroupedPointwiseConvolutionBlockIO, InterleaveChannels,
                           InterleaveChannelsFast, group_count)

from _utils import DEVICE, forbid_launch

BACKENDS = ["torch", "triton"]
G, S, OG = 3, 5, 4
C = G * S


# Tensors live where the triton backend can run (CUDA, or CPU under the interpreter), so that each
# case fails on its own problem rather than on the backend's device check.
def _x(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


def _w(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


W = (G, S, OG)
W2_BLOCK = (G, OG, OG)

# (id, call(backend), exception, message regex)
CASES = [
    # wrong last dimension
    ("gl-last-dim", lambda b: K.grouped_linear(_x(4, C - 1), _w(*W), backend=b), ValueError,
     r"last dimension is 14 .*15"),
    ("io-last-dim", lambda b: K.gpc_io(_x(2, 3, C + 3), _w(*W), _w(*W), backend=b), ValueError,
     r"last dimension is 18 .*15"),
    ("block-last-dim", lambda b: K.gpc_block(_x(4, 2 * C), _w(*W), _w(*W2_BLOCK), backend=b),
     ValueError, r"last dimension is 30 .*15"),
    # 0-d input
    ("gl-0d", lambda b: K.grouped_linear(_x(), _w(*W), backend=b), ValueError, "0-d"),
    ("io-0d", lambda b: K.gpc_io(_x(), _w(*W), _w(*W), backend=b), ValueError, "0-d"),
    ("block-0d", lambda b: K.gpc_block(_x(), _w(*W), backend=b), ValueError, "0-d"),
    ("interleave-0d", lambda b: K.interleave(_x(), 1, backend=b), ValueError, "0-d"),
    # not a tensor
    ("gl-list", lambda b: K.grouped_linear([[1.0] * C], _w(*W), backend=b), TypeError, "Tensor"),
    ("interleave-list", lambda b: K.interleave([1.0, 2.0], 1, backend=b), TypeError, "Tensor"),
    # integer / non-floating dtypes
    ("gl-int-input", lambda b: K.grouped_linear(torch.ones(4, C, dtype=torch.int64), _w(*W),
                                                backend=b), TypeError, "floating-point.*int64"),
    ("io-int32-input", lambda b: K.gpc_io(torch.ones(4, C, dtype=torch.int32), _w(*W), _w(*W),
                                          backend=b), TypeError, "floating-point.*int32"),
    ("block-bool-input", lambda b: K.gpc_block(torch.ones(4, C, dtype=torch.bool), _w(*W),
                                               backend=b), TypeError, "floating-point.*bool"),
    ("gl-complex-input", lambda b: K.grouped_linear(torch.ones(4, C, dtype=torch.complex64),
                                                    _w(*W), backend=b), TypeError, "floating-point"),
    ("gl-int-weight", lambda b: K.grouped_linear(_x(4, C), torch.ones(*W, dtype=torch.int64),
                                                 backend=b), TypeError, "int64"),
    # mismatched dtypes outside autocast
    ("gl-dtype", lambda b: K.grouped_linear(_x(4, C), _w(*W, dtype=torch.float16), backend=b),
     TypeError, r"float32 does not match .*float16"),
    ("io-dtype-w2", lambda b: K.gpc_io(_x(4, C, dtype=torch.float16), _w(*W, dtype=torch.float16),
                                       _w(*W), backend=b), TypeError, "does not match"),
    ("block-dtype-bias", lambda b: K.gpc_block(_x(4, C), _w(*W), _w(*W2_BLOCK),
                                               torch.zeros(G, OG, dtype=torch.float64), backend=b),
     TypeError, "float64"),
    ("gl-bf16-vs-fp16", lambda b: K.grouped_linear(_x(4, C, dtype=torch.bfloat16),
                                                   _w(*W, dtype=torch.float16), backend=b),
     TypeError, "does not match"),
    # shapes of parameters
    ("gl-2d-weight", lambda b: K.grouped_linear(_x(4, C), _w(C, OG), backend=b), ValueError,
     r"\[G, in/G, out/G\]"),
    ("gl-bias-shape", lambda b: K.grouped_linear(_x(4, C), _w(*W), torch.zeros(G * OG),
                                                 backend=b), ValueError, "bias must have shape"),
    ("io-weight-shapes", lambda b: K.gpc_io(_x(4, C), _w(*W), _w(G, S, OG + 1), backend=b),
     ValueError, "both weights"),
    ("io-bias2-shape", lambda b: K.gpc_io(_x(4, C), _w(*W), _w(*W), None, torch.zeros(G, OG + 1),
                                          backend=b), ValueError, "bias2 must have shape"),
    ("block-w2-shape", lambda b: K.gpc_block(_x(4, C), _w(*W), _w(G, S, OG), backend=b),
     ValueError, "second weight"),
    # interleave step
    ("interleave-step-not-divisor", lambda b: K.interleave(_x(4, 10), 3, backend=b), ValueError,
     r"step 3 .*divisor.* 10"),
    ("interleave-step-zero", lambda b: K.interleave(_x(4, 10), 0, backend=b), ValueError, "step 0"),
    ("interleave-step-negative", lambda b: K.interleave(_x(4, 10), -2, backend=b), ValueError,
     "step -2"),
    ("interleave-step-float", lambda b: K.interleave(_x(4, 10), 2.0, backend=b), TypeError,
     r"step must be an integer, got 2.0 \(float\)"),
    ("interleave-step-str", lambda b: K.interleave(_x(4, 12), "3", backend=b), TypeError,
     r"step must be an integer, got '3' \(str\)"),
    ("interleave-step-none", lambda b: K.interleave(_x(4, 12), None, backend=b), TypeError,
     r"step must be an integer, got None \(NoneType\)"),
    ("interleave-step-numpy-not-divisor", lambda b: K.interleave(_x(4, 10), np.int64(3),
                                                                 backend=b), ValueError,
     r"step 3 .*divisor.* 10"),
    ("interleave-step-zero-no-channels", lambda b: K.interleave(_x(4, 0), 0, backend=b),
     ValueError, "step 0"),
    # device mismatch that CPU can show: a meta parameter with a CPU input
    ("gl-meta-weight", lambda b: K.grouped_linear(_x(4, C), _w(*W, device="meta"), backend=b),
     ValueError, "meta"),
    ("io-meta-bias", lambda b: K.gpc_io(_x(4, C), _w(*W), _w(*W), None,
                                        torch.zeros(G, OG, device="meta"), backend=b),
     ValueError, "meta"),
    # parameters that are not tensors (numpy arrays, a missing weight)
    ("gl-numpy-bias", lambda b: K.grouped_linear(_x(4, C), _w(*W), np.zeros((G, OG), "float32"),
                                                 backend=b), TypeError, "bias must be a torch.Tensor, got ndarray"),
    ("gl-numpy-weight", lambda b: K.grouped_linear(_x(4, C), np.zeros(W, "float32"), backend=b),
     TypeError, "weight must be a torch.Tensor, got ndarray"),
    ("io-weight2-none", lambda b: K.gpc_io(_x(4, C), _w(*W), None, backend=b), TypeError,
     "weight2 must be a torch.Tensor, got None"),
    ("block-numpy-bias2", lambda b: K.gpc_block(_x(4, C), _w(*W), _w(*W2_BLOCK), None,
                                                np.zeros((G, OG)), backend=b),
     TypeError, "bias2 must be a torch.Tensor"),
    # a second bias without the second weight would be silently unused
    ("block-bias2-without-weight2", lambda b: K.gpc_block(_x(4, C), _w(*W), None, None,
                                                          _w(G, OG), backend=b),
     ValueError, "bias2 is given but weight2 is None"),
    # zero-size dimensions other than the rows: refused (zero rows work, test_ops_parity)
    ("gl-zero-channels", lambda b: K.grouped_linear(_x(4, 0), _w(G, 0, OG), backend=b), ValueError,
     r"weight of shape \(3, 0, 4\) has zero groups or zero channels"),
    ("gl-zero-out", lambda b: K.grouped_linear(_x(4, C), _w(G, S, 0), backend=b), ValueError,
     "zero groups or zero channels"),
    ("io-zero-out", lambda b: K.gpc_io(_x(4, C), _w(G, S, 0), _w(G, S, 0), backend=b),
     ValueError, "weight1 of shape .* zero groups or zero channels"),
    ("block-zero-groups", lambda b: K.gpc_block(_x(4, 0), _w(0, S, OG), backend=b), ValueError,
     "zero groups or zero channels"),
    # a bool is not a step
    ("interleave-step-bool", lambda b: K.interleave(_x(4, 10), True, backend=b), TypeError,
     "got True: a bool is not a step"),
    ("interleave-step-false", lambda b: K.interleave(_x(4, 10), False, backend=b), TypeError,
     "a bool is not a step"),
    # InterleaveChannels: the channels must divide into step_size slices
    ("interleave-channels-not-divisible", lambda b: InterleaveChannels(4, 2, backend=b)(_x(2, 3, 10)),
     ValueError, r"InterleaveChannels: the last dimension 10 is not divisible by step_size=4"),
    ("interleave-channels-0d", lambda b: InterleaveChannels(2, backend=b)(_x()), ValueError,
     "InterleaveChannels: .*0-d"),
    ("interleave-channels-list", lambda b: InterleaveChannels(2, backend=b)([1.0, 2.0]),
     TypeError, "InterleaveChannels: expected a torch.Tensor"),
]

UNKNOWN_BACKEND = [
    ("gl", lambda: K.grouped_linear(_x(4, C), _w(*W), backend="cuda")),
    ("io", lambda: K.gpc_io(_x(4, C), _w(*W), _w(*W), backend="Triton2")),
    ("block", lambda: K.gpc_block(_x(4, C), _w(*W), backend="")),
    ("interleave", lambda: K.interleave(_x(4, C), 3, backend="numpy")),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,exc,msg", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input_raises_before_launch(call, exc, msg, backend, monkeypatch):
    forbid_launch(monkeypatch)
    with pytest.raises(exc, match=msg):
        call(backend)


# The same checks while tensors are fake and while torch.compile traces: the validation is
# ordinary Python over shapes and dtypes, so it raises the same error there.
FAKE_AND_COMPILE = ["gl-last-dim", "io-0d", "gl-int-input", "io-dtype-w2", "block-w2-shape",
                    "interleave-step-not-divisor", "gl-numpy-bias", "io-weight2-none",
                    "gl-zero-channels", "io-zero-out", "interleave-step-bool",
                    "interleave-step-float", "interleave-step-str", "block-bias2-without-weight2",
                    "interleave-channels-not-divisible"]
BY_ID = {c[0]: c[1:] for c in CASES}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FAKE_AND_COMPILE)
def test_bad_input_raises_under_fake_tensors(case, backend, monkeypatch):
    call, exc, msg = BY_ID[case]
    forbid_launch(monkeypatch)
    with FakeTensorMode(), pytest.raises(exc, match=msg):
        call(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FAKE_AND_COMPILE)
def test_bad_input_raises_under_torch_compile(case, backend, monkeypatch):
    call, exc, msg = BY_ID[case]
    forbid_launch(monkeypatch)
    torch._dynamo.reset()
    with pytest.raises(exc, match=msg):
        torch.compile(lambda: call(backend), backend="eager")()


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in UNKNOWN_BACKEND])
def test_unknown_backend_name(call, monkeypatch):
    forbid_launch(monkeypatch)
    with pytest.raises(ValueError, match="auto, triton, torch"):
        call()


def test_forbid_launch_really_forbids(monkeypatch):
    """The guard the other tests rely on: with it, a valid call fails."""
    forbid_launch(monkeypatch)
    for backend in BACKENDS:
        with pytest.raises(AssertionError, match="kernel"):
            K.grouped_linear(_x(4, C), _w(*W), backend=backend)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,msg", [
    (lambda: GroupedLinearFast(10, 6, 4), r"in_features=10 .*num_groups=4"),
    (lambda: GroupedLinearFast(12, 10, 4), r"out_features=10 .*num_groups=4"),
    (lambda: GroupedLinear(12, 10, 4), r"out_features=10 .*num_groups=4"),
    (lambda: GroupedLinearFast(12, 8, 0), "num_groups"),
    (lambda: GroupedLinear(12, 8, -2), "num_groups"),
    (lambda: GroupedLinearFast(0, 8, 2), "in_features=0"),
    (lambda: GroupedPointwiseConvolutionBlockIO(64, 64, 0), "min_channels_per_group"),
    (lambda: GroupedPointwiseConvolutionBlock(64, 64, 0), "min_channels_per_group"),
    (lambda: group_count(64, 64, 0), "min_channels_per_group"),
    (lambda: InterleaveChannelsFast(0, 2), "step_size"),
    (lambda: InterleaveChannelsFast(np.int64(-2), 2), "step_size must be a positive integer, got -2"),
], ids=["in-not-divisible", "out-not-divisible", "slow-out-not-divisible", "zero-groups",
        "negative-groups", "zero-features", "io-min0", "block-min0", "group_count-min0",
        "interleave-step0", "interleave-step-numpy-negative"])
def test_module_construction_errors(make, msg):
    with pytest.raises(ValueError, match=msg):
        make()


@pytest.mark.parametrize("make,msg", [
    (lambda: GroupedLinearFast(6, 9, True), "num_groups must be an integer, got True"),
    (lambda: GroupedLinear(6, 9, True), "num_groups must be an integer, got True"),
    (lambda: GroupedLinearFast(6.0, 9, 3), "in_features must be an integer, got 6.0"),
    (lambda: GroupedPointwiseConvolutionBlockIO(64, 64, min_channels_per_group=2.5),
     "min_channels_per_group must be an integer, got 2.5"),
    (lambda: GroupedPointwiseConvolutionBlock(64, 64, min_channels_per_group=True),
     "min_channels_per_group must be an integer, got True"),
    (lambda: group_count(64, 32.0, 8), "out_features must be an integer"),
    # a bool is not a step either (InterleaveChannels' original treats any step below 2 as 1,
    # but never a bool or a float)
    (lambda: InterleaveChannelsFast(True, 2), r"step_size must be an integer, got True \(bool\)"),
    (lambda: InterleaveChannelsFast(2.0, 2), r"step_size must be an integer, got 2.0 \(float\)"),
    (lambda: InterleaveChannels(True, 2), r"InterleaveChannels: step_size must be an integer, got True"),
    (lambda: InterleaveChannels(2.0, 2), r"InterleaveChannels: step_size must be an integer, got 2.0"),
    (lambda: InterleaveChannels("2"), r"step_size must be an integer, got '2' \(str\)"),
], ids=["fast-bool-groups", "slow-bool-groups", "fast-float-in", "io-float-min", "block-bool-min",
        "group_count-float-out", "interleave-step-bool", "interleave-step-float",
        "interleave-channels-step-bool", "interleave-channels-step-float",
        "interleave-channels-step-str"])
def test_module_construction_type_errors(make, msg):
    with pytest.raises(TypeError, match=msg):
        make()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,cin", [
    (lambda b: GroupedLinearFast(15, 12, 3, backend=b), 15),
    (lambda b: GroupedLinear(15, 12, 3, backend=b), 15),
    (lambda b: GroupedLinear(15, 12, 1, backend=b), 15),                       # nn.Linear path
    (lambda b: GroupedPointwiseConvolutionBlockIO(15, 12, 5, backend=b), 15),  # G = 3
    (lambda b: GroupedPointwiseConvolutionBlockIO(15, 12, 32, backend=b), 15),  # G = 1
    (lambda b: GroupedPointwiseConvolutionBlock(15, 12, 5, backend=b), 15),
], ids=["fast", "slow", "slow-G1", "io", "io-G1", "block"])
def test_module_wrong_last_dim(make, cin, backend, monkeypatch):
    module = make(backend).to(DEVICE)
    forbid_launch(monkeypatch)
    with pytest.raises(ValueError, match=rf"last dimension is {cin + 1}"):
        module(_x(2, cin + 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_dtype_mismatch(backend, monkeypatch):
    module = GroupedPointwiseConvolutionBlockIO(15, 12, 5, backend=backend).to(DEVICE)
    forbid_launch(monkeypatch)
    with pytest.raises(TypeError, match="does not match"):
        module(_x(2, 15, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Not errors: no channels, no rows, integer-like steps and counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [1, 2, 3, 7])
@pytest.mark.parametrize("lead", [(4,), (2, 3), (0,)])
def test_interleave_of_no_channels_is_the_empty_result(lead, step, backend):
    # Every positive step divides 0: like torch's own ops, the result is empty, not an error.
    x = _x(*lead, 0).requires_grad_()
    y = K.interleave(x, step, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.shape == x.shape
    m = InterleaveChannels(step, backend=backend)
    y = m(x)
    assert y.shape == x.shape
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.shape == x.shape


def test_interleave_of_no_channels_on_meta_and_fake_tensors():
    x = torch.empty(2, 3, 0, device="meta", requires_grad=True)
    assert K.interleave(x, 2).shape == (2, 3, 0)
    with FakeTensorMode():
        assert K.interleave(torch.empty(5, 0), 4).shape == (5, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_interleave_of_no_rows(lead, backend):
    x = _x(*lead, 12).requires_grad_()
    y = K.interleave(x, 3, backend=backend)
    assert y.shape == x.shape
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert dx.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("step", [np.int64(3), np.int32(3), np.uint8(3)],
                         ids=["int64", "int32", "uint8"])
def test_interleave_accepts_integer_like_steps(step, backend):
    x = _x(2, 12)
    assert torch.equal(K.interleave(x, step, backend=backend), K.interleave(x, 3, backend=backend))
    m = InterleaveChannelsFast(step, 2, backend=backend)
    assert type(m.step_size) is int and m.step_size == 3
    assert torch.equal(m(x), K.interleave(x, 3, backend=backend))


def test_modules_accept_integer_like_counts():
    fast = GroupedLinearFast(np.int64(15), np.int32(12), np.int64(3))
    slow = GroupedLinear(np.int64(15), 12, np.int16(3))
    for m in (fast, slow):
        assert all(type(v) is int for v in (m.in_features, m.out_features, m.num_groups))
    assert fast.weight.shape == (3, 5, 4)
    for cls in (GroupedPointwiseConvolutionBlockIO, GroupedPointwiseConvolutionBlock):
        block = cls(np.int64(15), np.int64(12), np.int64(5))
        assert block.num_groups == group_count(15, 12, 5) == 3
        assert type(block.in_features) is int and type(block.min_channels_per_group) is int
    assert group_count(np.int64(1280), np.int64(5120), np.int64(256)) == 5


# --------------------------------------------------------------------------------------------
# CUDA only
# --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_cpu_cuda_mismatch(backend, monkeypatch):
    forbid_launch(monkeypatch)
    with pytest.raises(ValueError, match="cuda"):
        K.grouped_linear(_x(4, C, device="cuda"), _w(*W), backend=backend)
    with pytest.raises(ValueError, match="cuda"):
        K.gpc_io(_x(4, C), _w(*W, device="cuda"), _w(*W, device="cuda"), backend="torch")
