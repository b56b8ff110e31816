"""Released-checkpoint compatibility: the original keys and shapes load with ``strict=True``, a
released-style checkpoint directory loads with ``from_pretrained`` (no remote code), and the model
computes the function of docs/layers.md, checked against an independent float64 forward written from it."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import kphi3_model  # noqa: F401  (registers the Auto classes)
from kphi3_kernels import reference as R
from kphi3_model import KPhi3Config, KPhi3ForCausalLM
from _utils import rel_error

BASE = dict(vocab_size=32, embed_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, min_channels_per_group=16,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=10000.0)

# The variants the original code could write: grouped, embed_size != hidden_size, dense,
# single-group, GQA.
VARIANTS = {
    "grouped": dict(),
    "embed_ne_hidden": dict(embed_size=48),
    "dense": dict(min_channels_per_group=-1, embed_size=48),
    "single_group": dict(min_channels_per_group=1000),
    "gqa": dict(num_key_value_heads=2, embed_size=96),
}


def group_count(cin, cout, minimum):
    """The group rule of docs/group-count.md, written out again so the test does not trust the code under test."""
    limit = max(1, min(cin, cout, cin // minimum))
    return next(d for d in range(limit, 0, -1) if cin % d == 0 and cout % d == 0)


def released_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Exactly the keys and shapes the original code saves (docs/layers.md, state-dict keys)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def rand(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    def block(prefix, cin, cout):  # an IO block
        G = group_count(cin, cout, cfg["min_channels_per_group"])
        if G == 1:
            sd[prefix + ".first_pointwise_conv.group_layers.0.weight"] = rand(cout, cin, scale=cin**-0.5)
        else:
            for which in ("first", "second"):
                scale = (2 * cin / G) ** -0.5
                sd[f"{prefix}.{which}_pointwise_conv.weight"] = rand(G, cin // G, cout // G, scale=scale)

    def proj(prefix, cin, cout):
        if cfg["min_channels_per_group"] < 0:
            sd[prefix + ".weight"] = rand(cout, cin, scale=cin**-0.5)
        else:
            block(prefix, cin, cout)

    E, H, inter = cfg["embed_size"], cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = H // heads
    sd["model.embed_tokens.weight"] = rand(cfg["vocab_size"], E, scale=1.0)
    if E != H:
        block("model.embed_to_hidden", E, H)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        proj(p + "self_attn.qkv_proj", H, heads * hd + 2 * kv * hd)
        proj(p + "self_attn.o_proj", heads * hd, H)
        proj(p + "mlp.gate_up_proj", H, 2 * inter)
        proj(p + "mlp.down_proj", inter, H)
        sd[p + "input_layernorm.weight"] = 1 + rand(H, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + rand(H, scale=0.1)
    sd["model.norm.weight"] = 1 + rand(H, scale=0.1)
    if E != H:
        block("hidden_to_embed", H, E)
    sd["lm_head.weight"] = rand(cfg["vocab_size"], E, scale=E**-0.5)
    return sd


def reference_logits(sd: dict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """The model of docs/layers.md in float64 with plain torch ops (no KV cache, no padding)."""
    w = {k: v.double() for k, v in sd.items()}
    E, H, inter = cfg["embed_size"], cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = H // heads, 1e-5

    def block(prefix, x, cin, cout):
        if prefix + ".weight" in w:
            return x @ w[prefix + ".weight"].T
        if prefix + ".first_pointwise_conv.group_layers.0.weight" in w:
            return x @ w[prefix + ".first_pointwise_conv.group_layers.0.weight"].T
        return R.gpc_io(x, w[prefix + ".first_pointwise_conv.weight"], w[prefix + ".second_pointwise_conv.weight"])

    def rms(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    B, T = input_ids.shape
    pos = torch.arange(T, dtype=torch.float64)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    h = w["model.embed_tokens.weight"][input_ids]
    if E != H:
        h = block("model.embed_to_hidden", h, E, H)
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        qkv = block(p + "self_attn.qkv_proj", rms(h, w[p + "input_layernorm.weight"]), H, heads * hd + 2 * kv * hd)
        q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
        q = rope(q.view(B, T, heads, hd).transpose(1, 2))
        k = rope(k.view(B, T, kv, hd).transpose(1, 2)).repeat_interleave(heads // kv, dim=1)
        v = v.view(B, T, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1) @ v
        h = h + block(p + "self_attn.o_proj", attn.transpose(1, 2).reshape(B, T, H), H, H)
        x = rms(h, w[p + "post_attention_layernorm.weight"])
        gate, up = block(p + "mlp.gate_up_proj", x, H, 2 * inter).chunk(2, -1)
        h = h + block(p + "mlp.down_proj", up * torch.nn.functional.silu(gate), inter, H)
    h = rms(h, w["model.norm.weight"])
    if E != H:
        h = block("hidden_to_embed", h, H, E)
    return h @ w["lm_head.weight"].T


def variant_config(name: str) -> dict:
    return {**BASE, **VARIANTS[name]}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_original_keys_load_strictly_and_compute_spec_function(variant):
    cfg = variant_config(variant)
    sd = released_state_dict(cfg)
    model = KPhi3ForCausalLM(KPhi3Config(**cfg, kernel_backend="torch")).eval()
    model.load_state_dict(sd, strict=True)  # raises on any missing, unexpected or mis-shaped key
    assert set(model.state_dict()) == set(sd)

    input_ids = torch.randint(0, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    assert logits.dtype == torch.float32
    assert rel_error(logits, reference_logits(sd, cfg, input_ids)) < 1e-5


def test_variants_have_the_expected_structure():
    dense = KPhi3ForCausalLM(KPhi3Config(**variant_config("dense")))
    assert isinstance(dense.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)
    assert dense.model.embed_to_hidden.num_groups == 1 and dense.hidden_to_embed.num_groups == 1
    single = KPhi3ForCausalLM(KPhi3Config(**variant_config("single_group")))
    assert {m.num_groups for m in single.modules() if hasattr(m, "first_pointwise_conv")} == {1}
    grouped = KPhi3ForCausalLM(KPhi3Config(**variant_config("grouped")))
    assert grouped.model.embed_to_hidden is None and grouped.hidden_to_embed is None
    layer = grouped.model.layers[0]
    assert [layer.self_attn.qkv_proj.num_groups, layer.mlp.down_proj.num_groups] == [4, 8]


@pytest.mark.parametrize("trust_remote_code", [None, True])
def test_released_checkpoint_directory_loads_without_remote_code(tmp_path, trust_remote_code):
    """A directory as the original code saved it: its config.json (legacy keys, auto_map pointing at
    remote code that is not there) and a safetensors file with the original keys."""
    cfg = variant_config("embed_ne_hidden")
    config_json = {
        "architectures": ["KPhi3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_kphi3.KPhi3Config",
                     "AutoModelForCausalLM": "modeling_kphi3.KPhi3ForCausalLM"},
        "model_type": "kphi3", "hidden_act": "silu", "rope_scaling": None, "rms_norm_eps": 1e-05,
        "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": 0.02,
        "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "sliding_window": 2047,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.41.2",
        "use_cache": True, **cfg,
    }
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    sd = released_state_dict(cfg, seed=3)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    # The registered class wins over the auto_map, even when remote code is allowed (there is none here).
    kwargs = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert type(model) is KPhi3ForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    # The non-persistent RoPE buffers are recomputed, not left as whatever memory held.
    fresh, _, _ = model.model.rotary_emb.compute_frequencies()
    assert torch.equal(model.model.rotary_emb.inv_freq, fresh)
    assert torch.equal(model.model.rotary_emb.original_inv_freq, fresh)

    input_ids = torch.randint(3, cfg["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    assert rel_error(logits, reference_logits(sd, cfg, input_ids)) < 1e-5
