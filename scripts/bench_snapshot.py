"""How long ``Recorder.snapshot()`` blocks the training thread, against a synchronous save.

Peers (``pip install --no-deps ema-pytorch pytorch-posthoc-ema && pip install pillow``, as
for the other benchmarks) are not used here: neither writes in the background, so the
baseline is the synchronous safetensors save that a training script would otherwise do.

What is measured, for a model of ``--model-mb`` MB of float32 Linear layers (64 by
default) recorded with 2 sigma_rels, so one snapshot is 2 files of that size:

- stall: the time ``Recorder.snapshot()`` takes to return with the default background
  writer (the training thread only stages the EMAs; a writer thread serialises them);
- stall + next update's wait: the writer may copy the EMAs to staging memory itself, and
  the next ``update()`` then waits for that copy. Called at once (no training work in
  between, the worst case), the extra time of that update over a plain one is added;
- written: from the same call until both files are visible in the folder (the writer
  renames a finished file into place, so its appearance means "written and fsynced");
- ``Recorder(..., async_write=False).snapshot()``: the same write done synchronously;
- baseline: two ``safetensors.torch.save_file`` calls of the same tensors (one per
  sigma_rel), synchronous, as most training scripts save; and the same followed by fsync.
  The ratios use the "warm" save (the second of two in a row, its buffers already
  mapped); "cold" rows show a single save after other work, which on some VMs pays
  much more for first touching fresh memory. Both are shown; neither is flattering.

Every case starts with no dirty pages pending (``os.sync()`` outside the timing);
cases run interleaved after a warm-up, and the table shows medians over ``--repeats``.
All files go to a temporary folder (``--dir`` picks its parent) that is removed at the end.

Target (issue 4): stall <= 0.25x the two synchronous ``save_file`` calls.

    python scripts/bench_snapshot.py [--quick] [--repeats N] [--model-mb 64] [--device cuda]
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _bench as B
import torch
from safetensors.torch import save_file
from torch import nn

SIGMA_RELS = (0.05, 0.10)
NEVER = 10**15  # a snapshot interval that update() never reaches
SAVE = "save_file x2 (synchronous)"
SAVE_FSYNC = "save_file x2 + fsync"
WIDTH = 1024  # Linear(1024, 1024): 4 MB of weights per layer


def make_model(model_mb: int, device: torch.device) -> nn.Module:
    layers = max(1, model_mb * B.MB // (WIDTH * WIDTH * 4))
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers))).to(device)


def count_files(folder: Path) -> int:
    # Finished snapshots only: a writer's temporary file ends in ".tmp".
    return sum(1 for _ in folder.glob("*.safetensors"))


def wait_for(folder: Path, count: int, timeout: float = 120.0) -> None:
    deadline = B.now() + timeout
    while count_files(folder) < count:
        if B.now() > deadline:
            raise TimeoutError(f"{folder}: expected {count} snapshot files after {timeout} s")
        time.sleep(0.0005)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> None:
    p = B.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model-mb", type=int, default=None, help="model size in MB (default 64; 32 with --quick)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--dir", default=None, help="parent of the temporary folder (default: the system's)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    cuda = device.type == "cuda"
    repeats = B.repeats_of(args)
    model_mb = args.model_mb or (32 if args.quick else 64)

    ours, ours_v = B.load_ours()
    B.print_environment({"posthoc-ema": ours_v})

    torch.manual_seed(0)
    model = make_model(model_mb, device)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # What save_file is given: one float32 copy of the state dict per sigma_rel, like the EMAs.
    copies = [{k: v.detach().clone().contiguous() for k, v in model.state_dict().items()} for _ in SIGMA_RELS]

    with tempfile.TemporaryDirectory(prefix="posthoc-bench-snapshot-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        written: list[float] = []  # snapshot() until both files are in place
        worst: list[float] = []  # snapshot() + extra time of an immediate next update()
        closers: list[Callable[[], object]] = []
        cases: dict[str, B.Case] = {}

        def settle() -> None:
            if cuda:
                torch.cuda.synchronize()
            os.sync()

        if ours is not None:
            async_dir, sync_dir = tmp / "async", tmp / "sync"
            rec_async = ours.Recorder(model, async_dir, sigma_rels=SIGMA_RELS, snapshot_every=NEVER)
            rec_sync = ours.Recorder(model, sync_dir, sigma_rels=SIGMA_RELS, snapshot_every=NEVER,
                                     async_write=False)
            closers += [rec_async.close, rec_sync.close]

            def snapshot_async() -> float:
                before = count_files(async_dir)
                settle()
                t0 = B.now()
                rec_async.update()  # a new t, so the snapshot has a new name
                plain_update = B.now() - t0
                t0 = B.now()
                rec_async.snapshot()
                stall = B.now() - t0
                # The EMAs may be copied to staging by the writer thread, and the next update
                # waits for that copy: with no training work in between, that wait is a stall too.
                t1 = B.now()
                rec_async.update()
                next_update = B.now() - t1
                wait_for(async_dir, before + len(SIGMA_RELS))
                written.append(B.now() - t0)
                worst.append(stall + max(0.0, next_update - plain_update))
                return stall

            def snapshot_sync() -> float:
                rec_sync.update()
                settle()
                t0 = B.now()
                rec_sync.snapshot()
                return B.now() - t0

            cases["posthoc-ema snapshot() stall"] = snapshot_async
            cases["posthoc-ema snapshot(), async_write=False"] = snapshot_sync

        def save(fsync: bool, warm: bool) -> B.Case:
            paths = [tmp / f"save-{i}.safetensors" for i in range(len(copies))]

            def once() -> float:
                settle()
                t0 = B.now()
                for path, tensors in zip(paths, copies):
                    save_file(tensors, str(path))
                    if fsync:
                        fsync_file(path)
                elapsed = B.now() - t0
                for path in paths:
                    path.unlink()
                return elapsed

            # "warm": the second of two saves in a row, so the memory save_file allocates is
            # already mapped; on some VMs the first touch of fresh memory is many times slower.
            return (lambda: (once(), once())[1]) if warm else once

        cases[SAVE] = save(fsync=False, warm=True)
        cases[SAVE_FSYNC] = save(fsync=True, warm=True)
        cases["save_file x2, cold"] = save(fsync=False, warm=False)
        cases["save_file x2 + fsync, cold"] = save(fsync=True, warm=False)

        results = B.run_interleaved(cases, repeats, warmup=1)
        written, worst = written[-repeats:], worst[-repeats:]  # drop the warm-up's
        t0 = B.now()
        for close in closers:
            close()
        close_s = B.now() - t0 if closers else None

    med = {k: B.median(v) for k, v in results.items()}
    base, base_fsync = med[SAVE], med[SAVE_FSYNC]
    series = dict(results)
    if worst:
        series["posthoc-ema snapshot() + next update() wait"] = worst
    if written:
        series["posthoc-ema snapshot() until written"] = written
    order = sorted(series, key=lambda name: (not name.startswith("posthoc-ema"), "async_write" in name))
    rows: list[list[object]] = []
    for name in order:
        m = B.median(series[name])
        rows.append([name, B.fmt_s(m), B.fmt_s(min(series[name])),
                     B.fmt_x(B.ratio(m, base)), B.fmt_x(B.ratio(m, base_fsync))])
    if ours is None:
        rows.append(["posthoc-ema", "skipped", "", "", ""])
    B.print_table(f"snapshot of {B.fmt_mb(n_bytes)} x {len(SIGMA_RELS)} sigma_rels (float32), {device}, "
                  f"median of {repeats}",
                  ["case", "median", "min", "x save_file", "x save_file+fsync"], rows)
    stall = med.get("posthoc-ema snapshot() stall")
    print(f"  stall / save_file x2 = {B.fmt_x(B.ratio(stall, base))} (target <= 0.25); with the next update's "
          f"wait, no training work between: {B.fmt_x(B.ratio(B.median(worst) if worst else None, base))}")
    if close_s is not None:
        print(f"  close() after the last snapshot: {B.fmt_s(close_s)}")


if __name__ == "__main__":
    main()
