"""Generation: with the KV cache equals without it; a left-padded batch gives the tokens of each
sequence generated alone; incremental decoding reproduces the full forward's logits."""
import pytest
import torch

from kphi3_model import KPhi3Config, KPhi3ForCausalLM

VOCAB = 40
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.2, 1.4, 1.6], "long_factor": [3.0, 4.0, 5.0, 6.0]}


def grouped_model(attn_implementation="sdpa", **overrides):
    shape = dict(vocab_size=VOCAB, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=8,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    shape.update(overrides)
    torch.manual_seed(0)
    return KPhi3ForCausalLM(KPhi3Config(**shape, attn_implementation=attn_implementation)).eval()


def greedy(model, input_ids, attention_mask=None, **kwargs):
    return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("overrides", [
    dict(),
    dict(sliding_window=4),
    # The sequence outgrows original_max_position_embeddings while generating: longrope switches to
    # its long factors and the cached keys (short factors) must be dropped, as Phi-3 does.
    dict(rope_scaling=LONGROPE, original_max_position_embeddings=7, max_position_embeddings=32),
], ids=["plain", "sliding_window", "longrope"])
def test_generation_with_cache_equals_without(attn_implementation, overrides):
    model = grouped_model(attn_implementation, **overrides)
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with_cache = greedy(model, prompt, use_cache=True)
    without_cache = greedy(model, prompt, use_cache=False)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padded_batch_equals_single_sequences(attn_implementation):
    model = grouped_model(attn_implementation)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen) for n in (6, 3, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, prompt in enumerate(prompts):
        batch[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    batched = greedy(model, batch, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None])
        assert torch.equal(batched[row, width:], alone[0, len(prompt):]), row


def test_incremental_decoding_reproduces_full_forward():
    model = grouped_model()
    input_ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        out = model(input_ids[:, :5], use_cache=True)
        # The cache's name follows the installed transformers: `cache` on newer, `past_key_values` on older.
        name = "cache" if "cache" in out else "past_key_values"
        cache = out[name]
        steps = [out.logits]
        for t in range(5, 9):
            out = model(input_ids[:, t:t + 1], use_cache=True, **{name: cache})
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_logits_to_keep():
    model = grouped_model()
    input_ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        last = model(input_ids, use_cache=False, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
