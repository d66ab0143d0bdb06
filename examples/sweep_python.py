"""Find the best EMA from Python: each candidate synthesized in memory, no file written (after sweep_train.py)."""

import torch
from torch import nn

from posthoc_cli import sweep


def mlp(seed):  # as in sweep_train.py
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


model, teacher = mlp(0), mlp(1)
with torch.no_grad():
    for p in teacher.parameters():
        p.mul_(2.0)
x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1234))


def val_loss(state_dict, target):  # called once per candidate, with its complete state dict
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return nn.functional.mse_loss(model(x), teacher(x)).item()


result = sweep("sweep-ckpts", val_loss)  # results in sweep-ckpts/sweeps/: calling again resumes
best = result.best
print(f"{len(result.rows)} candidates; best: {best.target} at t={best.step}, validation loss {best.metric:.6f}")
