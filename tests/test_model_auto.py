"""Auto-class registration, the classification heads, gradient checkpointing, hidden states and
attentions, inputs_embeds."""
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import kphi3_model
from kphi3_model import (
    KPhi3Config,
    KPhi3ForCausalLM,
    KPhi3ForSequenceClassification,
    KPhi3ForTokenClassification,
    KPhi3Model,
)

AUTO_CLASSES = [
    (AutoModel, KPhi3Model),
    (AutoModelForCausalLM, KPhi3ForCausalLM),
    (AutoModelForSequenceClassification, KPhi3ForSequenceClassification),
    (AutoModelForTokenClassification, KPhi3ForTokenClassification),
]


def make_config(**overrides):
    shape = dict(vocab_size=40, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=8,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch", num_labels=3)
    shape.update(overrides)
    return KPhi3Config(**shape)


def test_registered_with_auto_config():
    assert type(AutoConfig.for_model("kphi3")) is KPhi3Config


@pytest.mark.parametrize("auto_class, model_class", AUTO_CLASSES, ids=lambda c: c.__name__)
def test_auto_classes_from_config_and_from_pretrained(tmp_path, auto_class, model_class):
    model = auto_class.from_config(make_config())
    assert type(model) is model_class
    model.save_pretrained(tmp_path)
    loaded = auto_class.from_pretrained(tmp_path)
    assert type(loaded) is model_class
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_heads_load_a_causal_lm_checkpoint_and_train(tmp_path):
    KPhi3ForCausalLM(make_config()).save_pretrained(tmp_path)
    input_ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    input_ids[1, -2:] = 0  # right padding: the sequence head pools the last non-pad token

    seq = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    out = seq(input_ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.requires_grad
    out.loss.backward()
    assert seq.model.layers[0].mlp.down_proj.first_pointwise_conv.weight.grad is not None

    tok = AutoModelForTokenClassification.from_pretrained(tmp_path)
    out = tok(input_ids, labels=torch.randint(0, 3, (2, 6)))
    assert out.logits.shape == (2, 6, 3) and torch.isfinite(out.loss)

    base = AutoModel.from_pretrained(tmp_path)
    hidden = base(input_ids).last_hidden_state
    assert hidden.shape == (2, 6, 32)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = KPhi3ForCausalLM(make_config(attn_implementation="eager")).train()
    input_ids = torch.randint(3, 40, (2, 7), generator=torch.Generator().manual_seed(1))

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads()
    # `activation_checkpointing_enable` on newer transformers, `gradient_checkpointing_enable` before.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    loss, got = grads()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_hidden_states_attentions_and_inputs_embeds():
    model = KPhi3ForCausalLM(make_config(attn_implementation="eager")).eval()
    input_ids = torch.randint(3, 40, (2, 5))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, output_attentions=True)
        # The first hidden state is the decoder's input: the embeddings after embed_to_hidden.
        embeds = model.model.embed_tokens(input_ids)
        by_embeds = model(inputs_embeds=embeds).logits
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 5, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_to_hidden(embeds))
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 5, 5)
    torch.testing.assert_close(by_embeds, out.logits)


def test_package_exports():
    assert set(kphi3_model.__all__) >= {
        "KPhi3Config", "KPhi3Model", "KPhi3ForCausalLM", "KPhi3ForSequenceClassification",
        "KPhi3ForTokenClassification", "apply_kphi3_kernels",
    }
