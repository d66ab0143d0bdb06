"""Parallel synthesis speed: ``torchrun --nproc-per-node 2 -m posthoc_cli synthesize`` against one rank.

Setup: a real ``nn.Module`` of ``--model-mb`` MB (float32 Linear(1024, 1024) layers) recorded by a
``Recorder(sigma_rels=(0.05, 0.10))`` with random parameter changes: 2 x ``--snapshots``
snapshots (2 x 20 x 64 MB = 2.56 GB by default).

Measured, interleaved, medians of ``--repeats`` rounds after a warm-up round (inputs in page
cache; outputs deleted and ``os.sync()`` between runs, outside the timing):

- one process: ``posthoc-ema synthesize ckpts -s 0.15 --json`` (its ``seconds``: the pass alone);
- torchrun with 1 and 2 ranks, same command (rank 0's ``seconds``: from its start to the commit
  after every rank finished; process start-up and the rendezvous are outside);
- the bound: reading the inputs once from page cache with 1 process, and with 2 processes
  each reading half of every file at once (memory bandwidth shared by the two cores).

Prints the speed-up of 2 ranks over 1 and the read-once speed-up (what memory allows).

    python scripts/bench_distributed_synth.py [--quick] [--repeats 5] [--model-mb 64] [--snapshots 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import _bench as B
import torch
from torch import nn

WIDTH = 1024
TARGET = "0.15"


def build(folder: Path, layers: int, n: int) -> None:
    from posthoc_cli import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    params = list(model.parameters())
    noise = [torch.randn_like(p) * 1e-2 for p in params]
    with torch.no_grad(), Recorder(model, folder, sigma_rels=(0.05, 0.10), snapshot_every=100) as rec:
        for i in range(1, n + 1):
            for p, z in zip(params, noise):
                p.add_(z, alpha=float(torch.rand(()) * 2 - 1))
            rec.update(step=i * 100)
    os.sync()


def _read_part(job: tuple[list[str], int, int]) -> int:
    files, part, parts = job
    buf = bytearray(16 * B.MB)
    view, total = memoryview(buf), 0
    for name in files:
        size = os.path.getsize(name)
        lo, hi = part * size // parts, (part + 1) * size // parts
        with open(name, "rb", buffering=0) as f:
            f.seek(lo)
            while lo < hi and (got := f.readinto(view[: min(len(buf), hi - lo)])):
                lo += got
                total += got
    return total


def read_once(pool: Pool | None, files: list[str], parts: int) -> float:
    t0 = time.perf_counter()
    if pool is None:
        _read_part((files, 0, 1))
    else:
        pool.map(_read_part, [(files, k, parts) for k in range(parts)])
    return time.perf_counter() - t0


def synthesize(ckpts: Path, out: Path, ranks: int | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    args = ["synthesize", str(ckpts), "-s", TARGET, "--out", str(out / "ema.safetensors"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks is None:
        command = [str(Path(sys.executable).with_name("posthoc-ema")), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "posthoc_cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode:
        raise SystemExit(result.stderr)
    return float(json.loads(result.stdout)["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-mb", type=int, default=64)
    parser.add_argument("--snapshots", type=int, default=20, help="per sigma_rel")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="8 MB model, 5 snapshots, 3 repeats")
    args = parser.parse_args()
    if args.quick:
        args.model_mb, args.snapshots, args.repeats = 8, 5, 3
    layers = max(1, args.model_mb * B.MB // (WIDTH * WIDTH * 4 + WIDTH * 4))
    with tempfile.TemporaryDirectory(prefix="bench-dist-synth-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        ckpts = root / "ckpts"
        t0 = time.perf_counter()
        build(ckpts, layers, args.snapshots)
        files = sorted(str(p) for p in ckpts.glob("*.safetensors"))
        total = sum(os.path.getsize(f) for f in files)
        print(f"{len(files)} snapshots, {total / 1e9:.2f} GB, built in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs")
        with Pool(2) as pool:
            cases = {
                "read once, 1 process": lambda: read_once(None, files, 1),
                "read once, 2 processes": lambda: read_once(pool, files, 2),
                "synthesize, one process": lambda: synthesize(ckpts, root / "o0", None),
                "torchrun, 1 rank": lambda: synthesize(ckpts, root / "o1", 1),
                "torchrun, 2 ranks": lambda: synthesize(ckpts, root / "o2", 2),
            }
            results = B.run_interleaved(cases, args.repeats)
    medians = {name: sorted(v)[len(v) // 2] for name, v in results.items()}
    for name, m in medians.items():
        runs = ", ".join(f"{x:.3f}" for x in results[name])
        print(f"  {name:26s} {m:7.3f} s  ({runs})")
    speedup = medians["torchrun, 1 rank"] / medians["torchrun, 2 ranks"]
    bound = medians["read once, 1 process"] / medians["read once, 2 processes"]
    print(f"speed-up of 2 ranks over 1: {speedup:.2f}x (target >= 1.5x unless memory bandwidth caps it)")
    print(f"memory bound: reading the cached inputs with 2 processes is {bound:.2f}x faster than with 1")
    print(f"torchrun 1 rank / one process: {medians['torchrun, 1 rank'] / medians['synthesize, one process']:.2f}x")


if __name__ == "__main__":
    main()
