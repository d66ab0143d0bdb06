"""Hugging Face Trainer: record the post-hoc EMA of a tiny GPT-2 with PosthocEMACallback (offline, CPU)."""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from posthoc_cli.integrations.transformers import PosthocEMACallback

torch.manual_seed(0)
config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(config)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (64, 16))]
args = TrainingArguments(output_dir="hf-run", per_device_train_batch_size=8, gradient_accumulation_steps=2,
                         max_steps=40, save_steps=20, logging_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=data,
                  callbacks=[PosthocEMACallback(sigma_rels=(0.05, 0.10), snapshot_every=4)])
trainer.train()  # later: trainer.train(resume_from_checkpoint=True) continues the EMAs exactly
print(f"{len(list(Path('hf-run/posthoc-ema').glob('ema-*')))} snapshots in hf-run/posthoc-ema")
