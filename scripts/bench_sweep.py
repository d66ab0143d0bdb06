"""What a sweep costs beyond the evaluations: its overhead per candidate, and what --jobs buys.

Setup: a real ``nn.Module`` of ``--model-mb`` MB (float32 Linear(1024, 1024) layers) recorded
with ``Recorder(sigma_rels=(0.05, 0.10))``, ``--snapshots`` snapshots per sigma_rel.

1. Overhead (target: a sweep's own cost per candidate <= that of ``synthesize`` of the one
   target + 0.1 s). Interleaved rounds, medians:
   - ``synthesize``: ``posthoc_cli.synthesize(dir, s, out=FILE)`` for each of the K candidates
     (the file deleted after each), per candidate;
   - ``sweep``: the sweep of the same K targets through the CLI's own code (space, results file,
     claims, a synthesized file per candidate, the evaluation command run by /bin/sh) with a
     no-op evaluator (``true {weights}; echo 0``), per candidate, a fresh results file each round.
2. Parallel (target: 8 candidates with an evaluator that sleeps 2 s finish with --jobs 2 in
   <= 0.6x the time of --jobs 1): the installed ``posthoc-ema sweep`` entry point, start-up
   included, on a small model, alternating --jobs 1 and --jobs 2.

    python scripts/bench_sweep.py [--quick] [--repeats N] [--model-mb 64] [--snapshots 20]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench as B
import torch
from torch import nn

CANDIDATES = (0.06, 0.07, 0.08, 0.09, 0.11, 0.12, 0.13, 0.14)
WIDTH = 1024


def record(folder: Path, layers: int, snapshots: int) -> None:
    from posthoc_cli import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    with Recorder(model, folder, sigma_rels=(0.05, 0.10), snapshot_every=100) as rec, torch.no_grad():
        for _ in range(100 * snapshots):
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=1e-3) if rec.t % 25 == 0 else None
            rec.update()


def overhead(folder: Path, work: Path, repeats: int) -> tuple[float, float]:
    from posthoc_cli import synthesize
    from posthoc_cli.choice.evaluators import CommandEvaluator
    from posthoc_cli.choice.space import build
    from posthoc_cli.choice.sweep import run
    from posthoc_cli.ema.targets import parse_targets

    def by_hand() -> float:
        started = time.perf_counter()
        for s in CANDIDATES:
            (path,) = synthesize(folder, s, out=work / "one.safetensors")
            path.unlink()
        return time.perf_counter() - started

    rounds = iter(range(10**6))

    def swept() -> float:
        started = time.perf_counter()
        results = work / f"round-{next(rounds)}.jsonl"
        space = build(folder, parse_targets(list(CANDIDATES)), refine=0)
        evaluator = CommandEvaluator(space.folder, "true {weights}; echo 0", work / "candidates")
        result = run(space, results, evaluator)
        assert all(row.status == "ok" for row in result.rows), result.rows
        return time.perf_counter() - started

    times = B.run_interleaved({"synthesize": by_hand, "sweep": swept}, repeats)
    k = len(CANDIDATES)
    return B.median(times["synthesize"]) / k, B.median(times["sweep"]) / k


def parallel(folder: Path, work: Path, repeats: int) -> tuple[float, float]:
    exe = Path(sys.executable).with_name("posthoc-ema")
    targets = [a for s in CANDIDATES for a in ("--sigma-rel", str(s))]
    seen: dict[int, list[float]] = {1: [], 2: []}
    for r in range(repeats):
        for jobs in (1, 2):
            started = time.perf_counter()
            subprocess.run(
                [str(exe), "sweep", str(folder), "--eval", "sleep 2; echo 1 # {weights}", *targets, "--jobs", str(jobs),
                 "--results", str(work / f"parallel-{r}-{jobs}.jsonl"), "--json"],
                check=True, capture_output=True,
            )
            seen[jobs].append(time.perf_counter() - started)
    return B.median(seen[1]), B.median(seen[2])


def main() -> None:
    parser = B.parser(__doc__ or "", default_repeats=5, quick_repeats=3)
    parser.add_argument("--model-mb", type=int, default=64)
    parser.add_argument("--snapshots", type=int, default=20)
    args = parser.parse_args()
    repeats = B.repeats_of(args)
    layers = max(1, args.model_mb // 4)
    B.print_environment({"model": f"{layers} x Linear(1024, 1024) = {layers * 4} MB float32",
                         "snapshots": f"{args.snapshots} per sigma_rel", "candidates": str(len(CANDIDATES))})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        record(root / "ckpts", layers, args.snapshots)
        record(root / "small", 1, args.snapshots)
        work = root / "work"
        work.mkdir()
        by_hand, swept = overhead(root / "ckpts", work, repeats)
        B.print_table(
            f"Overhead per candidate (median of {repeats}; target: sweep <= synthesize + 0.1 s)",
            ["synthesize", "sweep (no-op evaluator)", "overhead"],
            [[B.fmt_s(by_hand), B.fmt_s(swept), B.fmt_s(swept - by_hand)]],
        )
        shutil.rmtree(work)
        work.mkdir()
        one, two = parallel(root / "small", work, max(2, repeats // 2))
        B.print_table(
            "8 candidates, an evaluator that sleeps 2 s (CLI, start-up included; target: jobs 2 <= 0.6x jobs 1)",
            ["--jobs 1", "--jobs 2", "ratio"],
            [[B.fmt_s(one), B.fmt_s(two), B.fmt_x(two / one)]],
        )


if __name__ == "__main__":
    main()
