"""Run by torchrun (gloo, CPU): a DTensor model with a frozen layer (fc1) and a trainable one (fc2),
recorded with the default choice of what to average, and on rank 0 an unsharded copy fed the same
full weights every step, for tests/test_frozen_sharded.py.

    python -m torch.distributed.run --nproc-per-node N tests/frozen_sharded_worker.py MODE FOLDER STEPS

MODE: fsdp2, tp or hsdp (as in sharded_worker.py). A second run with more STEPS resumes both folders;
``--perturb`` changes one element of the last rank's frozen shard first (the resume must refuse it).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sharded_worker import Net, shard
from torch.distributed.tensor import DTensor, distribute_tensor

from posthoc_cli import Recorder


def main() -> None:
    mode, folder, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    model.fc1.requires_grad_(False)  # the frozen base: stored once, never averaged
    full = copy.deepcopy(model)
    shard(model, mode, world)
    assert isinstance(model.fc1.weight, DTensor) and not model.fc1.weight.requires_grad
    if "--perturb" in sys.argv and rank == world - 1:
        with torch.no_grad():
            model.fc1.weight.to_local().view(-1)[0] += 1.0
    rec = Recorder(model, folder / "sharded", sigma_rels=(0.05, 0.10), snapshot_every=4)
    ref = Recorder(full, folder / "plain", sigma_rels=(0.05, 0.10), snapshot_every=4, write=True) if rank == 0 else None
    start = rec.t
    with torch.no_grad():
        for step in range(start + 1, steps + 1):
            g = torch.Generator().manual_seed(step)
            for (name, p), q in zip(model.named_parameters(), full.parameters()):
                if name.startswith("fc1"):
                    continue
                new = torch.randn(q.shape, generator=g) * (1 + step / 10)
                q.copy_(new)
                p.to_local().copy_(distribute_tensor(new, p.device_mesh, p.placements, src_data_rank=None).to_local())
            for b, c in zip(model.buffers(), full.buffers()):
                value = torch.full_like(c, step)
                b.copy_(value)
                c.copy_(value)
            rec.update()
            if ref is not None:
                ref.update()
    rec.close()
    if ref is not None:
        ref.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
