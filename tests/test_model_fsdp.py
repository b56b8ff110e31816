"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on CPU: two gloo processes, each decoder layer a
shard unit and the root one more, activation checkpointing on, AdamW. The recipes of
docs/distributed.md are run as written there: saving from the shards, building on the meta device
and loading by broadcast.

* fp32: the sharded run on half of the global batch per process follows the loss curve of one
  unsharded process on the whole batch, its first step's reduced gradients are that process's, and
  it ends with the same weights, all within the fp32 contract (1e-5 relative). The learning rate is
  a fine-tuning one, 1e-3: AdamW normalises each element's step by its gradient's size, which turns
  the ~1e-7 rounding differences of near-zero gradients into weight differences in proportion to
  the learning rate (after three steps: 2e-6 at 1e-3, 1.2e-5 at 1e-2, while the first step's
  gradients agree to 1e-7 either way).
  The grouped weights ``[G, s, og]`` are sharded on their group dimension, unevenly (G = 5 over two
  processes), so this also covers FSDP2's padded shards.
* bf16 mixed precision (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``), torch
  backend: compared with a one-process run under the same policy. The two differ only by where the
  gradients are rounded to bf16 before the fp32 reduction (per half batch, or once over the whole
  batch): a couple of roundings of 2^-8 = 3.9e-3 (bf16's unit roundoff). So the first step's reduced
  gradients and every step's loss must agree to 1e-2 (relative). The final weights are not compared
  element by element: an AdamW step is close to ``lr * sign(grad)`` per element, so an element whose
  gradient is within rounding of zero can step the other way, by 2 lr, whatever the precision of the
  rest. What the roundings cannot change is the update as a whole: the total updates
  (final - initial weights) of the two runs must point the same way, cosine > 1 - 1e-2 (about 0.1%
  of the elements disagree in sign here; cosine 0.9999). The bf16 run is also checked to really
  compute in bf16: its first gradients (same weights) differ from the fp32 run's by bf16's error, far
  beyond the fp32 contract (1.4e-2 here: bf16 all through the forward and backward).
"""

import pytest
import torch
import torch.distributed as dist

from _utils import FP32_TOL, free_port, gloo_process_group, rel_error, run_spawned

WORLD_SIZE = 2
STEPS = 3
LR = 1e-3  # see the module docstring
TIMEOUT_S = 180
BF16_TOL = 1e-2
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)", allow_module_level=True)


def build_model():
    from kphi3_model import KPhi3Config, KPhi3ForCausalLM

    torch.manual_seed(0)
    # The released group structure scaled down (G = 5, 5, 5, 20), embed_size != hidden_size.
    config = KPhi3Config(vocab_size=64, embed_size=40, hidden_size=80, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=16,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend="torch")
    model = KPhi3ForCausalLM(config).train()
    # Non-reentrant activation checkpointing of every decoder layer (the name of the switch changed in
    # transformers 5.2x; the older one still works there, with a deprecation warning).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    return model


def global_batch():
    return torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(1))


def train(model, batch, reduce_loss=lambda loss: loss, first_grads=None):
    """STEPS AdamW steps; the losses. ``first_grads``: a dict to fill with the first step's gradients."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        if step == 0 and first_grads is not None:
            for name, param in model.named_parameters():  # sharded: DTensors, gathered here
                grad = param.grad
                first_grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(reduce_loss(loss.detach().float()).item())
    return losses


def fsdp_worker(rank, world_size, port, modes, result_path):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with gloo_process_group(rank, world_size, port, TIMEOUT_S):
        results = {}
        for mode in modes:
            model = build_model()
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if mode == "bf16" else MixedPrecisionPolicy())
            for layer in model.model.layers:
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            shard = global_batch().chunk(world_size)[rank]  # equal token counts: mean of means = global mean

            def mean_over_ranks(loss):
                dist.all_reduce(loss)
                return loss / world_size

            initial = {name: param.full_tensor().clone() for name, param in model.named_parameters()}  # a collective
            first_grads = {}
            losses = train(model, shard, mean_over_ranks, first_grads)
            state = {name: param.full_tensor().clone() for name, param in model.named_parameters()}
            results[mode] = {"losses": losses, "state": state, "initial": initial, "first_grads": first_grads}
            if mode == "fp32":
                results["reloaded"] = save_and_rebuild(model, shard, result_path + ".checkpoint")
        if rank == 0:
            torch.save(results, result_path)


def save_and_rebuild(model, batch, directory):
    """docs/distributed.md's recipes: the full state dict gathered to rank 0 and saved with
    save_pretrained, then a model built on the meta device, sharded, materialised with to_empty +
    init_weights and loaded by broadcast from rank 0. Returns the saved state dict (rank 0) and the
    largest difference of the rebuilt model's logits from the trained one's."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.fsdp import fully_shard

    from kphi3_model import KPhi3ForCausalLM

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = {name: tensor.clone() for name, tensor in state.items()}  # save_pretrained consumes its dict
    if dist.get_rank() == 0:
        model.save_pretrained(directory, state_dict=state)
    dist.barrier()
    loaded = KPhi3ForCausalLM.from_pretrained(directory)
    with torch.device("meta"):
        rebuilt = KPhi3ForCausalLM(loaded.config)
    for layer in rebuilt.model.layers:
        fully_shard(layer)
    fully_shard(rebuilt)
    rebuilt.to_empty(device="cpu")
    rebuilt.init_weights()
    full = loaded.state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(rebuilt, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():
        difference = (rebuilt(batch).logits - model(batch).logits).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return {"saved": saved, "loaded": loaded.state_dict(), "logits_difference": difference.item()}


def run_fsdp(world_size, modes):
    return run_spawned(fsdp_worker, (world_size, free_port(), modes), world_size, TIMEOUT_S, "FSDP")


def test_fsdp2_two_processes_match_one_process():
    sharded = run_fsdp(WORLD_SIZE, ("fp32", "bf16"))
    one_bf16 = run_fsdp(1, ("bf16",))["bf16"]

    # fp32: one plain process on the whole batch, same checkpointing, same optimizer.
    model = build_model()
    first_grads = {}
    losses = train(model, global_batch(), first_grads=first_grads)
    fp32 = sharded["fp32"]
    for step, (a, b) in enumerate(zip(fp32["losses"], losses)):
        assert abs(a - b) <= FP32_TOL * abs(b), (step, a, b)
    for name, grad in fp32["first_grads"].items():
        assert rel_error(grad, first_grads[name]) < FP32_TOL, name
    reference = dict(model.named_parameters())
    assert fp32["state"].keys() == reference.keys()
    for name, value in fp32["state"].items():
        assert value.dtype == torch.float32
        assert rel_error(value, reference[name]) < FP32_TOL, name

    # The trained model saved from the shards reloads exactly; rebuilt on the meta device and loaded by
    # broadcast, it computes the same logits.
    reloaded = sharded["reloaded"]
    assert reloaded["saved"].keys() == reloaded["loaded"].keys() == fp32["state"].keys()
    for name, value in reloaded["loaded"].items():
        assert torch.equal(value, reloaded["saved"][name]) and torch.equal(value, fp32["state"][name]), name
    assert reloaded["logits_difference"] == 0.0

    # bf16 mixed precision: two processes vs one under the same policy (see the module docstring).
    bf16 = sharded["bf16"]
    for name, grad in bf16["first_grads"].items():  # where the bf16 roundings act: the reduced gradients
        assert grad.dtype == torch.float32  # reduce_dtype
        assert rel_error(grad, one_bf16["first_grads"][name]) < BF16_TOL, name
    for step, (a, b) in enumerate(zip(bf16["losses"], one_bf16["losses"])):
        assert abs(a - b) <= BF16_TOL * abs(b), (step, a, b)
    update, one_update = ({name: r["state"][name] - r["initial"][name] for name in r["state"]} for r in (bf16, one_bf16))
    assert all(value.dtype == torch.float32 for value in bf16["state"].values())  # sharded parameters stay fp32
    flat, one_flat = (torch.cat([u[name].flatten() for name in sorted(u)]) for u in (update, one_update))
    cosine = (flat @ one_flat / (flat.norm() * one_flat.norm())).item()
    assert cosine > 1 - BF16_TOL, cosine
    # It did compute in bf16: its first gradients (same weights) are far from fp32's (about 1e-2).
    versus_fp32 = max(rel_error(grad, fp32["first_grads"][name]) for name, grad in bf16["first_grads"].items())
    assert versus_fp32 > 100 * FP32_TOL, versus_fp32
