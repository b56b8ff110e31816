"""Meta device and low-memory loading: a model built under ``torch.device("meta")`` holds no memory
and materialises with ``to_empty`` + ``init_weights`` (RoPE buffers included); ``from_pretrained``
with ``low_cpu_mem_usage=True`` / ``device_map`` loads exactly what was saved."""
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from kphi3_kernels import GroupedLinearFast
from kphi3_model import KPhi3Config, KPhi3ForCausalLM

LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(10)],
            "long_factor": [2.0 + 0.5 * i for i in range(10)]}


def make_config(**overrides):
    # The released group structure scaled down: G = 5, 5, 5, 20 (hidden 80, intermediate 320, 16 per group).
    shape = dict(vocab_size=64, embed_size=40, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=16, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, kernel_backend="torch", rope_scaling=LONGROPE,
                 max_position_embeddings=8192)
    shape.update(overrides)
    return KPhi3Config(**shape)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, embed_size=80)], ids=["untied", "tied"])
def test_builds_on_meta_and_materialises_with_to_empty_and_init_weights(overrides):
    config = make_config(**overrides)
    with torch.device("meta"):
        model = KPhi3ForCausalLM(config)
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    assert {t.device.type for t in tensors.values()} == {"meta"}  # nothing allocated

    model.to_empty(device="cpu")
    with torch.no_grad():  # whatever memory to_empty hands out: make it garbage
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.fill_(float("nan"))
    model.init_weights()

    fresh = KPhi3ForCausalLM(config)  # built on the CPU the ordinary way
    for name, buffer in model.named_buffers():  # the non-persistent RoPE frequencies, recomputed
        assert torch.equal(buffer, dict(fresh.named_buffers())[name]), name
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("norm.weight"):
            assert torch.all(param == 1), name
    assert torch.all(model.model.embed_tokens.weight[0] == 0)  # padding row
    for module in model.modules():
        if isinstance(module, GroupedLinearFast):  # kaiming_uniform_(a=sqrt(5)) on [G, s, og]
            w = module.weight
            assert 0 < w.abs().max() <= 1 / math.sqrt(w.shape[1] * w.shape[2])
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight

    # Materialised, it computes what the ordinary model computes with the same weights.
    model.load_state_dict(fresh.state_dict())
    input_ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, fresh(input_ids).logits)


@pytest.mark.parametrize("kwargs", [
    dict(low_cpu_mem_usage=True),
    dict(device_map="cpu"),
    dict(low_cpu_mem_usage=True, device_map="cpu"),
    dict(device_map="auto"),  # with accelerate: everything fits on the CPU
], ids=["low_cpu_mem_usage", "device_map_cpu", "both", "device_map_auto"])
def test_from_pretrained_low_memory_loads_exactly_what_was_saved(tmp_path, kwargs):
    model = KPhi3ForCausalLM(make_config()).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs).eval()
    assert type(loaded) is KPhi3ForCausalLM
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    for key, value in loaded.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, original[key]), key
    buffers = dict(model.named_buffers())
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    input_ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
