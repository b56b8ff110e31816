"""Convergence: a tiny grouped model trained with AdamW gives the same loss curve with the kernels
(``kernel_backend="triton"``; on CPU through Triton's interpreter) and without (``"torch"``), fp32.

The model is smaller than the released group structure (G = 2, 2, 2, 4 instead of 5, 5, 5, 20) so
that two dozen steps through the interpreter fit the CPU test budget; test_model_kernels.py checks
the released structure for one step."""
import os

import pytest
import torch

import kphi3_kernels
from kphi3_model import KPhi3Config, KPhi3ForCausalLM

STEPS = 24
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def loss_curve(backend):
    torch.manual_seed(0)
    config = KPhi3Config(vocab_size=32, embed_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, min_channels_per_group=32, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, kernel_backend=backend)
    model = KPhi3ForCausalLM(config).to(DEVICE).train()
    layer = model.model.layers[0]
    assert [layer.self_attn.qkv_proj.num_groups, layer.mlp.down_proj.num_groups] == [2, 4]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    data = torch.randint(3, 32, (4, 9), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = []
    for _ in range(STEPS):
        loss = model(data, labels=data, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.skipif(
    not (kphi3_kernels.backend.triton_available()
         and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="the triton backend needs Triton and a GPU or TRITON_INTERPRET=1",
)
def test_same_loss_curve_with_and_without_kernels():
    ref_losses, ref_params = loss_curve("torch")
    losses, params = loss_curve("triton")
    assert ref_losses[-1] < 0.5 * ref_losses[0]  # it does learn (memorising one batch)
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (step, a, b)
    for name, ref in ref_params.items():
        assert ((params[name] - ref).norm() / ref.norm()).item() < 1e-5, name
