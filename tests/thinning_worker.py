"""Run by torchrun (gloo, CPU): an FSDP2 model recorded at every step into FOLDER/sharded (all kept) and
FOLDER/thinned (``max_snapshots``), for tests/test_prune.py.

    python -m torch.distributed.run --nproc-per-node 2 tests/thinning_worker.py FOLDER STEPS MAX_SNAPSHOTS
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist
from sharded_worker import record_both, sharded_and_full

from posthoc_cli import Recorder


def main() -> None:
    folder, steps, max_snapshots = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    model, full, _, _ = sharded_and_full("fsdp2")
    kept = Recorder(model, folder / "sharded", sigma_rels=(0.05, 0.10), snapshot_every=1)
    thinned = Recorder(model, folder / "thinned", sigma_rels=(0.05, 0.10), snapshot_every=1,
                       max_snapshots=max_snapshots, keep_faithful=(0.03, 0.20))
    record_both(model, full, kept, thinned, steps)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
