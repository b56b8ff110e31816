"""The Hugging Face Trainer trains KPhi-3: fp32 (on the kernels; on CPU through Triton's interpreter)
and mixed precision (bf16 autocast; on CPU the PyTorch path, as the interpreter's bf16 dot is wrong).
Everything is built locally: no hub, no network."""
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

import kphi3_kernels
from kphi3_model import KPhi3Config, KPhi3ForCausalLM

CAN_RUN_TRITON = kphi3_kernels.backend.triton_available() and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


class TinyCorpus(torch.utils.data.Dataset):
    def __init__(self, n=8, length=8, vocab=32):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def train(tmp_path, backend, **precision):
    torch.manual_seed(0)
    config = KPhi3Config(vocab_size=32, embed_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, min_channels_per_group=8, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, kernel_backend=backend)
    model = KPhi3ForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    block_dtypes = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: block_dtypes.append(o.dtype))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, report_to="none", save_strategy="no", use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True, seed=0, **precision,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TinyCorpus())
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(), before[n])]
    return result, losses, changed, model, block_dtypes


@pytest.mark.skipif(not CAN_RUN_TRITON, reason="the triton backend needs Triton and a GPU or TRITON_INTERPRET=1")
def test_trainer_fp32_on_the_kernels(tmp_path):
    result, losses, changed, model, dtypes = train(tmp_path, "triton")
    assert result.global_step == 4 and len(losses) == 4
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert len(changed) == len(list(model.parameters()))  # every parameter was trained
    assert set(dtypes) == {torch.float32}


def test_trainer_mixed_precision_bf16(tmp_path):
    backend = "auto" if torch.cuda.is_available() else "torch"
    result, losses, changed, model, dtypes = train(tmp_path, backend, bf16=True)
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert len(changed) == len(list(model.parameters()))
    assert set(dtypes) == {torch.bfloat16}  # the grouped blocks ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
