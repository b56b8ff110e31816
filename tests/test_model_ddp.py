"""DistributedDataParallel on CPU: two gloo processes, each on half of the global batch, follow the
same loss curve and end with the same weights as one process on the whole batch."""
import os

import torch
import torch.distributed as dist

import kphi3_kernels

from _utils import free_port, gloo_process_group, run_spawned

WORLD_SIZE = 2
STEPS = 3
TIMEOUT_S = 180
# The kernels where they can run (on CPU: Triton's interpreter; TRITON_INTERPRET is inherited by the
# spawned processes), else the PyTorch path.
BACKEND = "triton" if kphi3_kernels.backend.triton_available() and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1") else "torch"


def build_model(backend):
    from kphi3_model import KPhi3Config, KPhi3ForCausalLM

    torch.manual_seed(0)
    config = KPhi3Config(vocab_size=32, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, min_channels_per_group=8,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, kernel_backend=backend)
    return KPhi3ForCausalLM(config).train()


def global_batch():
    return torch.randint(3, 32, (4, 6), generator=torch.Generator().manual_seed(1))


def train(model, batch_for_step, reduce_loss=lambda loss: loss):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        batch = batch_for_step()
        loss = model(batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(reduce_loss(loss.detach()).item())
    return losses


def ddp_worker(rank, port, backend, result_path):
    with gloo_process_group(rank, WORLD_SIZE, port, TIMEOUT_S):
        model = build_model(backend)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        shard = global_batch().chunk(WORLD_SIZE)[rank]  # equal token counts: mean of means = global mean

        def mean_over_ranks(loss):
            dist.all_reduce(loss)
            return loss / WORLD_SIZE

        losses = train(ddp, lambda: shard, mean_over_ranks)
        if rank == 0:
            torch.save({"losses": losses, "state": model.state_dict()}, result_path)


def test_ddp_two_processes_match_one_process():
    result = run_spawned(ddp_worker, (free_port(), BACKEND), WORLD_SIZE, TIMEOUT_S, "DDP")

    model = build_model(BACKEND)
    losses = train(model, global_batch)
    for step, (a, b) in enumerate(zip(result["losses"], losses)):
        assert abs(a - b) <= 1e-5 * abs(b), (step, a, b)
    for name, value in model.state_dict().items():
        ref = value.double()
        assert ((result["state"][name].double() - ref).norm() / ref.norm()).item() < 1e-5, name
