"""Accelerate: the Recorder checkpoints with the model and optimizer; run it twice and the second run resumes."""

import os

import torch
from accelerate import Accelerator
from torch import nn

from posthoc_cli import Recorder, scan

accelerator = Accelerator(cpu=True)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
model, opt = accelerator.prepare(model, opt)

# The unwrapped model; only the main process writes snapshots.
rec = Recorder(accelerator.unwrap_model(model), "accelerate-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=100,
               write=accelerator.is_main_process)
accelerator.register_for_checkpointing(rec)
accelerator.wait_for_everyone()  # every process has read the folder before the main one rewinds it
start = 0
if os.path.isdir("state"):
    accelerator.load_state("state")  # model, optimizer and the EMAs as they were at that step
    start = rec.t
for step in range(start, 300):
    x = torch.randn(32, 16)
    loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
    opt.zero_grad()
    accelerator.backward(loss)
    opt.step()
    rec.update()
    if (step + 1) % 150 == 0:
        accelerator.save_state("state")
rec.snapshot()  # the final one (already written here: 300 is a snapshot time)
rec.close()
times = [snapshot.t for snapshot in scan("accelerate-ckpts").series[0.10]]
accelerator.print(f"trained steps {start}..300; snapshots of sigma_rel 0.10 at t = {times}")
