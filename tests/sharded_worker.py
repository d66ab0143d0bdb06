"""Run by torchrun (gloo, CPU): record a DTensor model with a Recorder, and on rank 0 an unsharded copy
fed the same full weights every step, for tests/test_sharded_e2e.py.

    python -m torch.distributed.run --nproc-per-node N tests/sharded_worker.py MODE FOLDER STEPS

MODE: fsdp2 (1-D mesh), tp (colwise fc1, rowwise fc2), hsdp (2 x N/2 mesh: replicate x shard).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from posthoc_cli import Recorder


class Net(nn.Module):
    """7 rows (not divisible by 2 or 3), a 2-row layer (fewer rows than 3 ranks), a float and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 2)
        self.register_buffer("scale", torch.ones(3))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def shard(model: Net, mode: str, world: int) -> None:
    if mode == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model.fc2, mesh=mesh)
        fully_shard(model, mesh=mesh)
    elif mode == "tp":
        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    else:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(model, mesh=mesh)  # a 2-D mesh: HSDP


def record_both(model: Net, full: Net, rec: Recorder, ref: Recorder | None, steps: int) -> None:
    """Steps rec.t + 1 .. ``steps``: the same seeded full weights into ``full`` and, as local shards, into ``model``
    (frozen parameters stay as they are), every buffer set to the step; both Recorders updated, then closed."""
    with torch.no_grad():
        for step in range(rec.t + 1, steps + 1):
            g = torch.Generator().manual_seed(step)
            for p, q in zip(model.parameters(), full.parameters()):
                if not q.requires_grad:
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


def sharded_and_full(mode: str, frozen: bool = False) -> tuple[Net, Net, int, int]:
    """Join the gloo group; the seeded :class:`Net` sharded by ``mode`` and an unsharded copy of it
    (fc1 frozen in both if ``frozen``), with this rank and the world size."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Net()
    if frozen:
        model.fc1.requires_grad_(False)  # the frozen base: stored once, never averaged
    full = copy.deepcopy(model)
    shard(model, mode, world)
    return model, full, rank, world


def main() -> None:
    mode, folder, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    model, full, rank, _ = sharded_and_full(mode)
    assert any(isinstance(p, DTensor) for p in model.parameters())
    rec = Recorder(model, folder / "sharded", sigma_rels=(0.05, 0.10), snapshot_every=10)
    ref = Recorder(full, folder / "plain", sigma_rels=(0.05, 0.10), snapshot_every=10) if rank == 0 else None
    record_both(model, full, rec, ref, steps)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
