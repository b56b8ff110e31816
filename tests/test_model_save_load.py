"""save_pretrained -> from_pretrained round trips exactly (RoPE buffers included), and weight init:
Phi-3's for nn.Linear / Embedding / RMSNorm, the original's kaiming-uniform for GroupedLinearFast,
and nothing loaded from a checkpoint is re-initialised."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kphi3_kernels import GroupedLinearFast
from kphi3_model import KPhi3Config, KPhi3ForCausalLM

LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.6], "long_factor": [3.0, 4.0, 5.0, 6.0]}


def make_config(**overrides):
    shape = dict(vocab_size=40, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=8,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    shape.update(overrides)
    return KPhi3Config(**shape)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(rope_scaling=LONGROPE, original_max_position_embeddings=4, max_position_embeddings=32, rope_theta=500.0),
    dict(tie_word_embeddings=True, embed_size=32),
], ids=["grouped", "longrope", "tied"])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, overrides):
    model = KPhi3ForCausalLM(make_config(**overrides)).eval()
    model.save_pretrained(tmp_path)
    saved_keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert not any("inv_freq" in key for key in saved_keys)  # non-persistent, as in released checkpoints

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is KPhi3ForCausalLM
    assert loaded.config.to_dict().keys() == model.config.to_dict().keys()
    assert loaded.config.kernel_backend == "torch"
    assert loaded.config.rope_parameters == model.config.rope_parameters
    original = dict(model.state_dict())
    assert loaded.state_dict().keys() == original.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    # Every buffer, non-persistent RoPE frequencies included, is the freshly built model's exactly.
    buffers = dict(model.named_buffers())
    rope_buffers = {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    if model.config.rope_parameters["rope_type"] == "longrope":
        rope_buffers.add("model.rotary_emb.long_inv_freq")
    assert {name for name, _ in loaded.named_buffers()} == set(buffers) == rope_buffers
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    input_ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_rope_buffers_are_recomputed_on_load(tmp_path, monkeypatch):
    """The original remote code left `inv_freq` as uninitialised memory after from_pretrained. Make
    the memory that loading allocates deliberately garbage, and check that the buffers are right."""
    model = KPhi3ForCausalLM(make_config(rope_scaling=LONGROPE, max_position_embeddings=8192))
    model.save_pretrained(tmp_path)
    expected = {name: buffer.clone() for name, buffer in model.named_buffers()}

    real_empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real_empty_like(*a, **k).fill_(float("nan")))
    loaded = KPhi3ForCausalLM.from_pretrained(tmp_path)
    monkeypatch.undo()

    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, expected[name]), name
    fresh, fresh_long, scaling = loaded.model.rotary_emb.compute_frequencies()
    assert torch.equal(loaded.model.rotary_emb.inv_freq, fresh)
    assert torch.equal(loaded.model.rotary_emb.original_inv_freq, fresh)
    assert torch.equal(loaded.model.rotary_emb.long_inv_freq, fresh_long)
    assert not torch.equal(fresh, fresh_long)
    assert scaling == loaded.model.rotary_emb.attention_scaling > 1.0


def kaiming_bound(weight):
    # kaiming_uniform_(a=sqrt(5)) on the 3-D [G, s, og] weight: fan_in = s * og, bound = 1 / sqrt(fan_in).
    return 1.0 / math.sqrt(weight.shape[1] * weight.shape[2])


def test_init_weights_like_the_original():
    config = make_config(vocab_size=512, hidden_size=128, embed_size=96, intermediate_size=512,
                         min_channels_per_group=16, initializer_range=0.05)
    model = KPhi3ForCausalLM(config)
    fast = [m for m in model.modules() if isinstance(m, GroupedLinearFast)]
    assert len(fast) == 2 * 4 * 2 + 2 * 2
    for module in fast:
        bound = kaiming_bound(module.weight)
        w = module.weight.detach()
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    for weight in (model.lm_head.weight, model.model.embed_tokens.weight):
        assert abs(weight.std().item() - 0.05) < 0.005
    assert torch.all(model.model.embed_tokens.weight[0] == 0)  # padding row
    for name, param in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.all(param == 1), name

    # Single-group blocks hold nn.Linear layers: Phi-3's normal init, like the original's _init_weights.
    single = KPhi3ForCausalLM(make_config(min_channels_per_group=4096, hidden_size=128, intermediate_size=256,
                                          initializer_range=0.05))
    linear = single.model.layers[0].mlp.gate_up_proj.first_pointwise_conv.group_layers[0].weight
    assert abs(linear.std().item() - 0.05) < 0.005


def test_missing_keys_are_initialised_and_loaded_ones_kept(tmp_path):
    model = KPhi3ForCausalLM(make_config())
    model.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    state = load_file(path)
    dropped = "model.layers.1.mlp.down_proj.second_pointwise_conv.weight"
    del state[dropped]
    save_file(state, path, metadata={"format": "pt"})

    loaded, info = KPhi3ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {dropped} or set(info["missing_keys"]) == {dropped}
    for key, value in loaded.state_dict().items():
        if key != dropped:
            assert torch.equal(value, state[key]), key
    fresh = loaded.get_parameter(dropped).detach()
    assert torch.isfinite(fresh).all() and 0 < fresh.abs().max() <= kaiming_bound(fresh)


def test_kernel_backend_can_be_chosen_at_load_time(tmp_path):
    KPhi3ForCausalLM(make_config(kernel_backend="auto")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, kernel_backend="torch")
    assert model.config.kernel_backend == "torch"
    assert model.model.layers[0].mlp.down_proj.backend == "torch"
    with pytest.raises(ValueError, match="kernel_backend"):
        AutoModelForCausalLM.from_pretrained(tmp_path, kernel_backend="cuda")
