"""torch.compile and torch.export of KPhi-3 with grouped layers, whole-graph.

A tiny model with the released group structure scaled down (hidden 80, intermediate 320, 16 channels
per group: G = 5, 5, 5, 20) on the torch backend, compiled with ``fullgraph=True`` (any graph break
raises): a training step (loss and every gradient) equals eager within the fp32 contract, and
``generate`` with the static cache through transformers' own compile path gives eager's tokens. A
decoder layer exports with ``torch.export`` with a dynamic batch and sequence length.

The compiler backend is ``aot_eager`` (Dynamo's whole-graph capture and AOTAutograd's joint
forward/backward graph, the stages where graph breaks and tracing failures happen) so that the file
stays fast on a CPU; ``KPHI3_TEST_COMPILE_BACKEND=inductor`` runs the same tests through Inductor.
"""
import os

import pytest
import torch
from transformers import CompileConfig

from kphi3_model import KPhi3Config, KPhi3ForCausalLM
from _utils import FP32_TOL, rel_error

COMPILE_BACKEND = os.environ.get("KPHI3_TEST_COMPILE_BACKEND", "aot_eager")
VOCAB = 64


def tiny_model(**overrides):
    shape = dict(vocab_size=VOCAB, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=16, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    shape.update(overrides)
    torch.manual_seed(0)
    model = KPhi3ForCausalLM(KPhi3Config(**shape, attn_implementation="sdpa"))
    layer = model.model.layers[0]
    blocks = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    assert [block.num_groups for block in blocks] == [5, 5, 5, 20]
    return model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_equals_eager():
    model = tiny_model(embed_size=40)  # embed_size != hidden_size: embed_to_hidden / hidden_to_embed too
    model.train()
    input_ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    eager = model(input_ids, labels=input_ids, use_cache=False)
    eager.loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    out = compiled(input_ids, labels=input_ids, use_cache=False)
    out.loss.backward()

    assert rel_error(out.loss, eager.loss) < FP32_TOL
    assert rel_error(out.logits, eager.logits) < FP32_TOL
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert rel_error(param.grad, eager_grads[name]) < FP32_TOL, name


def test_generate_with_static_cache_compiles_whole_graph_and_equals_eager():
    model = tiny_model().eval()
    prompt = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    eager = model.generate(prompt, **kwargs)

    # transformers compiles the decoding forward itself when the cache is static (here asked for on a
    # CPU too), with our fullgraph=True: a graph break would raise.
    compile_config = CompileConfig(fullgraph=True, backend=COMPILE_BACKEND, mode=None)
    compile_config._compile_all_devices = True
    compiled_calls = []
    get_compiled_call = model.get_compiled_call

    def spy(config):
        compiled_calls.append(config)
        return get_compiled_call(config)

    model.get_compiled_call = spy
    compiled = model.generate(prompt, compile_config=compile_config, **kwargs)
    assert compiled_calls, "generate did not take its compile path"
    assert torch.equal(compiled, eager)


def test_decoder_layer_exports_with_dynamic_batch_and_sequence():
    model = tiny_model(num_hidden_layers=1).eval()
    layer = model.model.layers[0]

    def inputs(batch, seq, seed):
        hidden = torch.randn(batch, seq, 80, generator=torch.Generator().manual_seed(seed))
        position_ids = torch.arange(seq)[None]
        return hidden, {"position_embeddings": model.model.rotary_emb(hidden, position_ids),
                        "position_ids": position_ids}

    hidden, kwargs = inputs(2, 7, 0)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=512)
    exported = torch.export.export(layer, (hidden,), kwargs, dynamic_shapes={
        "hidden_states": {0: batch, 1: seq}, "position_embeddings": ({1: seq}, {1: seq}), "position_ids": {1: seq}})
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any(op.startswith("kphi3.") for op in ops), ops  # the grouped layers stay single operators
    for shape in ((2, 7), (3, 5), (1, 33)):
        hidden, kwargs = inputs(*shape, seed=sum(shape))
        with torch.no_grad():
            assert rel_error(exported.module()(hidden, **kwargs), layer(hidden, **kwargs)) < FP32_TOL, shape
