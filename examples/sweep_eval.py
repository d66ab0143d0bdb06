"""Print the validation loss of one weights file: the metric `posthoc-ema sweep` reads (its last line).

    posthoc-ema sweep sweep-ckpts --eval 'python sweep_eval.py {weights}'
"""

import sys

import torch
from safetensors.torch import load_file
from torch import nn


def mlp(seed):  # as in sweep_train.py
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


model = mlp(0)
model.load_state_dict(load_file(sys.argv[1]))
teacher = mlp(1)
with torch.no_grad():
    for p in teacher.parameters():
        p.mul_(2.0)
x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1234))  # the same held-out data each time
with torch.no_grad():
    print(f"{torch.nn.functional.mse_loss(model(x), teacher(x)).item():.6f}")
