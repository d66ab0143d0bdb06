"""Synthesis speed and memory: posthoc-ema ``synthesize`` against reading the bytes once and ema-pytorch.

Install the peer (benchmark only, never a project dependency; --no-deps keeps pip from
replacing the installed torch):

    pip install --no-deps ema-pytorch pytorch-posthoc-ema
    pip install pillow          # pytorch-posthoc-ema imports PIL (not used by this script)

Setup: a real ``nn.Module`` of ``--model-mb`` MB (float32 Linear(1024, 1024) layers, so the
largest tensor is 4 MB) is trained with random parameter changes between steps while a
``Recorder(sigma_rels=(0.05, 0.10))`` records 2 x 2N snapshots (N = ``--snapshots``, 20 by
default: one snapshot every 100 steps through ``update(step=...)``), and while ema-pytorch's
``PostHocEMA`` (same sigma_rels, float32, checkpoint every update) writes its own N
checkpoints per sigma_rel. The first N snapshots per sigma_rel are hard-linked into a
folder of their own, so both libraries face the same job: 2 sigma_rels x N snapshots.

Measured (medians over ``--repeats`` interleaved rounds after a warm-up round; before
each case, outside its timing, its input files are read once so they are in page cache,
and ``os.sync()`` flushes earlier writes):

- read once: plain ``readinto`` of every snapshot file of the N-folder, start to end;
- posthoc-ema ``synthesize(dir, [0.15], out=FILE)`` and with 8 sigma_rels in one call
  (``out=FOLDER``); outputs are deleted between runs;
- ema-pytorch ``PostHocEMA.synthesize_ema_model(sigma_rel=0.15)`` on its own ``*.pt`` files
  (it returns a model in memory and writes nothing);
- with ``--write-ref``, writing 8 model-sized files side by side, then fsync: what the 8
  outputs alone cost the disk, a bound for the 8-target case on a slow disk.

Peak RSS growth is measured in a fresh subprocess per run: the peak RSS (VmHWM, reset
with /proc/self/clear_refs after the imports and setup) minus the RSS just before the
call, for posthoc-ema with N and 2N snapshots per sigma_rel, 1 and 8 targets, and for
ema-pytorch with N (baseline includes its required ``PostHocEMA`` instance). posthoc-ema
figures are the median of ``--rss-runs`` processes; ema-pytorch's is one run.

Targets (issue 4): synthesize <= 1.2x read once; 8 targets <= 1.5x one target; RSS growth
the same for N and 2N snapshots and <= 1/4 of ema-pytorch's; time <= 1/2 of ema-pytorch's.

    python scripts/bench_synthesize.py [--quick] [--repeats N] [--model-mb 64] [--snapshots 20] [--write-ref]
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench as B
import torch
from torch import nn

SIGMA_RELS = (0.05, 0.10)
TARGET = 0.15
TARGETS_8 = (0.06, 0.08, 0.10, 0.12, 0.15, 0.18, 0.21, 0.25)
# --mixed: the 8-target case with classical, library and window targets beside power ones (issue 11)
MIXED_8 = (0.08, 0.15, "beta=0.999", "beta=0.9995,every=4", "window=500", "litema:decay=0.999",
           "diffusers:decay=0.999,use_ema_warmup=true", "ema-pytorch:beta=0.999")
WIDTH = 1024  # Linear(1024, 1024): the largest tensor is 4 MB
STEPS_PER_SNAPSHOT = 100
CHUNK = 16 * B.MB


def make_model(layers: int) -> nn.Module:
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(layers)))


def snapshot_t(path: Path) -> int:
    """t of one of our snapshots, from its header (never from its name)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return int(json.loads(meta["posthoc_ema"])["t"])


# --- building the checkpoints ------------------------------------------------------------


def build(tmp: Path, layers: int, n: int, ours: Any, ep: Any) -> dict[str, Any]:
    """Record 2n snapshots per sigma_rel with our Recorder and n checkpoints with ema-pytorch."""
    torch.manual_seed(0)
    model = make_model(layers)
    params = [p for p in model.parameters()]
    noise = [torch.randn_like(p) * 1e-2 for p in params]  # drawn once; scaled differently per step
    scales = torch.rand(2 * n + 1) * 2 - 1
    built: dict[str, Any] = {"model": model}

    rec = None
    if ours is not None:
        built["ours_2n"] = tmp / "ours-2n"
        rec = ours.Recorder(model, built["ours_2n"], sigma_rels=SIGMA_RELS, snapshot_every=STEPS_PER_SNAPSHOT)
    pema = None
    if ep is not None:
        built["ema_n"] = tmp / "ema-pytorch-n"
        pema = ep.PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=1, checkpoint_every_num_steps=1,
                             checkpoint_folder=str(built["ema_n"]), checkpoint_dtype=torch.float32)
        built["pema"] = pema

    with torch.no_grad():
        for i in range(1, 2 * n + 1):
            # One recorded update stands for STEPS_PER_SNAPSHOT optimizer steps (update(step=t) is
            # exact for irregular calls); ema-pytorch counts calls, so its t is simply i.
            for p, z in zip(params, noise):
                p.add_(z, alpha=float(scales[i]))
            if rec is not None:
                rec.update(step=i * STEPS_PER_SNAPSHOT)
            if pema is not None and i <= n:
                pema.update()
    if rec is not None:
        rec.close()
        # The job both libraries face: the first n snapshots per sigma_rel (hard links, no copy).
        built["ours_n"] = tmp / "ours-n"
        built["ours_n"].mkdir()
        for f in sorted(built["ours_2n"].glob("*.safetensors")):
            if snapshot_t(f) <= n * STEPS_PER_SNAPSHOT:
                os.link(f, built["ours_n"] / f.name)
    os.sync()
    return built


# --- the cases ----------------------------------------------------------------------------------


def read_once(files: list[Path], buf: bytearray) -> int:
    view = memoryview(buf)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while got := fh.readinto(view):
                total += got
    return total


def write_ref(folder: Path, count: int, n_bytes: int, buf: bytearray) -> float:
    """Seconds to write ``count`` files of ``n_bytes`` each, then fsync them all (then deleted).

    What the 8 outputs alone cost the disk, written as synthesis writes them: all
    files grow together (in ``buf``-sized pieces) and each is fsynced at the end.
    """
    folder.mkdir(exist_ok=True)
    os.sync()
    t0 = B.now()
    files = [open(folder / f"floor-{i}.bin", "wb", buffering=0) for i in range(count)]
    left = n_bytes
    while left > 0:
        piece = memoryview(buf)[: min(left, len(buf))]
        for fh in files:
            fh.write(piece)
        left -= len(piece)
    for fh in files:
        os.fsync(fh.fileno())
        fh.close()
    elapsed = B.now() - t0
    shutil.rmtree(folder)
    return elapsed


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def any_quality(posthoc_cli: Any) -> dict[str, bool]:
    """``allow_poor=True`` where the version timed refuses poor targets (0.25 is one here): speed is measured, not fit."""
    return {"allow_poor": True} if "allow_poor" in inspect.signature(posthoc_cli.synthesize).parameters else {}


# --- peak RSS in a fresh process ----------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    """Run one synthesis in this (fresh) process and print one JSON line about it."""
    sigma_rels = [float(s) for s in args.sigma_rels.split(",")]
    if args.child == "ours":
        import posthoc_cli

        def run() -> object:
            return posthoc_cli.synthesize(args.ckpt, sigma_rels, out=args.out, force=True, **any_quality(posthoc_cli))
    else:
        import ema_pytorch

        model = make_model(args.layers)
        pema = ema_pytorch.PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=1,
                                      checkpoint_every_num_steps="manual", checkpoint_folder=args.ckpt,
                                      checkpoint_dtype=torch.float32)

        def run() -> object:
            return pema.synthesize_ema_model(sigma_rel=sigma_rels[0])
    gc.collect()
    base = B.rss_bytes()
    reset = B.reset_peak_rss()
    peak_before = B.peak_rss_bytes()
    t0 = B.now()
    result = run()
    seconds = B.now() - t0
    peak = B.peak_rss_bytes()
    del result
    print(json.dumps({"base": base, "peak": peak, "growth": peak - base, "seconds": seconds,
                      "reset": reset, "peak_before": peak_before}))


def measure_rss(argv: list[str]) -> dict[str, Any] | str:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"failed: {tail[:100]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    p = B.parser(__doc__.split("\n\n")[0], default_repeats=5, quick_repeats=5)
    p.add_argument("--model-mb", type=int, default=None, help="model size in MB (default 64; 32 with --quick)")
    p.add_argument("--snapshots", type=int, default=None,
                   help="N snapshots per sigma_rel for the timed job (default 20; 8 with --quick); "
                        "the RSS check also uses 2N")
    p.add_argument("--dir", default=None, help="parent of the temporary folder (default: the system's)")
    p.add_argument("--mixed", action="store_true",
                   help="8 mixed targets (power, beta, window, library forms) instead of 8 sigma_rels in the timed case")
    p.add_argument("--write-ref", action="store_true",
                   help="also time writing 8 model-sized files with fsync (what the 8 outputs cost the disk)")
    p.add_argument("--rss-runs", type=int, default=None,
                   help="fresh processes per peak-RSS figure, median reported (default 3; 1 with --quick)")
    p.add_argument("--child", choices=["ours", "ema"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--sigma-rels", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    repeats = B.repeats_of(args)
    model_mb = args.model_mb or (32 if args.quick else 64)
    layers = max(1, model_mb * B.MB // (WIDTH * WIDTH * 4))
    n = args.snapshots or (8 if args.quick else 20)
    largest = WIDTH * WIDTH * 4  # one float32 weight matrix
    rss_runs = max(1, args.rss_runs or (1 if args.quick else 3))

    ours, ours_v = B.load_ours()
    ep, ep_v = B.load_peer("ema_pytorch", "ema-pytorch")
    B.print_environment({"posthoc-ema": ours_v, "ema-pytorch": ep_v})

    with tempfile.TemporaryDirectory(prefix="posthoc-bench-synth-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        t0 = B.now()
        built = build(tmp, layers, n, ours, ep)
        model_bytes = sum(t.numel() * t.element_size() for t in built["model"].state_dict().values())
        recorded = [f"{2 * n} (posthoc-ema)"] * (ours is not None) + [f"{n} (ema-pytorch)"] * (ep is not None)
        print(f"setup: {layers} x Linear({WIDTH}, {WIDTH}) = {B.fmt_mb(model_bytes)}, largest tensor "
              f"{B.fmt_mb(largest)}; recorded {' and '.join(recorded) or 'no'} snapshots per sigma_rel "
              f"in {B.now() - t0:.1f} s")

        # The bytes of the timed job: our N-folder, or ema-pytorch's files while ours is missing.
        job_dir = built.get("ours_n") or built.get("ema_n")
        if job_dir is None:
            raise SystemExit("neither posthoc-ema nor ema-pytorch is available: nothing to measure")
        job_files = sorted(f for f in job_dir.iterdir() if f.is_file())
        job_bytes = sum(f.stat().st_size for f in job_files)
        buf = bytearray(CHUNK)
        read_label = "read once" + ("" if "ours_n" in built else " (ema-pytorch files)")

        def settled(fn: Callable[[], object], inputs: list[Path],
                    before: Callable[[], object] | None = None) -> B.Case:
            def case() -> float:
                if before is not None:
                    before()
                # Read the inputs just before, untimed: this VM may evict page cache that sat
                # idle for a few seconds, and the job is defined on cached files.
                read_once(inputs, buf)
                os.sync()
                t0 = B.now()
                fn()
                return B.now() - t0
            return case

        cases: dict[str, B.Case] = {read_label: settled(lambda: read_once(job_files, buf), job_files)}
        if ours is not None:
            out1, out8 = tmp / "out-1.safetensors", tmp / "out-8"
            cases["posthoc-ema, 1 target"] = settled(
                lambda: ours.synthesize(built["ours_n"], [TARGET], out=out1, **any_quality(ours)), job_files, lambda: clear(out1))
            cases["posthoc-ema, 8 targets"] = settled(
                lambda: ours.synthesize(built["ours_n"], list(MIXED_8 if args.mixed else TARGETS_8), out=out8, **any_quality(ours)),
                job_files, lambda: clear(out8))
        if ep is not None:
            pema = built["pema"]
            ema_files = sorted(built["ema_n"].glob("*.pt"))
            cases["ema-pytorch, 1 target"] = settled(lambda: pema.synthesize_ema_model(sigma_rel=TARGET), ema_files)
        if args.write_ref:
            cases[f"ref: write {len(TARGETS_8)} model-sized files + fsync"] = (
                lambda: write_ref(tmp / "floor", len(TARGETS_8), model_bytes, buf))

        results = B.run_interleaved(cases, repeats, warmup=1)
        med = {k: B.median(v) for k, v in results.items()}
        for path in (tmp / "out-1.safetensors", tmp / "out-8"):
            clear(path)

        # Peak RSS, each in a fresh process.
        rss: dict[str, dict[str, Any] | str] = {}
        runs: list[tuple[str, int, list[float], Path, list[str]]] = []
        if ours is not None:
            for label, folder, count in (("posthoc-ema", built["ours_n"], n), ("posthoc-ema", built["ours_2n"], 2 * n)):
                for targets in ([TARGET], list(TARGETS_8)):
                    out = tmp / ("rss-out.safetensors" if len(targets) == 1 else "rss-out")
                    argv = ["--child", "ours", "--ckpt", str(folder), "--out", str(out),
                            "--sigma-rels", ",".join(map(repr, targets))]
                    runs.append((label, count, targets, folder, argv))
        if ep is not None:
            argv = ["--child", "ema", "--ckpt", str(built["ema_n"]), "--layers", str(layers),
                    "--sigma-rels", repr(TARGET)]
            runs.append(("ema-pytorch", n, [TARGET], built["ema_n"], argv))
        for label, count, targets, folder, argv in runs:
            key = f"{label}, {count} snapshots, {len(targets)} target(s)"
            samples: list[dict[str, Any]] = []
            # ema-pytorch's growth is large and steady (and each of its runs slow): one run.
            for _ in range(rss_runs if label == "posthoc-ema" else 1):
                read_once(sorted(f for f in folder.iterdir() if f.is_file()), buf)  # cached, as in the timings
                r = measure_rss(argv)
                if isinstance(r, str):
                    rss[key] = r
                    break
                samples.append(r)
            else:
                # The run with the median growth stands for the configuration; keep the range too.
                samples.sort(key=lambda r: r["growth"])
                rss[key] = dict(samples[len(samples) // 2], low=samples[0]["growth"], high=samples[-1]["growth"])
            for path in (tmp / "rss-out.safetensors", tmp / "rss-out"):
                clear(path)

    # --- report ---
    read_s = med[read_label]
    one = med.get("posthoc-ema, 1 target")
    eight = med.get("posthoc-ema, 8 targets")
    ema_s = med.get("ema-pytorch, 1 target")
    write_s = next((v for k, v in med.items() if k.startswith("ref: write")), None)
    rows: list[list[object]] = []
    for name in cases:
        rows.append([name, B.fmt_s(med[name]), B.fmt_s(min(results[name])), B.fmt_x(B.ratio(med[name], read_s)),
                     f"{job_bytes / med[name] / 1e9:.2f} GB/s" if name.startswith(("read", "posthoc")) else ""])
    if ours is None:
        rows.append(["posthoc-ema", "skipped", "", "", ""])
    if ep is None:
        rows.append(["ema-pytorch", "skipped", "", "", ""])
    B.print_table(f"synthesize from {len(SIGMA_RELS)} sigma_rels x {n} snapshots "
                  f"({B.fmt_mb(job_bytes)} of inputs, in page cache), median of {repeats}",
                  ["case", "median", "min", "x read once", "input rate"], rows)

    rss_rows: list[list[object]] = []
    growth: dict[str, float] = {}
    for key, r in rss.items():
        if isinstance(r, str):
            rss_rows.append([key, r, "", "", "", ""])
            continue
        growth[key] = r["growth"]
        note = "" if r["reset"] else " (peak not reset)"
        spread = f"{r['low'] / B.MB:.1f}-{r['high'] / B.MB:.1f} MB" if r["low"] != r["high"] else ""
        rss_rows.append([key, B.fmt_mb(r["growth"]) + note, spread, B.fmt_x(B.ratio(r["growth"], largest)),
                         B.fmt_mb(r["base"]), B.fmt_s(r["seconds"])])
    if rss_rows:
        B.print_table(f"peak RSS growth during one call, fresh process each (posthoc-ema: median of {rss_runs}), "
                      f"largest tensor {B.fmt_mb(largest)}",
                      ["run", "peak RSS growth", "range", "/ largest tensor", "RSS before", "time"], rss_rows)

    def g(count: int, k: int) -> float | None:
        return growth.get(f"posthoc-ema, {count} snapshots, {k} target(s)")

    ema_g = growth.get(f"ema-pytorch, {n} snapshots, 1 target(s)")
    print(f"  posthoc-ema 1 target / read once = {B.fmt_x(B.ratio(one, read_s))} (target <= 1.2)")
    print(f"  posthoc-ema 8 targets / 1 target = {B.fmt_x(B.ratio(eight, one))} (target <= 1.5)")
    if write_s is not None:
        print(f"  posthoc-ema 8 targets / writing the 8 outputs alone = {B.fmt_x(B.ratio(eight, write_s))} "
              f"(the disk's share: below 1 means the writes overlap the computation)")
    print(f"  RSS growth {2 * n} / {n} snapshots = {B.fmt_x(B.ratio(g(2 * n, 1), g(n, 1)))} (1 target), "
          f"{B.fmt_x(B.ratio(g(2 * n, 8), g(n, 8)))} (8 targets) (target: ~1, independent of count)")
    print(f"  posthoc-ema / ema-pytorch: time {B.fmt_x(B.ratio(one, ema_s))} (target <= 0.5), "
          f"peak RSS growth {B.fmt_x(B.ratio(g(n, 1), ema_g))} (target <= 0.25)")


if __name__ == "__main__":
    main()
