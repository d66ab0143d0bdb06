"""Bounded disk and Switch EMA: at most 40 snapshots per sigma_rel, chosen to keep 0.03-0.20 faithful,
and the EMA of sigma_rel 0.05 copied into the training weights at each epoch end (Li et al. 2024)."""

import torch
from torch import nn

from posthoc_cli import Recorder

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)

with Recorder(model, "bounded-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=10,
              max_snapshots=40, keep_faithful=(0.03, 0.20)) as rec:
    for epoch in range(4):
        for step in range(250):
            x = torch.randn(32, 16)
            loss = nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True).sin())
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.update()
        rec.copy_to_model(0.05)  # Switch EMA: the EMA becomes the training weights; no EMA restarts

print(f"t={rec.t}: {len(list(rec.ckpt_dir.glob('ema-*.safetensors')))} snapshot files kept of {2 * rec.t // 10} written")
