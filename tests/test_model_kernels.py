"""Kernels on vs off: the same model with ``kernel_backend="triton"`` (on CPU: the real kernels through
Triton's interpreter) and ``"torch"`` gives the same logits, loss and every gradient within the
numerics contract of docs/numerics.md (fp32: relative Frobenius error far under 1e-5)."""
import contextlib
import os

import pytest
import torch

import kphi3_kernels
from kphi3_model import KPhi3Config, KPhi3ForCausalLM
from _utils import FP32_TOL, rel_error


needs_triton = pytest.mark.skipif(
    not (kphi3_kernels.backend.triton_available()
         and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="the triton backend needs Triton and a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The released group structure at a fifth of the width: G = 5, 5, 5, 20 (docs/group-count.md).
RELEASED_STRUCTURE = dict(vocab_size=64, embed_size=320, hidden_size=320, intermediate_size=1280, num_hidden_layers=1,
                          num_attention_heads=5, min_channels_per_group=64)
# embed_size != hidden_size (embed_to_hidden / hidden_to_embed blocks) and GQA.
PROJECTED_GQA = dict(vocab_size=40, embed_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=16)


@contextlib.contextmanager
def count_triton_launchers(monkeypatch):
    """Count calls of the Triton launchers, to prove the kernels (not a fallback) ran."""
    from kphi3_kernels.ops import triton_impl

    counts = {}
    for name in triton_impl.__all__:
        original = getattr(triton_impl, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_impl, name, spy)
    yield counts


def run(model, input_ids, attention_mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


@needs_triton
@pytest.mark.parametrize("shape", [RELEASED_STRUCTURE, PROJECTED_GQA], ids=["released_structure", "projected_gqa"])
def test_kernels_on_vs_off(shape, monkeypatch):
    config = KPhi3Config(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    model = KPhi3ForCausalLM(config).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, shape["vocab_size"], (2, 5), generator=gen).to(DEVICE)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 0] = 0  # one left-padded row

    ref_logits, ref_loss, ref_grads = run(model, input_ids, attention_mask)
    model.set_kernel_backend("triton")
    with count_triton_launchers(monkeypatch) as counts:
        logits, loss, grads = run(model, input_ids, attention_mask)

    blocks = 4 * shape["num_hidden_layers"] + (2 if shape["embed_size"] != shape["hidden_size"] else 0)
    assert counts.get("gpc_io_fwd") == blocks and counts.get("gpc_io_bwd") == blocks, counts
    assert rel_error(logits, ref_logits) < FP32_TOL
    assert abs(loss.item() - ref_loss.item()) <= FP32_TOL * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) < FP32_TOL, name


def test_torch_backend_never_launches_a_kernel(monkeypatch):
    config = KPhi3Config(**PROJECTED_GQA, pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    model = KPhi3ForCausalLM(config)
    input_ids = torch.randint(3, PROJECTED_GQA["vocab_size"], (2, 4))
    if kphi3_kernels.backend.triton_available():
        with count_triton_launchers(monkeypatch) as counts:
            run(model, input_ids, None)
        assert counts == {}
    else:
        run(model, input_ids, None)
