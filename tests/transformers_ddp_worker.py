"""Run under torchrun (2 processes, gloo): the HF Trainer with DDP on CPU and PosthocEMACallback.

Usage: ``torchrun --nproc_per_node 2 transformers_ddp_worker.py OUT_DIR``. Snapshots go to
OUT_DIR/posthoc-ema (world process zero writes); each rank leaves its Recorder state in OUT_DIR/rankR.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers

from posthoc_cli.integrations.transformers import PosthocEMACallback


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (16, 12), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6,
        save_strategy="steps", save_steps=3, logging_strategy="no", report_to=[], use_cpu=True,
        ddp_backend="gloo", disable_tqdm=True,
    )
    callback = PosthocEMACallback(snapshot_every=2)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids], callbacks=[callback]
    )
    trainer.train()
    assert callback.recorder is not None
    rank = trainer.args.process_index
    torch.save({"writes": callback.recorder.writes, "world": trainer.args.world_size, **callback.recorder.state_dict()},
               out / f"rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # Tear the gloo group down here, as the other workers do: left to interpreter exit, its threads
    # can be destroyed still joinable ("terminate called without an active exception", SIGABRT).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
