"""Transformers conformance: KPhi-3 behaves as the installed transformers' Phi-3 where both apply.

RoPE types set on a config after its construction are computed by transformers' own RoPE functions
(never silently as ``default``), ``generate(inputs_embeds=...)`` works, the static cache generates
the same tokens as the dynamic one, and passing the cache as ``past_key_values`` is handled exactly as
Phi-3's forward handles it in this release (a ``FutureWarning`` where the cache is called ``cache``).
"""
import warnings

import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kphi3_model import KPhi3Config, KPhi3ForCausalLM, KPhi3Model
from kphi3_model.modeling_kphi3 import CACHE_KWARG

VOCAB = 48
# Dense mode (min_channels_per_group < 0) is Phi-3 with the same weights: the reference for RoPE.
DENSE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=8,
             original_max_position_embeddings=8)
GROUPED = dict(vocab_size=VOCAB, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=8,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")

# Every RoPE type transformers' Phi-3 computes when a config is changed after construction (its
# validation, at construction, only admits default and longrope), with the parameters each needs.
ROPE_AFTER_CONSTRUCTION = {
    "linear": dict(factor=2.0),
    "dynamic": dict(factor=2.0),
    "yarn": dict(factor=2.0),
    "longrope": dict(short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                     long_factor=[2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]),
}


def dense_pair(rope_type, **rope):
    phi3_config = Phi3Config(**DENSE, attn_implementation="eager")
    kphi3_config = KPhi3Config(**DENSE, embed_size=DENSE["hidden_size"], min_channels_per_group=-1,
                               attn_implementation="eager")
    for config in (phi3_config, kphi3_config):
        config.rope_parameters = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                  **rope}
    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(phi3_config).eval()
    kphi3 = KPhi3ForCausalLM(kphi3_config).eval()
    kphi3.load_state_dict(phi3.state_dict(), strict=True)
    return phi3, kphi3


@pytest.mark.parametrize("rope_type", sorted(ROPE_AFTER_CONSTRUCTION))
def test_rope_type_set_after_construction_is_computed_as_phi3_does(rope_type):
    phi3, kphi3 = dense_pair(rope_type, **ROPE_AFTER_CONSTRUCTION[rope_type])
    rotary = kphi3.model.rotary_emb
    assert rotary.rope_type == rope_type
    expected, scaling = ROPE_INIT_FUNCTIONS[rope_type](kphi3.config)
    assert torch.equal(rotary.inv_freq, expected) and rotary.attention_scaling == scaling
    # Longer than max_position_embeddings (8) and original_max_position_embeddings: dynamic NTK grows
    # its frequencies and longrope switches to its long factors, in both models.
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for length in (12, 5, 12):  # and back: the dynamic / longrope state follows the sequence
            ref = phi3(input_ids[:, :length], use_cache=False).logits
            out = kphi3(input_ids[:, :length], use_cache=False).logits
            torch.testing.assert_close(out, ref.float(), rtol=0, atol=1e-6)
    # Not silently the default frequencies (dynamic NTK equals them until the sequence outgrows
    # max_position_embeddings, as the last one did).
    default, _ = rotary.compute_default_rope_parameters(kphi3.config)
    assert not torch.equal(rotary.inv_freq, default)


def test_rope_type_set_after_construction_is_refused_at_save_as_phi3_refuses_it(tmp_path):
    # Saving validates the config again: a type Phi-3's validation does not admit is refused by both.
    phi3, kphi3 = dense_pair("linear", factor=2.0)
    errors = []
    for model in (phi3, kphi3):
        with pytest.raises(Exception, match="rope_parameters") as info:
            model.save_pretrained(tmp_path / type(model).__name__)
        errors.append(type(info.value))
    assert errors[0] is errors[1]


def test_unknown_rope_type_raises_when_the_model_is_built():
    config = KPhi3Config(**GROUPED)
    config.rope_parameters = {"rope_type": "spiral", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="unknown `rope_parameters` type 'spiral'"):
        KPhi3Model(config)


def grouped_model(**overrides):
    torch.manual_seed(0)
    return KPhi3ForCausalLM(KPhi3Config(**{**GROUPED, **overrides}, attn_implementation="sdpa")).eval()


def test_generate_from_inputs_embeds_equals_generate_from_input_ids():
    model = grouped_model()  # embed_size 48 != hidden_size 32: the embeddings are 48 wide
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    from_ids = model.generate(prompt, **kwargs)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, **kwargs)
    assert torch.equal(from_embeds, from_ids[:, prompt.shape[1]:])  # only the new tokens, as for Phi-3
    # Both: the embeddings are the prompt's, the ids are prepended to the output.
    both = model.generate(prompt, inputs_embeds=embeds, **kwargs)
    assert torch.equal(both, from_ids)


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=4)], ids=["plain", "sliding_window"])
def test_static_cache_generates_like_the_dynamic_cache(overrides):
    model = grouped_model(**overrides)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **kwargs)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_declares_what_transformers_compile_and_cache_paths_read():
    assert KPhi3ForCausalLM._can_compile_fullgraph is Phi3ForCausalLM._can_compile_fullgraph is True
    assert set(KPhi3ForCausalLM._skip_keys_device_placement) == {CACHE_KWARG}
    assert KPhi3ForCausalLM._supports_sdpa and KPhi3ForCausalLM._supports_flex_attn


def future_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def test_cache_passed_as_past_key_values_is_handled_as_phi3_handles_it():
    """Whatever the installed Phi-3 does with `past_key_values=` (a FutureWarning and a rename where the
    cache is called `cache`; the plain name where it is still `past_key_values`), KPhi-3 does too."""
    phi3, kphi3 = dense_pair("default")
    input_ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    for model in (phi3, kphi3):
        with torch.no_grad():
            prefix = model(input_ids[:, :4], use_cache=True)
            cache = getattr(prefix, CACHE_KWARG)
            length = cache.get_seq_length()
            step, warned = future_warnings(
                lambda: model(input_ids[:, 4:], past_key_values=cache, use_cache=True))
            assert cache.get_seq_length() == length + 2  # the cache was used and extended
            full = model(input_ids, use_cache=False)
        torch.testing.assert_close(step.logits.float(), full.logits[:, 4:].float(), rtol=1e-5, atol=1e-5)
        if model is phi3:
            phi3_warned = warned
        else:
            assert len(warned) == len(phi3_warned), (warned, phi3_warned)
            assert [m.replace("KPhi3", "Phi3") for m in warned] == phi3_warned
    if CACHE_KWARG == "cache":
        assert phi3_warned and "past_key_values" in phi3_warned[0]  # this release deprecates the old name


@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_the_cache_is_dropped_at_the_longrope_switch_only(rope):
    overrides = dict(original_max_position_embeddings=6, max_position_embeddings=32)
    if rope == "longrope":
        overrides["rope_scaling"] = {"type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.6],
                                     "long_factor": [3.0, 4.0, 5.0, 6.0]}
    model = grouped_model(**overrides)
    input_ids = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = getattr(model(input_ids[:, :6], use_cache=True), CACHE_KWARG)
    inputs = model.prepare_inputs_for_generation(input_ids, **{CACHE_KWARG: cache})
    # Past original_max_position_embeddings longrope's cached keys (short factors) are stale: Phi-3
    # recomputes the sequence without them. Other RoPE types keep their cache.
    assert inputs.get(CACHE_KWARG) is (None if rope == "longrope" else cache)
