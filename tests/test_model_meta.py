"""Meta device and low-memory loading: a model built under ``torch.device("meta")`` holds no memory
and materialises with ``to_empty`` + ``init_weights`` (RoPE buffers included); ``from_pretrained``
with ``low_cpu_mem_usage=True`` / ``device_map`` loads exactly what was saved.

Shapes only: on the meta device and under ``FakeTensorMode`` every model class runs a forward and a
backward (what ``FlopCounterMode``, fake-tensor tracing and launch counting run), with eager and SDPA
attention; ``FlopCounterMode`` counts its matmuls as a hand count does, and the dense configuration
(``min_channels_per_group < 0``) counts what transformers' Phi-3 counts."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from kphi3_kernels import GroupedLinearFast, GroupedPointwiseConvolutionBlockIO
from kphi3_model import (
    KPhi3Config,
    KPhi3ForCausalLM,
    KPhi3ForSequenceClassification,
    KPhi3ForTokenClassification,
    KPhi3Model,
)

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


BATCH, SEQ = 2, 7
ATTENTION = ["eager", "sdpa"]


def meta_batch():
    input_ids = torch.randint(3, 64, (BATCH, SEQ), device="meta")
    return input_ids, input_ids.clone()  # labels


def assert_shape_only_grads(model, device_type="meta", tensor_type=torch.Tensor):
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert isinstance(param.grad, tensor_type) and param.grad.device.type == device_type, name
        assert param.grad.shape == param.shape and param.grad.dtype == param.dtype, name


def causal_lm_step(model, input_ids, labels, **kwargs):
    out = model(input_ids, labels=labels, **{"use_cache": False, **kwargs})
    out.loss.backward()
    return out


@pytest.mark.parametrize("attn_implementation", ATTENTION)
@pytest.mark.parametrize("overrides", [dict(), dict(rope_scaling=None), dict(min_channels_per_group=-1)],
                         ids=["grouped_longrope", "grouped_default_rope", "dense"])
def test_causal_lm_forward_and_backward_on_meta(attn_implementation, overrides):
    with torch.device("meta"):
        model = KPhi3ForCausalLM(make_config(**overrides, attn_implementation=attn_implementation))
    input_ids, labels = meta_batch()
    out = causal_lm_step(model, input_ids, labels)
    assert out.loss.device.type == "meta" and out.loss.shape == ()
    assert out.logits.device.type == "meta" and out.logits.shape == (BATCH, SEQ, 64)
    assert out.logits.dtype == torch.float32
    assert_shape_only_grads(model)


def test_longrope_past_the_switch_runs_on_meta():
    # Past original_max_position_embeddings longrope takes its long factors: a choice made on the
    # device (no position values are read), so it runs without values too; a long meta batch costs nothing.
    config = make_config()
    with torch.device("meta"):
        model = KPhi3ForCausalLM(config)
    long_ids = torch.randint(3, 64, (1, config.original_max_position_embeddings + 3), device="meta")
    out = causal_lm_step(model, long_ids, long_ids)
    assert out.logits.shape == (*long_ids.shape, 64)
    assert_shape_only_grads(model)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_base_model_and_classification_heads_forward_and_backward_on_meta(attn_implementation):
    config = make_config(num_labels=3, attn_implementation=attn_implementation)
    input_ids, _ = meta_batch()
    with torch.device("meta"):
        base, sequence, token = (cls(config) for cls in
                                 (KPhi3Model, KPhi3ForSequenceClassification, KPhi3ForTokenClassification))

    hidden = base(input_ids).last_hidden_state
    assert hidden.device.type == "meta" and hidden.shape == (BATCH, SEQ, config.hidden_size)
    hidden.sum().backward()
    assert_shape_only_grads(base)

    out = sequence(input_ids, labels=torch.zeros(BATCH, dtype=torch.long, device="meta"))
    assert out.logits.shape == (BATCH, 3)
    out.loss.backward()
    assert_shape_only_grads(sequence)

    out = token(input_ids, labels=torch.zeros(BATCH, SEQ, dtype=torch.long, device="meta"))
    assert out.logits.shape == (BATCH, SEQ, 3)
    out.loss.backward()
    assert_shape_only_grads(token)


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_causal_lm_forward_and_backward_under_fake_tensor_mode(attn_implementation):
    with FakeTensorMode():
        model = KPhi3ForCausalLM(make_config(attn_implementation=attn_implementation))
        input_ids = torch.randint(3, 64, (BATCH, SEQ))
        out = causal_lm_step(model, input_ids, input_ids.clone())
    assert isinstance(out.loss, FakeTensor) and out.loss.shape == ()
    assert out.logits.shape == (BATCH, SEQ, 64)
    assert_shape_only_grads(model, device_type="cpu", tensor_type=FakeTensor)


def count_flops(model, input_ids, labels, **kwargs):
    with FlopCounterMode(display=False) as counter:
        causal_lm_step(model, input_ids, labels, **kwargs)
    return counter.get_total_flops(), counter.get_flop_counts()["Global"]


def hand_count(config):
    """FLOPs of one forward + backward: 3x the forward's (backward: the input's and the weight's
    gradient, each a matmul of the forward's size); a matmul [m, k] @ [k, n] is 2 m k n."""
    tokens = BATCH * SEQ
    head_dim = config.hidden_size // config.num_attention_heads
    # q @ k^T and weights @ v, per layer: 2 B heads S S hd each.
    attention = 3 * config.num_hidden_layers * 2 * (2 * BATCH * config.num_attention_heads * SEQ * SEQ * head_dim)
    lm_head = 3 * 2 * tokens * config.embed_size * config.vocab_size
    return attention, lm_head


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_flop_counter_counts_the_meta_forward_and_backward(attn_implementation):
    config = make_config(attn_implementation=attn_implementation)
    with torch.device("meta"):
        model = KPhi3ForCausalLM(config)
    total, counts = count_flops(model, *meta_batch())
    attention, lm_head = hand_count(config)
    # SDPA on meta runs its math form, so both implementations count the attention as bmm.
    assert counts[torch.ops.aten.bmm] == attention
    assert counts[torch.ops.aten.mm] == lm_head
    assert total >= attention + lm_head > 0


def test_flop_counter_counts_the_grouped_projections():
    config = make_config()
    with torch.device("meta"):
        model = KPhi3ForCausalLM(config)
    total, _ = count_flops(model, *meta_batch())
    attention, lm_head = hand_count(config)
    # An IO block: 4 M in out / G forward (two grouped matmuls), twice that backward (dx; dW1 and dW2).
    tokens = BATCH * SEQ
    blocks = [m for m in model.modules() if isinstance(m, GroupedPointwiseConvolutionBlockIO)]
    assert {m.num_groups for m in blocks} == {2, 5, 20}  # embed_to_hidden, qkv / o / gate_up / hidden_to_embed, down
    grouped = sum(3 * 4 * tokens * m.in_features * m.out_features // m.num_groups for m in blocks)
    assert total == attention + lm_head + grouped


def dense_configs(attn_implementation):
    """KPhi-3 with min_channels_per_group < 0 and the Phi-3 it equals (same shapes and weight names).
    Default RoPE: on some transformers releases Phi-3's own longrope reads position values and does not
    run on meta."""
    shape = dict(vocab_size=64, hidden_size=80, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 attn_implementation=attn_implementation)
    return (KPhi3Config(**shape, embed_size=80, min_channels_per_group=-1, kernel_backend="torch"),
            Phi3Config(**shape))


@pytest.mark.parametrize("attn_implementation", ATTENTION)
def test_dense_config_on_meta_runs_and_counts_as_phi3(attn_implementation):
    kphi3_config, phi3_config = dense_configs(attn_implementation)
    with torch.device("meta"):
        kphi3, phi3 = KPhi3ForCausalLM(kphi3_config), Phi3ForCausalLM(phi3_config)
    assert {n: p.shape for n, p in kphi3.named_parameters()} == {n: p.shape for n, p in phi3.named_parameters()}

    input_ids, labels = meta_batch()
    # With a cache: with neither a cache nor an attention mask, Phi-3's mask function reads the
    # position ids' values (looking for packed sequences), which meta tensors do not have.
    kphi3_total, kphi3_counts = count_flops(kphi3, input_ids, labels, use_cache=True)
    phi3_total, phi3_counts = count_flops(phi3, input_ids, labels, use_cache=True)
    assert_shape_only_grads(kphi3)
    assert_shape_only_grads(phi3)

    # Every projection and the lm_head: mm; attention: bmm (the hand count, as for the grouped model).
    attention, lm_head = hand_count(kphi3_config)
    c = kphi3_config
    head_dim = c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * head_dim
    # in * out of qkv, o, and gate_up + down (hidden -> 2 intermediate, intermediate -> hidden)
    in_out = c.hidden_size * qkv + c.hidden_size * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
    projections = 3 * 2 * BATCH * SEQ * c.num_hidden_layers * in_out
    assert kphi3_counts[torch.ops.aten.mm] == phi3_counts[torch.ops.aten.mm] == projections + lm_head
    assert kphi3_counts[torch.ops.aten.bmm] == attention
    # Phi-3 releases that compute the RoPE angles as `inv_freq[None, :, None] @ position_ids[:, None, :]`
    # count that outer product as a bmm: 2 * (head_dim / 2) * SEQ for the one position row, outside
    # autograd. KPhi-3 (and the Phi-3 releases that broadcast instead) multiply elementwise, uncounted.
    rope_outer_product = 2 * (head_dim // 2) * SEQ
    assert phi3_counts[torch.ops.aten.bmm] - attention in (0, rope_outer_product)
    assert phi3_total - kphi3_total in (0, rope_outer_product)
