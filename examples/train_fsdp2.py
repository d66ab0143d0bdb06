"""FSDP2: each rank records its own shards. Run with: torchrun --nproc-per-node 2 train_fsdp2.py (CPU, gloo)."""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from posthoc_cli import Recorder

dist.init_process_group("gloo")  # on GPUs: "nccl", and the mesh on "cuda"
torch.manual_seed(0)  # the same initial weights on every rank
model = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.Linear(33, 4))
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
for layer in (model[0], model[2]):
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

with Recorder(model, "fsdp2-ckpts", sigma_rels=(0.05, 0.10), snapshot_every=50) as rec:
    generator = torch.Generator().manual_seed(dist.get_rank())
    for step in range(rec.t, 200):  # rec.t > 0 when resuming: restore your own checkpoint of that step
        x = torch.randn(32, 16, generator=generator)
        loss = (model(x) - x[:, :4]).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        rec.update()
if dist.get_rank() == 0:
    print(f"rank 0 wrote its shards of the snapshots at t = 50..{rec.t} into fsdp2-ckpts/")
dist.destroy_process_group()
