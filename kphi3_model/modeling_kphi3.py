"""PyTorch KPhi-3: a Phi-3 decoder whose dense projections are grouped pointwise convolution blocks.

The classes read in the order data flows: MLP, rotary embedding, attention, decoder layer,
pre-trained base, model, heads. Every projection is a ``kphi3_kernels`` module (or a plain
``nn.Linear`` when ``min_channels_per_group < 0``); which implementation those modules run, the
fused Triton kernels or the PyTorch reference, is ``config.kernel_backend``. This file never
launches a kernel itself.

Mirrors ``transformers.models.phi3.modeling_phi3`` (attention through ``ALL_ATTENTION_FUNCTIONS``,
masks from ``masking_utils``, ``DynamicCache``, ``GradientCheckpointingLayer``, RoPE from
``ROPE_INIT_FUNCTIONS`` / ``dynamic_rope_update``), and runs on the transformers releases that call the
KV cache ``past_key_values`` as well as those that call it ``cache``: see ``CACHE_KWARG`` and
``cache_parameter``.
"""
import functools
import inspect
import logging
import math
from dataclasses import dataclass
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import (
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from kphi3_kernels import (
    GroupedLinear,
    GroupedLinearFast,
    GroupedPointwiseConvolutionBlock,
    GroupedPointwiseConvolutionBlockIO,
    InterleaveChannelsFast,
)
from kphi3_kernels.backend import resolve_backend, validate_backend
from kphi3_kernels.fused import (add_rms_norm, layout_padding, rms_norm, rms_norm_gpc_io,
                                 silu_mul_gpc_io)

from .configuration_kphi3 import KPhi3Config, check_kphi3_config

logger = logging.getLogger("kphi3_model")

try:  # transformers' own, where it has one (Phi-3's RoPE enters its fp32 region through it)
    from transformers.utils.generic import maybe_autocast
except ImportError:
    def maybe_autocast(device_type: str, dtype: torch.dtype | None = None, enabled: bool = True,
                       cache_enabled: bool | None = None):
        """``torch.autocast``, entered only where it changes something: when it enables autocast, or
        autocast is on already; never for ``meta``, which has no autocast (``torch.autocast`` raises
        ``unsupported scalarType`` there)."""
        if device_type == "meta":
            return nullcontext()
        if enabled or torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
        return nullcontext()

# The name transformers gives the KV cache, as a forward argument and as an output field: newer
# releases renamed `past_key_values` to `cache`. The model emits the installed release's name and
# accepts either on input.
CACHE_KWARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# Every kphi3_kernels module class: the ones whose `backend` `set_kernel_backend` switches.
KERNEL_MODULES = (
    GroupedPointwiseConvolutionBlockIO,
    GroupedPointwiseConvolutionBlock,
    GroupedLinearFast,
    GroupedLinear,
    InterleaveChannelsFast,
)


# The release in which transformers' Phi-3 stops accepting `past_key_values` as the cache's name
# (`@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")` on its forwards).
PAST_KEY_VALUES_REMOVED_IN = "5.40.0"


def cache_parameter(func: Callable) -> Callable:
    """Give ``func``'s KV-cache parameter (written ``cache``) the installed release's name and handling.

    Where transformers calls the cache ``cache``, this is Phi-3's own decorator: ``past_key_values=``
    is still accepted, moved to ``cache`` and announced with a ``FutureWarning`` (until the release
    that removes it; both given: the warning, and ``cache`` wins). Where it calls it
    ``past_key_values``, the parameter carries that name in the signature that ``GenerationMixin``
    and ``GradientCheckpointingLayer`` inspect, and ``past_key_values=`` reaches ``cache``.
    """
    if CACHE_KWARG == "cache":
        return deprecate_kwarg("past_key_values", PAST_KEY_VALUES_REMOVED_IN, new_name="cache")(func)

    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return func(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=[
        p.replace(name="past_key_values") if p.name == "cache" else p for p in signature.parameters.values()
    ])
    return wrapper


def grouped_block(config: KPhi3Config, in_features: int, out_features: int) -> nn.Module:
    """An IO block ``in -> out`` with the config's group rule and kernel backend."""
    return GroupedPointwiseConvolutionBlockIO(
        in_features,
        out_features,
        min_channels_per_group=config.min_channels_per_group,
        last_dim=2,
        use_bias=False,
        backend=config.kernel_backend,
    )


def fused_block_path(owner: nn.Module, name: str, device, fused_text: str) -> tuple[bool, str]:
    """``(fused, reason)`` for one fusion of ``config.fused_decoder`` around the IO block
    ``owner.<name>`` on ``device`` (a tensor, device or string)."""
    config = owner.config
    if not config.fused_decoder:
        return False, "fused_decoder=False: the op-level path"
    block = getattr(owner, name, None)
    if not isinstance(block, GroupedPointwiseConvolutionBlockIO) or block.num_groups == 1:
        return False, (f"fused_decoder=True, but {name} is not a grouped IO block (G > 1): "
                       "the op-level path")
    # The fused operators read the parameters directly: a replaced, hooked or wrapped (e.g.
    # adapted) projection, or one given an activation, keeps its own forward.
    paths = [name] + [f"{name}.{child}" for child, _ in block.named_modules() if child]
    problem = not_as_built(owner, *paths)
    if problem is None and block.activation is not None:
        problem = f"{name} has an activation, which the fused operator would skip"
    if problem is not None:
        return False, f"fused_decoder=True, but {problem}: the op-level path"
    return True, f"{fused_on(device, block.backend)}: {fused_text}"


def fused_on(device, backend) -> str:
    """The start of a fused part's reason: the backend its operators run on (``device`` and the
    module's ``backend``, as the call resolves it). Every fused operator has both backends, so
    a plan does not depend on it; the text says which one runs."""
    name = resolve_backend(device, backend)
    return "fused_decoder=True on the " + ("Triton kernels" if name == "triton" else
                                             "torch backend")


def remember_built(owner: nn.Module) -> None:
    """Record every submodule of ``owner`` as built (object and class), so that a fusion that
    skips a module's forward runs only while that module is still the one built
    (``not_as_built``). Kept out of ``_modules``: state dicts and ``named_modules`` see nothing."""
    owner.__dict__["_as_built"] = {
        path: (module, type(module)) for path, module in owner.named_modules() if path}


def not_as_built(owner: nn.Module, *paths: str, hooks: str = "all") -> str | None:
    """Why a module at one of ``paths`` (dotted, under ``owner``) is not as ``owner`` built it,
    or None when each is: the same object of the same class, and, by ``hooks``:

    - ``"all"``: no forward (pre-)hook, global ones included, and no forward replaced on the
      instance (a wrapper's): a fused operator computes the module without its ``forward``;
    - ``"pre"``: no forward pre-hook: the forward runs, on an input the fusion changes (a norm
      head hands the branch its un-normalized input), which a pre-hook would see;
    - ``"none"``: the object and class alone.
    """
    from torch.nn.modules import module as module_globals

    built = owner.__dict__.get("_as_built", {})
    for path in paths:
        module = owner.get_submodule(path) if _has_submodule(owner, path) else None
        original, cls = built.get(path, (None, None))
        if module is None or module is not original or type(module) is not cls:
            now = "missing" if module is None else _a(type(module).__name__)
            return f"{path} is {now}, not the {cls.__name__ if cls else 'module'} the model built"
        if hooks == "pre" and module._forward_pre_hooks:
            return f"{path} has forward pre-hooks, which would see its un-normalized input"
        if hooks == "all" and (module._forward_hooks or module._forward_pre_hooks):
            return f"{path} has forward hooks, which the fused operator would skip"
        if hooks == "all" and "forward" in module.__dict__:
            return f"{path} has a wrapped forward, which the fused operator would skip"
    if paths and hooks != "none" and module_globals._global_forward_pre_hooks:
        return "global forward pre-hooks are registered, which the fused path would bypass"
    if paths and hooks == "all" and module_globals._global_forward_hooks:
        return "global forward hooks are registered, which the fused operator would skip"
    return None


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'AEIOU' else 'a'} {noun}"


def _has_submodule(owner: nn.Module, path: str) -> bool:
    try:
        return isinstance(owner.get_submodule(path), nn.Module)
    except AttributeError:
        return False


def norm_then_block(norm: nn.Module, block: nn.Module, x: torch.Tensor,
                    residual: torch.Tensor | None = None, activation_groups: int | None = None):
    """``block(norm(x))`` as the fused norm head (``kphi3_kernels.fused.rms_norm_gpc_io``); with
    ``residual``, ``(h, block(norm(h)))`` for ``h = residual + x``; with ``activation_groups``,
    then the activation of the result in the layout of a block of that many groups."""
    first, second = block.first_pointwise_conv, block.second_pointwise_conv
    return rms_norm_gpc_io(x, norm.weight, norm.variance_epsilon, first.weight, second.weight,
                           first.bias, second.bias, residual=residual,
                           activation_groups=activation_groups, backend=block.backend)


def norm_head_text(norm: str, block: nn.Module, name: str) -> str:
    """What a fused norm head writes for ``block`` (the ``layout="auto"`` choice); empty where
    ``block`` is no grouped IO block (no head then)."""
    if not isinstance(block, GroupedPointwiseConvolutionBlockIO) or block.num_groups == 1:
        return ""
    G, s = block.num_groups, block.input_channels_per_group
    extra = layout_padding(G, s)
    if extra == 0:
        return f"{norm} writes {name}'s input in the block-residue layout"
    return (f"{norm} writes {name}'s input in channel order and de-interleaved (the "
            f"block-residue layout would pad each group's {s} channels to {s + extra})")


def projection(config: KPhi3Config, in_features: int, out_features: int) -> nn.Module:
    """A layer projection: an IO block, or Phi-3's ``nn.Linear`` when ``min_channels_per_group < 0``."""
    if config.min_channels_per_group < 0:
        return nn.Linear(in_features, out_features, bias=False)
    return grouped_block(config, in_features, out_features)


class KPhi3MLP(nn.Module):
    def __init__(self, config: KPhi3Config):
        super().__init__()
        self.config = config
        self.gate_up_proj = projection(config, config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = projection(config, config.intermediate_size, config.hidden_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        remember_built(self)

    def fused_path(self, device: torch.Tensor | torch.device | str,
                   head: bool = False) -> tuple[bool, str]:
        """``(fused, reason)``: whether ``forward`` on ``device`` runs the activation and
        ``down_proj`` as one fused operator (``config.fused_decoder``), and why; ``head``: the
        norm before gate_up_proj is fused with it, and its launch writes the activation."""
        if self.config.fused_decoder and self.config.hidden_act != "silu":
            return False, (f"fused_decoder=True, but hidden_act is {self.config.hidden_act!r} "
                           "(the fused activation is silu): the op-level path")
        problem = not_as_built(self, "activation_fn") if self.config.fused_decoder else None
        if problem is not None:
            return False, f"fused_decoder=True, but {problem}: the op-level path"
        where = ("in gate_up_proj's norm head (its GEMM's epilogue where the tile fits)" if head
                 else "in a pass of its own")
        return fused_block_path(self, "down_proj", device,
                                "silu(gate) * up writes down_proj's input in the block-residue "
                                f"layout, {where}")

    def fused_norm_path(self, device: torch.Tensor | torch.device | str) -> tuple[bool, str]:
        """``(fused, reason)``: whether the RMSNorm before this MLP runs fused with
        ``gate_up_proj`` (the decoder layer passes it to ``forward``), and why."""
        return fused_block_path(self, "gate_up_proj", device,
                                norm_head_text("post_attention_layernorm", self.gate_up_proj,
                                               "gate_up_proj"))

    def forward(self, hidden_states: torch.Tensor, input_norm: nn.Module | None = None,
                residual: torch.Tensor | None = None, fused_tail: bool | None = None
                ) -> torch.Tensor:
        """``input_norm``: the RMSNorm to apply first, fused with ``gate_up_proj`` (given only
        where ``fused_norm_path`` holds); without it ``hidden_states`` is already normalized.
        ``residual``: returns ``residual + mlp(hidden_states)``, the add in down_proj's
        epilogue where the MLP tail is fused. ``fused_tail``: the decoder layer's plan for the
        tail (None: decided here, ``fused_path``)."""
        if input_norm is None:
            return self.tail(self.gate_up_proj(hidden_states), residual, fused_tail)
        if fused_tail is None:
            fused_tail = self.config.fused_decoder and self.fused_path(hidden_states)[0]
        # A fused tail takes its input, silu(gate) * up in down_proj's layout, from the head.
        out = norm_then_block(input_norm, self.gate_up_proj, hidden_states,
                              activation_groups=self.tail_groups() if fused_tail else None)
        up_states, activation = out if fused_tail else (out, None)
        return self.tail(up_states, residual, fused_tail, activation)

    def tail_groups(self) -> int:
        """down_proj's group count: the layout of its input a norm head writes for the tail."""
        return self.down_proj.num_groups

    def tail(self, up_states: torch.Tensor, residual: torch.Tensor | None = None,
             fused: bool | None = None, activation: torch.Tensor | None = None) -> torch.Tensor:
        """``(residual +) down_proj(up * act(gate))`` from gate_up_proj's output; ``fused`` as
        ``forward``'s ``fused_tail``; ``activation``: ``up * act(gate)`` in down_proj's layout,
        where a norm head wrote it (fused tail only)."""
        if fused is None:
            fused = self.config.fused_decoder and self.fused_path(up_states)[0]
        if fused:
            down = self.down_proj
            first, second = down.first_pointwise_conv, down.second_pointwise_conv
            return silu_mul_gpc_io(up_states, first.weight, second.weight, first.bias,
                                   second.bias, residual=residual, activation=activation,
                                   backend=down.backend)
        gate, up_states = up_states.chunk(2, dim=-1)  # the gate is the first half
        up_states = up_states * self.activation_fn(gate)
        out = self.down_proj(up_states)
        return out if residual is None else residual + out


def rope_init_function(rope_type: str) -> Callable:
    """transformers' function computing ``(inv_freq, attention_scaling)`` for ``rope_type``.

    ``default`` is Phi-3's own formula; every other type is transformers' ``ROPE_INIT_FUNCTIONS``
    entry, as Phi-3 uses it. A type transformers does not know raises here, when the model is built,
    instead of silently running as ``default``.
    """
    if rope_type == "default":
        return KPhi3RotaryEmbedding.compute_default_rope_parameters
    if rope_type not in ROPE_INIT_FUNCTIONS:
        known = ", ".join(["default", *ROPE_INIT_FUNCTIONS])
        raise ValueError(f"KPhi3Config: unknown `rope_parameters` type {rope_type!r}; this transformers knows {known}")
    return ROPE_INIT_FUNCTIONS[rope_type]


def rope_update(rope_forward: Callable) -> Callable:
    """``dynamic_rope_update``, with longrope's short / long switch made traceable.

    Longrope picks its long factors' frequencies once the sequence outgrows
    ``original_max_position_embeddings``. Some transformers releases decide that with a Python ``if``
    on ``max(position_ids)``, which needs the positions' values: it raises on meta tensors and under
    ``FakeTensorMode``, and breaks a compiled graph. This picks the set with ``torch.where`` on the
    device, as the releases that made it traceable do, and copies it into ``inv_freq`` in place (the
    buffer keeps its address, which CUDA graphs replay from); same frequencies, on every release.
    Every other type goes through transformers' ``dynamic_rope_update`` (dynamic NTK grows its
    frequencies there, as in Phi-3).
    """
    dynamic = dynamic_rope_update(rope_forward)

    @functools.wraps(rope_forward)
    def wrapper(self, x, position_ids):
        if self.rope_type != "longrope":
            return dynamic(self, x, position_ids)
        long = position_ids.max() + 1 > self.original_max_position_embeddings
        self.inv_freq.copy_(torch.where(long, self.long_inv_freq, self.original_inv_freq))
        return rope_forward(self, x, position_ids)

    return wrapper


class KPhi3RotaryEmbedding(nn.Module):
    """Phi-3's RoPE, through transformers' own RoPE functions.

    The frequencies come from ``rope_init_function(rope_type)`` (``default``, ``longrope`` with its
    short / long factors, and whatever else transformers' Phi-3 computes when a config is changed after
    construction: ``linear``, ``dynamic``, ``yarn``, ...); ``rope_update`` switches longrope to its long
    factors once the sequence outgrows ``original_max_position_embeddings`` and grows the dynamic-NTK
    frequencies, as in Phi-3. All frequency sets are non-persistent buffers (never
    in checkpoints); ``_init_weights`` recomputes them, so they are right after ``from_pretrained`` and
    after materialising a model built on the meta device.
    """

    inv_freq: torch.Tensor
    original_inv_freq: torch.Tensor

    def __init__(self, config: KPhi3Config):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        self.rope_init_fn = rope_init_function(self.rope_type)
        inv_freq, long_inv_freq, self.attention_scaling = self.compute_frequencies()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)
        if long_inv_freq is not None:
            # The long factors' frequencies, which `rope_update` switches to past
            # `original_max_position_embeddings`.
            self.register_buffer("long_inv_freq", long_inv_freq, persistent=False)

    @property
    def original_max_position_embeddings(self) -> int:
        """Longrope's switch point: the config's own ``original_max_position_embeddings`` wins, as for Phi-3."""
        return self.config.rope_parameters.get(
            "original_max_position_embeddings", self.config.original_max_position_embeddings
        )

    @staticmethod
    def compute_default_rope_parameters(config: KPhi3Config, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Phi-3's default RoPE: ``1 / theta^(2i/d)`` over the rotary dims, attention scaling 1."""
        base = config.rope_parameters["rope_theta"]
        partial_rotary_factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dim = int(head_dim * partial_rotary_factor)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq.to(device), 1.0

    def compute_frequencies(self, device=None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """``(inv_freq, long_inv_freq, attention_scaling)`` for this module's config; ``long_inv_freq``
        (longrope's long factors) is None for the other types."""
        inv_freq, attention_scaling = self.rope_init_fn(self.config, device)
        long_inv_freq = None
        if self.rope_type == "longrope":
            # Read after the call above, which standardises `rope_parameters`.
            original = self.original_max_position_embeddings
            long_inv_freq, _ = self.rope_init_fn(self.config, device, seq_len=original + 1)
        return inv_freq, long_inv_freq, attention_scaling

    @torch.no_grad()
    @rope_update  # longrope's short / long switch and dynamic NTK, as in Phi-3
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = x.device.type if isinstance(x.device.type, str) and x.device.type != "mps" else "cpu"
        # Angles in fp32 whatever autocast is on outside; on meta tensors there is no autocast to turn off.
        with maybe_autocast(device_type=device_type, enabled=False):
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """Applies the rotary embedding to the (possibly partial) rotary dims of ``q`` and ``k``."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``(batch, kv_heads, seq, hd) -> (batch, kv_heads * n_rep, seq, hd)``, each kv head repeated."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class KPhi3Attention(nn.Module):
    """Multi-headed (GQA) attention; ``qkv_proj`` and ``o_proj`` are grouped blocks."""

    def __init__(self, config: KPhi3Config, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        op_size = config.num_attention_heads * self.head_dim + 2 * (config.num_key_value_heads * self.head_dim)
        self.qkv_proj = projection(config, config.hidden_size, op_size)
        self.o_proj = projection(config, config.num_attention_heads * self.head_dim, config.hidden_size)
        remember_built(self)

    def fused_norm_path(self, device: torch.Tensor | torch.device | str) -> tuple[bool, str]:
        """``(fused, reason)``: whether the RMSNorm before this attention runs fused with
        ``qkv_proj`` (the decoder layer passes it to ``forward``), and why."""
        return fused_block_path(self, "qkv_proj", device,
                                norm_head_text("input_layernorm", self.qkv_proj, "qkv_proj"))

    @cache_parameter
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        input_norm: nn.Module | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``input_norm``: the RMSNorm to apply first, fused with ``qkv_proj`` (given only where
        ``fused_norm_path`` holds); without it ``hidden_states`` is already normalized."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        if input_norm is not None:
            qkv = norm_then_block(input_norm, self.qkv_proj, hidden_states)
        else:
            qkv = self.qkv_proj(hidden_states)
        query_pos = self.config.num_attention_heads * self.head_dim
        query_states = qkv[..., :query_pos]
        key_states = qkv[..., query_pos : query_pos + self.num_key_value_heads * self.head_dim]
        value_states = qkv[..., query_pos + self.num_key_value_heads * self.head_dim :]

        query_states = query_states.view(hidden_shape).transpose(1, 2)
        key_states = key_states.view(hidden_shape).transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=getattr(self.config, "sliding_window", None),
            **kwargs,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class KPhi3RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


@dataclass(frozen=True)
class FusionPlan:
    """What one decoder layer runs fused with ``config.fused_decoder`` on one device (each
    field a part of ``KPhi3DecoderLayer.fusions``; ``explain_fused_decoder`` prints why)."""

    qkv_head: bool = False      # input_layernorm + qkv_proj: the norm writes the block's input
    gate_up_head: bool = False  # post_attention_layernorm + gate_up_proj
    tail: bool = False          # silu(gate) * up + down_proj, one operator
    input_norm: bool = False    # input_layernorm as one RMSNorm launch (no head after it)
    attn_add: bool = False      # the attention's residual add in the norm's launch after it
    down_add: bool = False      # the MLP's residual add in down_proj's epilogue

    @classmethod
    def from_fusions(cls, fusions: dict[str, tuple[bool, str]]) -> "FusionPlan":
        return cls(**{field: fusions[part][0] for field, part in PLAN_PARTS.items()})


PLAN_PARTS = {
    "qkv_head": "input_layernorm + qkv_proj",
    "gate_up_head": "post_attention_layernorm + gate_up_proj",
    "tail": "silu(gate) * up + down_proj",
    "input_norm": "input_layernorm",
    "attn_add": "attention residual add + post_attention_layernorm",
    "down_add": "down_proj + residual add",
}
OP_LEVEL = FusionPlan()


class KPhi3DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: KPhi3Config, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = KPhi3Attention(config=config, layer_idx=layer_idx)
        self.mlp = KPhi3MLP(config)
        self.input_layernorm = KPhi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KPhi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.config = config
        self.resid_attn_dropout = nn.Dropout(config.resid_pdrop)
        self.resid_mlp_dropout = nn.Dropout(config.resid_pdrop)
        remember_built(self)

    def norm_fusion(self, norm: str, branch: str, path: tuple[bool, str]) -> tuple[bool, str]:
        """A norm head's ``(fused, reason)``: ``path`` (its block's), the norm ``norm`` as built
        (the fused operator does not call its forward), and the ``branch`` module (attention or
        MLP) as built, with no forward pre-hook: it receives the un-normalized input."""
        if not path[0]:
            return path
        problem = not_as_built(self, norm) or not_as_built(self, branch, hooks="pre")
        if problem is not None:
            return False, f"fused_decoder=True, but {problem}: the op-level path"
        return path

    def stream_path(self, device: torch.Tensor | torch.device | str) -> tuple[bool, str]:
        """``(fused, reason)``: whether the residual stream's fusions can run on ``device``: the
        norms and the residual dropouts as built (the fused operators skip their forwards), no
        active dropout on the branches; on either backend."""
        if not self.config.fused_decoder:
            return False, "fused_decoder=False: the op-level path"
        problem = not_as_built(self, "input_layernorm", "post_attention_layernorm",
                               "resid_attn_dropout", "resid_mlp_dropout")
        if problem is not None:
            return False, f"fused_decoder=True, but {problem}: the op-level path"
        if self.training and any(d.p > 0 for d in (self.resid_attn_dropout, self.resid_mlp_dropout)):
            return False, ("fused_decoder=True, but residual dropout is active (training with "
                           "resid_pdrop > 0), and it sits between the branch and the add: the "
                           "op-level path")
        return True, fused_on(device, self.config.kernel_backend)

    def fusions(self, device: torch.Tensor | torch.device | str) -> dict[str, tuple[bool, str]]:
        """Each fusion of ``config.fused_decoder`` in this layer on ``device``: ``(fused, reason)``."""
        foreign = {branch: not_as_built(self, branch, hooks="none")
                   for branch in ("self_attn", "mlp")}

        def unless_foreign(branch, decide):
            # A replaced attention or MLP is not asked: it has none of the fused paths.
            if foreign[branch] is not None:
                return False, f"fused_decoder=True, but {foreign[branch]}: the op-level path"
            return decide()

        heads = {
            "input_layernorm + qkv_proj": unless_foreign("self_attn", lambda: self.norm_fusion(
                "input_layernorm", "self_attn", self.self_attn.fused_norm_path(device))),
            "post_attention_layernorm + gate_up_proj": unless_foreign("mlp", lambda: self.norm_fusion(
                "post_attention_layernorm", "mlp", self.mlp.fused_norm_path(device))),
        }
        head_gu = heads["post_attention_layernorm + gate_up_proj"][0]
        tail = unless_foreign("mlp", lambda: self.mlp.fused_path(device, head=head_gu))
        stream, why = self.stream_path(device)
        # The MLP's own forward is skipped (the head's add) or returns the stream (the add in
        # down_proj): no hook of it may see or change what it would have.
        mlp_problem = not_as_built(self, "mlp")
        if not stream:
            input_norm = attn_add = down = (False, why)
        else:
            input_norm = ((False, "fused_decoder=True: runs as part of input_layernorm + qkv_proj")
                          if heads["input_layernorm + qkv_proj"][0] else
                          (True, f"{why}: one RMSNorm launch, and one for its backward"))
            if head_gu and mlp_problem is not None:
                attn_add = (False, f"fused_decoder=True, but {mlp_problem}, and the norm head "
                                   "that would take the add runs inside it: the op-level add")
            else:
                attn_add = (True, f"{why}: the add runs in "
                            + ("the norm head's launch" if head_gu else
                               "post_attention_layernorm's launch")
                            + "; its backward sums the stream's gradient with the norm's in the "
                              "norm's pass")
            if not tail[0]:
                down = (False, "fused_decoder=True, but the MLP tail is not fused: the op-level add")
            elif mlp_problem is not None:
                down = (False, f"fused_decoder=True, but {mlp_problem}: the op-level add")
            else:
                down = (True, f"{why}: the residual add in down_proj's epilogue")
        return {
            **heads,
            "silu(gate) * up + down_proj": tail,
            "input_layernorm": input_norm,
            "attention residual add + post_attention_layernorm": attn_add,
            "down_proj + residual add": down,
        }

    def fusion_plan(self, device: torch.Tensor | torch.device | str) -> FusionPlan:
        """``fusions`` as the forward reads it, decided once per device, training mode and
        module state (``_plan_key``) instead of on every call."""
        if not self.config.fused_decoder:
            return OP_LEVEL
        if torch.compiler.is_compiling():  # traced once per graph: no cache to keep
            return FusionPlan.from_fusions(self.fusions(device))
        key = self._plan_key(device)
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get(key)
        if plan is None:
            if len(plans) >= 8:  # states seen before are few; a long-lived model keeps few
                plans.clear()
            plan = plans[key] = FusionPlan.from_fusions(self.fusions(device))
        return plan

    def _plan_key(self, device) -> tuple:
        """Everything ``fusions`` reads: the device and the backend it resolves to (the thread's
        ``use_backend`` included), the training mode, the config's switches, the global hooks,
        and each module of the layer (object, class, hooks, a forward set on the instance, a
        block's activation and backend, a dropout's ``p``). A module that replaced a built one
        is never the built one, whatever its id, so an id a freed module had cannot revive a
        fused decision."""
        from torch.nn.modules import module as module_globals

        device = device.device if isinstance(device, torch.Tensor) else torch.device(device)
        config = self.config
        modules = tuple(
            (id(m), type(m), len(m._forward_hooks), len(m._forward_pre_hooks),
             "forward" in m.__dict__, id(m.__dict__.get("activation")),
             m.__dict__.get("_backend"), m.__dict__.get("p"))
            for m in self.modules())
        return (device, self.training, config.fused_decoder, config.hidden_act,
                resolve_backend(device, config.kernel_backend),
                len(module_globals._global_forward_hooks),
                len(module_globals._global_forward_pre_hooks), modules)

    @cache_parameter
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # One path per plan: a norm fused into the projection after it is handed over as
        # ``input_norm``, and the residual adds run inside the launches around them.
        plan = self.fusion_plan(hidden_states)
        residual = hidden_states
        attn_norm = None
        if plan.qkv_head:
            attn_norm = self.input_layernorm
        elif plan.input_norm:
            norm = self.input_layernorm
            hidden_states = rms_norm(hidden_states, norm.weight, norm.variance_epsilon,
                                     backend=self.config.kernel_backend)
        else:
            hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_KWARG: cache},
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **({} if attn_norm is None else dict(input_norm=attn_norm)),
            **kwargs,
        )
        norm = self.post_attention_layernorm
        if plan.attn_add and plan.gate_up_head:
            # The add, the norm and gate_up_proj in one operator; then the MLP's tail.
            out = norm_then_block(norm, self.mlp.gate_up_proj, hidden_states, residual=residual,
                                  activation_groups=self.mlp.tail_groups() if plan.tail else None)
            residual, up_states, activation = out if plan.tail else (*out, None)
            out = self.mlp.tail(up_states, residual if plan.down_add else None, plan.tail,
                                activation)
            return out if plan.down_add else residual + out
        mlp_norm = None
        if plan.attn_add:
            residual, mlp_in = add_rms_norm(residual, hidden_states, norm.weight,
                                            norm.variance_epsilon,
                                            backend=self.config.kernel_backend)
        else:
            residual = residual + self.resid_attn_dropout(hidden_states)
            mlp_in, mlp_norm = (residual, norm) if plan.gate_up_head else (norm(residual), None)
        if plan.down_add:
            return self.mlp(mlp_in, input_norm=mlp_norm, residual=residual, fused_tail=plan.tail)
        # A replaced MLP gets the plain call; the built one the plan's decisions.
        mlp_kwargs = dict(input_norm=mlp_norm, fused_tail=plan.tail) \
            if isinstance(self.mlp, KPhi3MLP) else {}
        return residual + self.resid_mlp_dropout(self.mlp(mlp_in, **mlp_kwargs))


class KPhi3PreTrainedModel(PreTrainedModel):
    config: KPhi3Config
    config_class = KPhi3Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["KPhi3DecoderLayer"]
    _skip_keys_device_placement = [CACHE_KWARG]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    # As Phi-3: the whole model compiles as one graph (`generate` compiles its decoding forward with
    # the static cache). The grouped layers are registered operators (`torch.ops.kphi3`), one node
    # each, on both backends.
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "hidden_states": KPhi3DecoderLayer,
        "attentions": KPhi3Attention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Phi-3's init (normal(0, initializer_range) for nn.Linear / Embedding, ones for RMSNorm), and,
        like the original KPhi-3, each GroupedLinearFast's own init: ``kaiming_uniform_(a=sqrt(5))`` on
        its 3-D weight (``GroupedLinearFast.reset_parameters``). transformers' ``init`` functions
        skip tensors already loaded from a checkpoint. The RoPE buffers are recomputed."""
        if isinstance(module, GroupedLinearFast):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features_per_group)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, KPhi3RotaryEmbedding):
            inv_freq, long_inv_freq, _ = module.compute_frequencies(device=module.inv_freq.device)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
            if long_inv_freq is not None:
                init.copy_(module.long_inv_freq, long_inv_freq)
        else:
            super()._init_weights(module)

    def explain_fused_decoder(self, device: torch.device | str = "cuda") -> str:
        """Which path each fusion of ``config.fused_decoder`` runs on ``device``, layer by layer:
        the two RMSNorms fused with the projections after them, the activation with down_proj,
        and the residual stream (the input norm as one launch, the attention's residual add
        with the norm after it, the MLP's in down_proj's epilogue)."""
        lines = []
        for name, module in self.named_modules():
            if isinstance(module, KPhi3DecoderLayer):
                for where, (_, reason) in module.fusions(device).items():
                    part = ".self_attn" if "qkv_proj" in where else (
                        ".mlp" if "proj" in where else "")
                    lines.append(f"{name}{part} ({where}): {reason}")
        return "\n".join(lines)

    def set_kernel_backend(self, backend: str) -> None:
        """Switch every grouped layer of the model to ``"auto"``, ``"triton"`` or ``"torch"``."""
        backend = validate_backend(backend)
        self.config.kernel_backend = backend
        for module in self.modules():
            if isinstance(module, KERNEL_MODULES):
                module.backend = backend


class KPhi3Model(KPhi3PreTrainedModel):
    def __init__(self, config: KPhi3Config):
        super().__init__(config)
        check_kphi3_config(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_size, self.padding_idx)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        # Present (and in checkpoints) only when the embedding width differs from the hidden width.
        self.embed_to_hidden = (
            grouped_block(config, config.embed_size, config.hidden_size)
            if config.embed_size != config.hidden_size
            else None
        )
        self.layers = nn.ModuleList(
            [KPhi3DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = KPhi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = KPhi3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False

        # Initialize weights and apply final processing
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @cache_parameter
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        # Without a cache or an attention mask, the mask function searches the position ids for packed
        # sequences, reading their values (a host sync on an accelerator; an error on meta tensors).
        # It is given only the caller's: the positions made here are one sequence per row, and the
        # search would find none.
        mask_position_ids = position_ids
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        mask_function = create_causal_mask if self.config.sliding_window is None else create_sliding_window_causal_mask
        # The cache is the fourth argument under both of its names.
        causal_mask = mask_function(self.config, inputs_embeds, attention_mask, cache, position_ids=mask_position_ids)

        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states = self.embed_dropout(inputs_embeds)
        if self.embed_to_hidden is not None:
            hidden_states = self.embed_to_hidden(hidden_states)
        if self.config.fused_decoder and not torch.compiler.is_compiling():
            self.warn_unfused_once(hidden_states.device)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **{CACHE_KWARG: cache},
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_KWARG: cache if use_cache else None})


    def warn_unfused_once(self, device: torch.device) -> None:
        """With ``fused_decoder=True``, one logged warning (logger ``"kphi3_model"``) per model,
        device type and training mode, naming each part of the decoder that runs op-level
        instead and why (``explain_fused_decoder`` in one line per part). The same rule on
        both backends: every fused operator runs on either, so the backend leaves nothing
        unfused."""
        key = (torch.device(device).type, self.training)
        warned = self.__dict__.setdefault("_unfused_warned", set())
        if key in warned:
            return
        warned.add(key)
        unfused: dict[tuple[str, str], list[int]] = {}
        for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            for where, (fused, reason) in layer.fusions(device).items():
                if not fused and "runs as part of" not in reason:
                    unfused.setdefault((where, reason), []).append(index)
        if unfused:
            parts = "; ".join(f"{where} in layers {', '.join(map(str, layers))}: {reason}"
                              for (where, reason), layers in unfused.items())
            logger.warning("KPhi-3 with fused_decoder=True leaves %d part(s) unfused on %s "
                           "(model.explain_fused_decoder() says what runs where): %s. This "
                           "warning is shown once per model.", len(unfused), key[0], parts)


class KPhi3ForCausalLM(KPhi3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KPhi3Config):
        super().__init__(config)
        self.model = KPhi3Model(config)
        self.vocab_size = config.vocab_size
        self.hidden_to_embed = (
            grouped_block(config, config.hidden_size, config.embed_size)
            if config.embed_size != config.hidden_size
            else None
        )
        self.lm_head = nn.Linear(config.embed_size, config.vocab_size, bias=False)

        # Initialize weights and apply final processing
        self.post_init()

    @cache_parameter
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels (shifted inside the loss); `-100` is ignored.
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Compute logits only for the last `logits_to_keep` positions (0: all), or for the given indices.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{CACHE_KWARG: cache},
            **kwargs,
        )

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, slice_indices, :]
        if self.hidden_to_embed is not None:
            hidden_states = self.hidden_to_embed(hidden_states)
        logits = self.lm_head(hidden_states).float()  # float logits, like the original KPhi-3

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_KWARG: getattr(outputs, CACHE_KWARG)},
        )

    @cache_parameter
    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        inputs_embeds=None,
        position_ids=None,
        use_cache=True,
        logits_to_keep=0,
        **kwargs,
    ):
        # Explicit parameters, as Phi-3: GenerationMixin reads `inputs_embeds` from this signature to
        # allow `generate(inputs_embeds=...)`. Longrope switches to the long factors once the sequence
        # outgrows `original_max_position_embeddings`; the keys cached with the short factors are then
        # stale, so the first step past that point recomputes the whole sequence without the cache, as
        # Phi-3 does (only for longrope here: with other RoPE types the cache stays valid).
        original = self.model.rotary_emb.original_max_position_embeddings
        if (
            cache
            and self.model.rotary_emb.rope_type == "longrope"
            and input_ids.shape[1] >= original + 1
            and cache.get_seq_length() <= original
        ):
            cache = None
            kwargs["next_sequence_length"] = None
        return super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **{CACHE_KWARG: cache},
            **kwargs,
        )


class KPhi3ForSequenceClassification(GenericForSequenceClassification, KPhi3PreTrainedModel):
    pass


class KPhi3ForTokenClassification(GenericForTokenClassification, KPhi3PreTrainedModel):
    pass


__all__ = [
    "KPhi3PreTrainedModel",
    "KPhi3Model",
    "KPhi3ForCausalLM",
    "KPhi3ForSequenceClassification",
    "KPhi3ForTokenClassification",
]
