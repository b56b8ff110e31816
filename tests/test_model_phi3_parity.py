"""Dense mode (``min_channels_per_group < 0``) is transformers' own Phi-3: same state dict, same keys,
same logits, same loss, same generated tokens."""
import pytest
import torch
from transformers import Phi3Config, Phi3ForCausalLM

from kphi3_model import KPhi3Config, KPhi3ForCausalLM

SHAPE = dict(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=128,
             original_max_position_embeddings=128)


def pair(attn_implementation, **extra):
    shape = {**SHAPE, **extra}
    phi3 = Phi3ForCausalLM(Phi3Config(**shape, attn_implementation=attn_implementation)).eval()
    kphi3 = KPhi3ForCausalLM(
        KPhi3Config(**shape, embed_size=shape["hidden_size"], min_channels_per_group=-1,
                    attn_implementation=attn_implementation)
    ).eval()
    kphi3.load_state_dict(phi3.state_dict(), strict=True)
    return phi3, kphi3


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("extra", [
    dict(),
    dict(num_key_value_heads=2),
    dict(sliding_window=3),
    dict(rope_scaling={"type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                       "long_factor": [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5]},
         original_max_position_embeddings=4, max_position_embeddings=64),
], ids=["mha", "gqa", "sliding_window", "longrope"])
def test_dense_mode_equals_phi3(attn_implementation, extra):
    phi3, kphi3 = pair(attn_implementation, **extra)
    assert set(kphi3.state_dict()) == set(phi3.state_dict())
    input_ids = torch.randint(3, SHAPE["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # a left-padded row
    with torch.no_grad():
        ref = phi3(input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False)
        out = kphi3(input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False)
    torch.testing.assert_close(out.logits, ref.logits.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-6)


def test_dense_mode_generates_like_phi3():
    phi3, kphi3 = pair("sdpa")
    prompt = torch.randint(3, SHAPE["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(kphi3.generate(prompt, **kwargs), phi3.generate(prompt, **kwargs))


def test_dense_mode_gradients_equal_phi3():
    phi3, kphi3 = pair("eager")
    input_ids = torch.randint(3, SHAPE["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(2))
    phi3(input_ids, labels=input_ids, use_cache=False).loss.backward()
    kphi3(input_ids, labels=input_ids, use_cache=False).loss.backward()
    ref = dict(phi3.named_parameters())
    for name, param in kphi3.named_parameters():
        torch.testing.assert_close(param.grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)
