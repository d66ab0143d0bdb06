"""Train a small model for 2,000 steps and record two EMAs into ckpts/ (40 snapshots)."""

import torch
from torch import nn

from posthoc_cli import Recorder

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
total_steps = 2000


def batch(n=32):
    x = torch.randn(n, 16)
    return x, x.sum(dim=1, keepdim=True).sin() + 0.3 * torch.randn(n, 1)


with Recorder(model, "ckpts", sigma_rels=(0.05, 0.10), snapshot_every=100) as rec:
    # rec.t is 0 on a fresh folder; on a folder with snapshots the Recorder resumes and
    # rec.t is where your own checkpoint of model and optimizer must continue from.
    for step in range(rec.t, total_steps):
        x, y = batch()
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.update()  # after every optimizer step; snapshots at t = 100, 200, ...

        if (step + 1) % 1000 == 0:
            x, y = batch(4096)
            with torch.no_grad(), rec.swapped(0.10) as ema_model:  # the EMA's weights, restored after
                print(f"step {step + 1}: EMA 0.10 validation loss {nn.functional.mse_loss(ema_model(x), y):.4f}")
