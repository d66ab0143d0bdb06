"""Run by torchrun (gloo, CPU): a DTensor model with a frozen layer (fc1) and a trainable one (fc2),
recorded with the default choice of what to average, and on rank 0 an unsharded copy fed the same
full weights every step, for tests/test_frozen_sharded.py.

    python -m torch.distributed.run --nproc-per-node N tests/frozen_sharded_worker.py MODE FOLDER STEPS

MODE: fsdp2, tp or hsdp (as in sharded_worker.py). A second run with more STEPS resumes both folders;
``--perturb`` changes one element of the last rank's frozen shard first (the resume must refuse it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from sharded_worker import record_both, sharded_and_full
from torch.distributed.tensor import DTensor

from posthoc_cli import Recorder


def main() -> None:
    mode, folder, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    model, full, rank, world = sharded_and_full(mode, frozen=True)
    assert isinstance(model.fc1.weight, DTensor) and not model.fc1.weight.requires_grad
    if "--perturb" in sys.argv and rank == world - 1:
        with torch.no_grad():
            model.fc1.weight.to_local().view(-1)[0] += 1.0
    rec = Recorder(model, folder / "sharded", sigma_rels=(0.05, 0.10), snapshot_every=4)
    ref = Recorder(full, folder / "plain", sigma_rels=(0.05, 0.10), snapshot_every=4, write=True) if rank == 0 else None
    record_both(model, full, rec, ref, steps)  # fc1 stays as it is
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
