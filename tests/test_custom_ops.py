"""The registered operators (``torch.ops.kphi3``): the operator table (``registry.OPERATORS``,
op-level and fused alike) has every part on both backends; ``torch.library.opcheck`` on every
forward and backward operator, op-level and fused, of both backends (Triton through its
interpreter on CPU); ``torch.compile`` of every module with ``fullgraph=True`` against eager,
and ``torch.export`` of a module."""
import pytest
import torch
from torch.library import opcheck

from kphi3_kernels import (GroupedLinear, GroupedLinearFast, GroupedPointwiseConvolutionBlock,
                           GroupedPointwiseConvolutionBlockIO, InterleaveChannelsFast,
                           SignedSquareRoot1)
from kphi3_kernels.functional import _flatten
from kphi3_kernels import layout
from kphi3_kernels import reference as R
from kphi3_kernels.ops import custom_ops, registry

from _utils import DEVICE, FP32_TOL, rel_error

BACKENDS = ["torch", "triton"]
OPS = ["grouped_linear", "grouped_linear_bwd", "gpc_io", "gpc_io_bwd", "gpc_block",
       "gpc_block_bwd", "interleave"]
FUSED_OPS = ["silu_mul_layout", "silu_mul_layout_bwd", "gpc_io_layout", "gpc_io_layout_bwd",
             "mlp_tail", "mlp_tail_bwd", "rms_norm", "add_rms_norm", "rms_norm_bwd", "norm_io",
             "norm_io_bwd", "norm_io_split", "norm_io_split_bwd"]
CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
          "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
M = 5


def test_the_operator_table_holds_every_operator_with_every_part():
    """One table for op-level and fused operators: each on both backends, with a fake, an
    autograd formula (on the eager fast path too), a FLOP formula; the fused family's
    second derivatives are refused (their backward operators' formula raises)."""
    from kphi3_kernels.ops import flops

    assert set(registry.OPERATORS) == set(OPS) | set(FUSED_OPS)
    flop_registry = torch.utils.flop_counter.flop_registry
    for name, spec in registry.OPERATORS.items():
        assert spec.backends == tuple(BACKENDS)
        assert spec.family == ("op-level" if name in OPS else "fused")
        assert spec.any_order == (name in OPS)
        assert spec.flops is (flops.FORMULAS if name in OPS else flops.FUSED_FORMULAS)[name]
        for backend in BACKENDS:
            assert (name, backend) in registry._EAGER and registry._EAGER[(name, backend)][1]
            assert callable(spec.fake(backend))
            assert registry.op(name, backend) in flop_registry


def test_a_family_missing_a_part_is_refused():
    with pytest.raises(TypeError, match="FLOP formula missing for \\['x'\\]"):
        registry.register_family("test", lambda b: {"x": None}, lambda b: {"x": None},
                                 lambda b: {"x": (None, None)}, {})
    assert "x" not in registry.OPERATORS


def test_every_operator_is_registered_without_mutation_or_aliasing():
    for backend in BACKENDS:
        for name in registry.OPERATORS:
            schema = custom_ops.op(name, backend).default._schema
            assert schema.name == f"kphi3::{name}_{backend}"
            assert not schema.is_mutable
            for arg in (*schema.arguments, *schema.returns):
                assert arg.alias_info is None, (schema, arg)


# --------------------------------------------------------------------------------------------
# opcheck: tiny operands, contiguous or not, gradients required on all or on a subset
# --------------------------------------------------------------------------------------------


def _t(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


def _strided_3d(lead, channels, grad=False):
    """A 3-D input with column stride 2, flattened as ``functional.py`` does (a strided view)."""
    base = torch.randn(*lead, 2 * channels, device=DEVICE).requires_grad_(grad)
    return _flatten(base[..., ::2])


def _weight_t(G, k, n, grad=False):
    """A ``[G, k, n]`` weight stored transposed (non-contiguous)."""
    return torch.randn(G, n, k, device=DEVICE).transpose(1, 2).requires_grad_(grad)


def _xi(x, G):
    """The IO block's saved ``xi``: group n is ``x[:, n::G]``."""
    return R.interleave(x.detach(), x.shape[1] // G).contiguous()


def _h(backend, x, w1, w2):
    return custom_ops.op("gpc_block", backend)(x.detach(), w1.detach(), w2.detach(), None, None)[1]


# (id, op, args builder(backend)); G in {1, 3, 4}, channels 12..40
OPCHECK_CASES = [
    ("all-grad", "grouped_linear", lambda b: (_t(M, 12, grad=True), _t(3, 4, 5, grad=True),
                                              _t(3, 5, grad=True))),
    ("3d-strided-wT-w-grad", "grouped_linear",
     lambda b: (_strided_3d((2, 3), 12), _weight_t(1, 12, 7, grad=True), None)),
    ("all-needs", "grouped_linear_bwd", lambda b: (_t(M, 15, grad=True), _t(M, 12, grad=True),
                                                   _t(3, 4, 5, grad=True), True, True, True)),
    ("dx-only-strided", "grouped_linear_bwd",
     lambda b: (_strided_3d((1, M), 20, grad=True), _t(M, 16), _weight_t(4, 4, 5),
                True, False, False)),
    ("all-grad-save-xi", "gpc_io", lambda b: (_t(M, 12, grad=True), _t(3, 4, 5, grad=True),
                                              _t(3, 4, 5, grad=True), _t(3, 5, grad=True),
                                              _t(3, 5, grad=True), True)),
    ("3d-strided-x-grad-bias2", "gpc_io",
     lambda b: (_strided_3d((2, 3), 40, grad=True), _t(4, 10, 3), _weight_t(4, 10, 3), None,
                _t(4, 3), False)),
    ("all-needs-saved-xi", "gpc_io_bwd",
     lambda b: (lambda x: (_t(M, 15, grad=True), x.requires_grad_(), _xi(x, 3),
                           _t(3, 4, 5, grad=True), _t(3, 4, 5, grad=True),
                           True, True, True, True, True))(_t(M, 12))),
    ("dw2-db1-x-grad-no-xi", "gpc_io_bwd",
     lambda b: (_t(M, 12), _t(M, 16, grad=True), torch.empty(0, device=DEVICE), _t(4, 4, 3),
                _t(4, 4, 3), False, False, True, True, False)),
    ("all-grad", "gpc_block", lambda b: (_t(M, 12, grad=True), _t(3, 4, 5, grad=True),
                                         _t(3, 5, 5, grad=True), _t(3, 5, grad=True),
                                         _t(3, 5, grad=True))),
    ("no-w2-x-grad", "gpc_block", lambda b: (_strided_3d((1, M), 12, grad=True), _t(4, 3, 5),
                                             None, _t(4, 5), None)),
    ("all-needs", "gpc_block_bwd",
     lambda b: (lambda x, w1, w2: (_t(M, 15, grad=True), x.requires_grad_(),
                                   _h(b, x, w1, w2).requires_grad_(), w1.requires_grad_(),
                                   w2.requires_grad_(), True, True, True, True, True))(
         _t(M, 12), _t(3, 4, 5), _t(3, 5, 5))),
    ("no-w2-dx-db1", "gpc_block_bwd", lambda b: (_t(M, 20, grad=True), _t(M, 12), None,
                                                 _t(4, 3, 5, grad=True), None,
                                                 True, False, False, True, False)),
    ("grad", "interleave", lambda b: (_t(M, 12, grad=True), 3)),
    ("3d-strided", "interleave", lambda b: (_strided_3d((2, 3), 40), 8)),
]


# The fused decoder's operators: G = 3 groups of s = 4 (a layout run R = 2 with pad 2, or 8 with
# the default pad 8), og = 5. Their backward operators refuse a second derivative, so their
# operands require no grad (AOT dispatch would differentiate them).
FG, FS, FOG = 3, 4, 5
EPS = 1e-5


def _run_length(pad=8):
    return layout.residue_run_length(FG * FS, FG, pad)


def _layout_t(rows, pad=8, grad=False):
    return layout.to_residue_layout(torch.randn(rows, FG * FS, device=DEVICE), FG,
                                    pad).requires_grad_(grad)


def _w(grad=False):
    return _t(FG, FS, FOG, grad=grad)


def _rstd(x):
    return torch.rsqrt(x.float().pow(2).mean(-1) + EPS)


def _w_gate_up():
    """A gate_up_proj weight: 12 outputs, [gate | up] of 6 channels each."""
    return torch.randn(FG, FS, 4, device=DEVICE, requires_grad=True)


_ACT = (2, layout.residue_run_length(6, 2))  # the activation's layout: 6 channels in 2 groups


def _norm_saved(split):
    """``(dy, dh, x, norm_weight, rstd, <the block's saved input>, w1, w2)`` of a norm head."""
    x = _t(M, FG * FS)
    saved = ((_t(M, FG * FS), _xi(_t(M, FG * FS), FG)) if split else (_layout_t(M),))
    return (_t(M, FG * FOG), _t(M, FG * FS), x, _t(FG * FS), _rstd(x), *saved, _w(), _w())


FUSED_OPCHECK_CASES = [
    ("all-grad", "silu_mul_layout", lambda b: (_t(M, 2 * FG * FS, grad=True), FG, _run_length())),
    ("strided-pad2", "silu_mul_layout", lambda b: (_strided_3d((1, M), 2 * FG * FS), FG, _run_length(2))),
    ("plain", "silu_mul_layout_bwd", lambda b: (_layout_t(M), _t(M, 2 * FG * FS), FG)),
    ("all-grad", "gpc_io_layout", lambda b: (_layout_t(M, grad=True), _w(True), _w(True),
                                             _t(FG, FOG, grad=True), None)),
    ("pad2-w-grad", "gpc_io_layout", lambda b: (_layout_t(M, 2), _weight_t(FG, FS, FOG, True),
                                                _w(), None, _t(FG, FOG))),
    ("all-needs", "gpc_io_layout_bwd", lambda b: (_t(M, FG * FOG), _layout_t(M), _w(), _w(),
                                                  True, True, True, True, True)),
    ("dw2-only", "gpc_io_layout_bwd", lambda b: (_t(M, FG * FOG), _layout_t(M, 2), _w(), _w(),
                                                 False, False, True, False, False)),
    ("residual-all-grad", "mlp_tail",
     lambda b: (_t(M, 2 * FG * FS, grad=True), _w(True), _w(True), _t(FG, FOG, grad=True), None,
                _t(M, FG * FOG, grad=True), _run_length(), None)),
    ("no-residual-w1-grad", "mlp_tail", lambda b: (_strided_3d((1, M), 2 * FG * FS), _w(True),
                                                   _w(), None, None, None, _run_length(2), None)),
    # The activation given (what a norm head wrote): returned empty, saved for the backward.
    ("given-activation", "mlp_tail", lambda b: (_t(M, 2 * FG * FS, grad=True), _w(True), _w(),
                                                None, None, _t(M, FG * FOG), _run_length(),
                                                _layout_t(M))),
    ("all-needs", "mlp_tail_bwd", lambda b: (_t(M, FG * FOG), _t(M, 2 * FG * FS),
                                             _layout_t(M), _w(), _w(), True, True, True, True,
                                             True)),
    ("dgu-only", "mlp_tail_bwd", lambda b: (_t(M, FG * FOG), _t(M, 2 * FG * FS), _layout_t(M),
                                            _w(), _w(), True, False, False, False, False)),
    ("all-grad", "rms_norm", lambda b: (_t(M, 40, grad=True), _t(40, grad=True), EPS)),
    ("strided", "rms_norm", lambda b: (_strided_3d((1, M), 40), _t(40), EPS)),
    ("all-grad", "add_rms_norm",
     lambda b: (_t(M, 40, grad=True), _t(M, 40, grad=True), _t(40, grad=True), EPS)),
    ("fp16-x-w-grad", "add_rms_norm",
     lambda b: (_t(M, 40), _t(M, 40).half(), _t(40, grad=True), EPS)),
    ("with-dh", "rms_norm_bwd",
     lambda b: (lambda x: (_t(M, 40), _t(M, 40), x, _t(40), _rstd(x), True, True))(_t(M, 40))),
    ("dw-only", "rms_norm_bwd",
     lambda b: (lambda x: (_t(M, 40), None, x, _t(40), _rstd(x), False, True))(_t(M, 40))),
    ("residual-all-grad", "norm_io",
     lambda b: (_t(M, FG * FS, grad=True), _t(FG * FS, grad=True), EPS, _w(True), _w(True),
                _t(FG, FOG, grad=True), _t(FG, FOG, grad=True), _t(M, FG * FS, grad=True),
                _run_length(), 0, 0)),
    ("x-grad", "norm_io", lambda b: (_strided_3d((1, M), FG * FS, grad=True), _t(FG * FS), EPS,
                                     _w(), _w(), None, None, None, _run_length(2), 0, 0)),
    # gate_up_proj's head: [gate | up] of 6 channels each, their activation in 2 groups.
    ("activation", "norm_io", lambda b: (_t(M, FG * FS, grad=True), _t(FG * FS), EPS,
                                         _w_gate_up(), _w_gate_up(), None, None, None,
                                         _run_length(), *_ACT)),
    ("all-needs", "norm_io_bwd", lambda b: (*_norm_saved(False), True, True, True, True, True,
                                            True)),
    ("no-dh-dnorm", "norm_io_bwd", lambda b: (lambda a: (a[0], None, *a[2:], False, True, False,
                                                         True, False, False))(_norm_saved(False))),
    ("residual-all-grad", "norm_io_split",
     lambda b: (_t(M, FG * FS, grad=True), _t(FG * FS, grad=True), EPS, _w(True), _w(True),
                _t(FG, FOG, grad=True), None, _t(M, FG * FS, grad=True), 0, 0)),
    ("w-grad", "norm_io_split", lambda b: (_t(M, FG * FS), _t(FG * FS), EPS, _w(True), _w(),
                                           None, _t(FG, FOG), None, 0, 0)),
    ("activation", "norm_io_split", lambda b: (_t(M, FG * FS), _t(FG * FS, grad=True), EPS,
                                               _w_gate_up(), _w_gate_up(), None, None,
                                               _t(M, FG * FS, grad=True), *_ACT)),
    ("all-needs", "norm_io_split_bwd",
     lambda b: (*_norm_saved(True), True, True, True, True, True, True)),
    ("no-dh-dx", "norm_io_split_bwd", lambda b: (lambda a: (a[0], None, *a[2:], True, False,
                                                            True, False, True, False))(
        _norm_saved(True))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make", [pytest.param(n, m, id=f"{n}-{i}")
                                       for i, n, m in OPCHECK_CASES + FUSED_OPCHECK_CASES])
def test_opcheck(name, make, backend):
    opcheck(custom_ops.op(name, backend).default, make(backend), test_utils=CHECKS)


def test_opcheck_cases_cover_every_operator():
    assert {n for _, n, _ in OPCHECK_CASES + FUSED_OPCHECK_CASES} == set(registry.OPERATORS)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) of every module against eager, and torch.export
# --------------------------------------------------------------------------------------------

MODULES = {
    "fast": lambda b: GroupedLinearFast(12, 15, 3, backend=b),
    "slow": lambda b: GroupedLinear(12, 15, 3, backend=b),
    "slow-G1": lambda b: GroupedLinear(12, 15, 1, backend=b),
    "interleave": lambda b: InterleaveChannelsFast(4, 2, backend=b),
    "io": lambda b: GroupedPointwiseConvolutionBlockIO(12, 16, 3, use_bias=True, backend=b),
    "io-G1": lambda b: GroupedPointwiseConvolutionBlockIO(12, 16, 32, backend=b),
    "block": lambda b: GroupedPointwiseConvolutionBlock(12, 12, 4, use_bias=True, backend=b),
    "block-in<out": lambda b: GroupedPointwiseConvolutionBlock(12, 24, 4, backend=b),
    "block-act": lambda b: GroupedPointwiseConvolutionBlock(12, 12, 4, use_bias=True,
                                                            activation=SignedSquareRoot1,
                                                            backend=b),
}
# Inductor for the grouped layers on the torch backend; elsewhere the AOT-autograd graph
# (aot_eager) shows all there is to see (the interpreted Triton operators are opaque) and spares
# the C++ builds.
INDUCTOR = ("fast", "io", "block")


def _run(module, x):
    y = module(x)
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape)
    grads = torch.autograd.grad(y, [x, *module.parameters()], dy)
    return y, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_compile_fullgraph_matches_eager(name, backend):
    module = MODULES[name](backend).to(DEVICE)
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    torch._dynamo.reset()
    compiler = "inductor" if backend == "torch" and name in INDUCTOR else "aot_eager"
    compiled = torch.compile(module, fullgraph=True, backend=compiler)
    y, grads = _run(compiled, x)  # fullgraph: a graph break would raise here
    y_eager, grads_eager = _run(module, x)
    assert y.shape == y_eager.shape
    errs = [rel_error(a, b) for a, b in zip([y, *grads], [y_eager, *grads_eager])]
    assert max(errs) < FP32_TOL, errs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,op", [("io", "gpc_io"), ("block", "gpc_block"),
                                     ("fast", "grouped_linear"), ("interleave", "interleave")])
def test_export(name, op, backend):
    module = MODULES[name](backend).to(DEVICE)
    x = torch.randn(4, 12, device=DEVICE)
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(module, (x,), dynamic_shapes={"x": {0: batch}})
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert f"kphi3.{op}_{backend}.default" in targets, targets
    for rows in (4, 7):
        x = torch.randn(rows, 12, device=DEVICE)
        assert rel_error(exported.module()(x), module(x)) < FP32_TOL


def test_compiled_module_follows_its_backend():
    """The backend is resolved while tracing: the graph calls that backend's operator."""
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    module = GroupedPointwiseConvolutionBlockIO(12, 16, 3, backend="triton").to(DEVICE)
    torch._dynamo.reset()
    torch.compile(module, fullgraph=True, backend=record)(torch.randn(5, 12, device=DEVICE))
    assert any("kphi3.gpc_io_triton" in s for s in seen), seen


def test_compile_under_autocast_matches_eager():
    """Autocast still casts in functional.py when compiled: bf16 out, fp32 parameter gradients."""
    module = GroupedPointwiseConvolutionBlockIO(12, 16, 3, use_bias=True, backend="torch")
    x = torch.randn(4, 12, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, grads = _run(compiled, x)
        y_eager, grads_eager = _run(module, x)
    assert y.dtype == y_eager.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads)
    assert all(torch.equal(a, b) for a, b in zip([y, *grads], [y_eager, *grads_eager]))
