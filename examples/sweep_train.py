"""Train a small model with noisy SGD and record two EMAs into sweep-ckpts/ (for `posthoc-ema sweep`).

A high learning rate keeps the raw weights bouncing around the optimum, so the
length of the EMA matters: too short keeps the noise, too long remembers early
weights. Where the best length lies is what the sweep finds.
"""

import torch
from torch import nn

from posthoc_cli import Recorder


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


teacher = mlp(1)  # the function to learn; sweep_eval.py builds the same one
with torch.no_grad():
    for p in teacher.parameters():
        p.mul_(2.0)  # a wigglier function than the default initialisation
model = mlp(0)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(0)

with Recorder(model, "sweep-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=200) as rec:
    for step in range(rec.t, 6000):
        x = torch.randn(8, 16, generator=g)
        with torch.no_grad():
            y = teacher(x) + torch.randn(8, 1, generator=g)  # noisy labels
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec.update()
