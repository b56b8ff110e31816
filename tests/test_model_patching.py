"""apply_kphi3_kernels on models built from modules with the original class names (as the original
remote code builds them): in-place replacement, the same Parameter objects, the same outputs."""
import math
import os

import pytest
import torch
from torch import nn

import kphi3_kernels as kk
from kphi3_model import KPhi3Config, KPhi3ForCausalLM, apply_kphi3_kernels
from _utils import FP32_TOL, rel_error

BACKEND = "triton" if kk.backend.triton_available() and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") else "torch"


# --- Stand-ins for the original remote-code layers: the original class and attribute names, the
# --- semantics of docs/layers.md, written plainly (not the kphi3_kernels classes).

def original_group_count(cin, cout, minimum):
    limit = max(1, min(cin, cout, cin // minimum))
    return next(d for d in range(limit, 0, -1) if cin % d == 0 and cout % d == 0)


class GroupedLinearFast(nn.Module):
    def __init__(self, in_features, out_features, num_groups=1, bias=True):
        super().__init__()
        self.in_features, self.out_features, self.num_groups = in_features, out_features, num_groups
        self.in_features_per_group = in_features // num_groups
        self.out_features_per_group = out_features // num_groups
        self.weight = nn.Parameter(torch.empty(num_groups, self.in_features_per_group, self.out_features_per_group))
        self.bias = nn.Parameter(torch.empty(num_groups, self.out_features_per_group)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -0.5, 0.5)

    def forward(self, x):
        x = x.view(*x.shape[:-1], self.num_groups, self.in_features_per_group)
        out = torch.einsum("...ni,niq->...nq", x, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*out.shape[:-2], self.out_features)


class GroupedLinear(nn.Module):
    def __init__(self, in_features, out_features, num_groups=1, bias=True):
        super().__init__()
        self.num_groups = num_groups
        self.group_layers = nn.ModuleList(
            nn.Linear(in_features // num_groups, out_features // num_groups, bias=bias) for _ in range(num_groups))

    def forward(self, x):
        return torch.cat([layer(c) for layer, c in zip(self.group_layers, x.chunk(self.num_groups, -1))], -1)


class InterleaveChannelsFast(nn.Module):
    def __init__(self, step_size=2, last_dim=3):
        super().__init__()
        self.step_size, self.last_dim = max(step_size, 1), last_dim

    def forward(self, x):
        C = x.shape[-1]
        return x.reshape(*x.shape[:-1], self.step_size, C // self.step_size).transpose(-1, -2).reshape(x.shape)


class _OriginalBlock(nn.Module):
    def __init__(self, in_features, out_features, min_channels_per_group=32, last_dim=2, use_bias=False,
                 activation=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.min_channels_per_group, self.last_dim = min_channels_per_group, last_dim
        self.use_bias, self.activation = use_bias, activation
        self.groups = original_group_count(in_features, out_features, min_channels_per_group)
        self.grouped = self.groups > 1

    def act(self, x):
        return x if self.activation is None else self.activation(x)


class GroupedPointwiseConvolutionBlockIO(_OriginalBlock):
    def __init__(self, in_features, out_features, *args, **kwargs):
        super().__init__(in_features, out_features, *args, **kwargs)
        G = self.groups
        if self.grouped:
            self.first_pointwise_conv = GroupedLinearFast(in_features, out_features, G, bias=self.use_bias)
            self.interleave_layer = InterleaveChannelsFast(in_features // G, last_dim=self.last_dim)
            self.second_pointwise_conv = GroupedLinearFast(in_features, out_features, G, bias=self.use_bias)
        else:
            self.first_pointwise_conv = GroupedLinear(in_features, out_features, 1, bias=self.use_bias)

    def forward(self, x):
        if not self.grouped:
            return self.act(self.first_pointwise_conv(x))
        return self.act(self.first_pointwise_conv(x) + self.second_pointwise_conv(self.interleave_layer(x)))


class GroupedPointwiseConvolutionBlock(_OriginalBlock):
    def __init__(self, in_features, out_features, *args, **kwargs):
        super().__init__(in_features, out_features, *args, **kwargs)
        G = self.groups
        self.output_group_size = out_features // G
        if self.grouped:
            self.first_pointwise_conv = GroupedLinearFast(in_features, out_features, G, bias=self.use_bias)
            if self.output_group_size > 1:
                self.interleave_layer = InterleaveChannelsFast(self.output_group_size, last_dim=self.last_dim)
            if in_features >= out_features:
                self.second_pointwise_conv = GroupedLinearFast(out_features, out_features, G, bias=self.use_bias)
        else:
            self.first_pointwise_conv = GroupedLinear(in_features, out_features, 1, bias=self.use_bias)

    def forward(self, x):
        h = self.act(self.first_pointwise_conv(x))
        if not self.grouped:
            return h
        residual = h
        if self.output_group_size > 1:
            h = self.interleave_layer(h)
        if hasattr(self, "second_pointwise_conv"):
            h = self.act(self.second_pointwise_conv(h)) + residual
        return h


class OriginalStyleNet(nn.Module):
    """Every original layer kind: IO blocks (grouped, single-group, with bias and activation), non-IO
    blocks (with the second conv, without it), a bare GroupedLinearFast and InterleaveChannelsFast,
    and one block shared by two parents."""

    def __init__(self):
        super().__init__()
        self.io = GroupedPointwiseConvolutionBlockIO(32, 48, min_channels_per_group=8)  # G = 4
        self.io_single = GroupedPointwiseConvolutionBlockIO(48, 40, min_channels_per_group=64)  # G = 1
        self.io_biased = GroupedPointwiseConvolutionBlockIO(40, 40, 8, use_bias=True, activation=nn.SiLU())
        self.block = GroupedPointwiseConvolutionBlock(40, 40, min_channels_per_group=8, activation=nn.Tanh())
        self.block_expand = GroupedPointwiseConvolutionBlock(40, 80, min_channels_per_group=8)
        self.tail = nn.Sequential(GroupedLinearFast(80, 64, 4, bias=True), InterleaveChannelsFast(8, 2))
        self.shared = nn.ModuleList([self.io_biased])  # the same module under a second parent

    def forward(self, x):
        x = self.io_biased(self.io_single(self.io(x)))
        return self.tail(self.block_expand(self.block(self.shared[0](x))))


def forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_apply_kphi3_kernels_on_original_layers():
    torch.manual_seed(0)
    model = OriginalStyleNet()
    x = torch.randn(2, 3, 32)
    ref_y, ref_grads = forward_backward(model, x)
    params_before = list(model.parameters())
    keys_before = list(model.state_dict())
    with torch.no_grad():
        weights = {n: p.clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.step()  # optimizer state now exists for every parameter

    replaced = apply_kphi3_kernels(model, backend=BACKEND)
    with torch.no_grad():  # undo the step, in place, so the outputs can be compared with the reference
        for n, p in model.named_parameters():
            p.copy_(weights[n])

    # io: block + 2 GLF + interleave (4); io_single: block (1); io_biased: 4 (counted once although
    # shared); block: 4; block_expand: block + GLF + interleave (3); tail: GLF + interleave (2).
    assert replaced == 18
    for module in (model.io, model.io_single, model.io_biased, model.block, model.block_expand):
        assert type(module).__module__.startswith("kphi3_kernels")
        assert all(getattr(m, "backend", BACKEND) == BACKEND for m in module.modules())
    assert isinstance(model.tail[0], kk.GroupedLinearFast) and isinstance(model.tail[1], kk.InterleaveChannelsFast)
    assert model.shared[0] is model.io_biased
    assert isinstance(model.io_biased.activation, nn.SiLU)

    # The very same Parameter objects, so the optimizer's state still belongs to them.
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    assert list(model.state_dict()) == keys_before
    assert set(optimizer.state) == set(params_before)
    y, grads = forward_backward(model, x)
    assert rel_error(y, ref_y) < FP32_TOL
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) < FP32_TOL, name
    optimizer.step()

    assert apply_kphi3_kernels(model, backend=BACKEND) == 0  # nothing left to replace


def test_apply_kphi3_kernels_on_an_original_style_causal_lm():
    """A KPhi3ForCausalLM whose blocks are swapped for original-class blocks (what loading with the
    original remote code gives), patched back onto the kernels: the native model's logits."""
    config = KPhi3Config(vocab_size=40, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    native = KPhi3ForCausalLM(config).eval()
    patched = KPhi3ForCausalLM(config).eval()
    for name, module in list(patched.named_modules()):
        if isinstance(module, kk.GroupedPointwiseConvolutionBlockIO):
            parent_name, _, child = name.rpartition(".")
            original = GroupedPointwiseConvolutionBlockIO(module.in_features, module.out_features,
                                                          config.min_channels_per_group)
            setattr(patched.get_submodule(parent_name) if parent_name else patched, child, original)
    assert not any(isinstance(m, kk.GroupedPointwiseConvolutionBlockIO) for m in patched.modules())
    patched.load_state_dict(native.state_dict(), strict=True)

    input_ids = torch.randint(3, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = native(input_ids).logits
        before = patched(input_ids).logits
    # 6 IO blocks (4 in the layer, embed_to_hidden, hidden_to_embed), each G > 1: 4 modules apiece.
    assert apply_kphi3_kernels(patched, backend=BACKEND) == 24
    with torch.no_grad():
        after = patched(input_ids).logits
    assert rel_error(before, ref) < FP32_TOL and rel_error(after, ref) < FP32_TOL


def test_apply_kphi3_kernels_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        apply_kphi3_kernels(OriginalStyleNet(), backend="cuda")
    with pytest.raises(ValueError, match="in place"):
        apply_kphi3_kernels(GroupedPointwiseConvolutionBlockIO(16, 16, 8))
