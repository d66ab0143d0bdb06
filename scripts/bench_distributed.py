"""Recording a sharded model: FSDP2 on 2 CPU ranks (gloo), per rank.

The update half (issue 10), in :func:`bench_fsdp2_update`:

- ``update()`` of a Recorder (2 sigma_rels) against the floor: two bare
  ``torch._foreach_lerp_`` calls over the same local shards (medians of
  ``--repeats`` interleaved blocks; target <= 1.10x), for the large model
  (``--layers`` x ``--width``) and for 300 small tensors (150 Linear layers of
  width 64: what the per-tensor cost of an update shows most); with
  ``--baseline PATH`` also the Recorder of the checkout at PATH on the same
  model, in the same rounds (an A/B, e.g. against the previous commit);
- collectives per ``update()`` and per snapshot, counted by a dispatch mode that
  sees every c10d op and by wrappers of torch.distributed's functions (target 0;
  the forward/backward pass is counted too, as a control that the counter works);
- bytes written per rank per snapshot against its share of the model (float32
  local shards, both EMAs; target within 1 %).

    python scripts/bench_distributed.py [--quick] [--repeats N] [--baseline PATH] [--only large|small]

The synthesis half, in :func:`bench_parallel_synthesis`: a real ``nn.Module`` of
``--model-mb`` MB (float32 Linear(1024, 1024) layers) recorded by a Recorder with
2 sigma_rels, ``--snapshots`` each (2 x 20 x 64 MB = 2.56 GB). Interleaved, medians of
``--repeats`` after a warm-up round, inputs in page cache, outputs deleted and
``os.sync()`` between runs outside the timing:

- ``posthoc-ema synthesize ckpts -s 0.12 --json`` in one process, and under torchrun with
  1 and 2 ranks (the ``seconds`` it reports: the pass from planning done to the commit
  after every rank finished; process start-up and the rendezvous are outside);
- the bound: reading the inputs once from page cache with 1 process, and with 2
  processes each reading half of every file at once.

It prints the speed-up of 2 ranks over 1 (target >= 1.5x unless memory bandwidth caps
it) and what reading alone gains from the second process.

    python scripts/bench_distributed.py --half synthesis [--quick] [--repeats N] [--model-mb 64] [--snapshots 20]
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import _bench as B
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# the tests' collective counter: the bench reports the same count that tests/test_distributed.py asserts is 0
sys.path.insert(0, str(B.REPO_ROOT / "tests"))
from dist_worker import Collectives

SIGMA_RELS = (0.05, 0.10)


class Tower(nn.Module):
    """Linear layers of one width: FSDP2 shards each weight along its rows (every other one has an odd number of rows: uneven over 2 ranks)."""

    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width + 1) if i % 2 == 0 else nn.Linear(width + 1, width) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def _fsdp2_rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    """One rank of :func:`bench_fsdp2_update`; writes its figures as JSON to ``out``-RANK.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from posthoc_cli import Recorder

    torch.manual_seed(0)
    model = Tower(args["layers"], args["width"])
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    x = torch.randn(4, args["width"])
    model(x).sum().backward()  # FSDP2's lazy initialisation, as in training
    model.zero_grad(set_to_none=True)
    folder = Path(args["folder"])
    counter = Collectives()
    rec = Recorder(model, folder, sigma_rels=SIGMA_RELS, snapshot_every=10**12)
    local = [p._local_tensor for p in model.parameters()]  # the same local shards the Recorder reads
    floor_emas = [[t.clone() for t in local] for _ in SIGMA_RELS]

    def floor() -> None:
        for ema in floor_emas:
            torch._foreach_lerp_(ema, local, 0.01)

    rec.update()  # the first update is a copy
    cases = {"floor": floor, "update": rec.update}
    if args["baseline"]:
        old = B.load_baseline(args["baseline"]).Recorder(model, Path(args["folder"] + "-baseline"), sigma_rels=SIGMA_RELS,
                                                         snapshot_every=10**12)
        old.update()
        cases["baseline"] = old.update

    def block(fn) -> B.Case:  # type: ignore[no-untyped-def]
        def case() -> float:
            dist.barrier()  # both ranks time the same moment (outside the timed block)
            t0 = B.now()
            for _ in range(args["steps"]):
                fn()
            return (B.now() - t0) / args["steps"]

        return case

    times = B.run_interleaved({k: block(fn) for k, fn in cases.items()}, args["repeats"], warmup=1)

    # Collectives: the control (a training step) and the claim (updates and a snapshot).
    before = counter.count
    with counter.mode():
        model(x).sum().backward()
    in_step = counter.count - before
    model.zero_grad(set_to_none=True)
    before = counter.count
    with counter.mode():
        for _ in range(10):
            rec.update()
    in_updates = counter.count - before
    before = counter.count
    with counter.mode():
        rec.snapshot()
        rec.flush()
    in_snapshot = counter.count - before
    rec.close()
    if args["baseline"]:
        old.close()

    written = sum(p.stat().st_size for p in folder.glob(f"*/rank-{rank:05d}.safetensors"))
    share = sum(t.numel() for t in local) * 4 * len(SIGMA_RELS)
    Path(f"{out}-{rank}.json").write_text(json.dumps({
        **{k: B.median(v) for k, v in times.items()},
        "in_step": in_step, "in_updates": in_updates / 10, "in_snapshot": in_snapshot,
        "written": written, "share": share,
    }))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_fsdp2_update(layers: int, width: int, steps: int, repeats: int, world: int = 2,
                       baseline: str | None = None) -> list[dict]:
    """Run :func:`_fsdp2_rank` on ``world`` CPU ranks; the per-rank figures."""
    with tempfile.TemporaryDirectory(prefix="posthoc-bench-dist-") as tmp:
        out = str(Path(tmp) / "figures")
        args = {"layers": layers, "width": width, "steps": steps, "repeats": repeats, "folder": str(Path(tmp) / "ckpts"),
                "baseline": baseline}
        mp.spawn(_fsdp2_rank, args=(world, _free_port(), args, out), nprocs=world, join=True)
        return [json.loads(Path(f"{out}-{r}.json").read_text()) for r in range(world)]


def print_fsdp2_update(figures: list[dict], layers: int, width: int, steps: int, repeats: int) -> None:
    n_bytes = sum(f["share"] for f in figures) // len(SIGMA_RELS)
    ab = "baseline" in figures[0]
    rows = []
    for rank, f in enumerate(figures):
        rows.append([
            rank, B.fmt_s(f["floor"]), B.fmt_s(f["update"]), B.fmt_x(B.ratio(f["update"], f["floor"])),
            *([B.fmt_x(B.ratio(f["baseline"], f["floor"]))] if ab else []),
            f"{f['in_step']}", f"{f['in_updates']:g}", f"{f['in_snapshot']}",
            B.fmt_mb(f["written"]), B.fmt_mb(f["share"]), f"{100 * (f['written'] / f['share'] - 1):+.2f} %",
        ])
    B.print_table(
        f"FSDP2 on {len(figures)} CPU ranks (gloo): {layers} Linear layers of width {width} = {B.fmt_mb(n_bytes)} float32, "
        f"= {2 * layers} tensors, 2 EMAs, {steps} updates/block, median of {repeats}",
        ["rank", "floor/update", "update()", "x floor", *(["baseline x floor"] if ab else []), "coll./train step", "coll./update", "coll./snapshot",
         "written/snapshot", "share (2 EMAs)", "written vs share"],
        rows,
    )
    worst = max(B.ratio(f["update"], f["floor"]) or 0 for f in figures)
    if ab:
        print(f"  baseline: worst update()/floor = {B.fmt_x(max(B.ratio(f['baseline'], f['floor']) or 0 for f in figures))}; "
              f"update()/baseline per rank = {', '.join(B.fmt_x(B.ratio(f['update'], f['baseline'])) for f in figures)}")
    zero = all(f["in_updates"] == 0 and f["in_snapshot"] == 0 for f in figures)
    print(f"  worst update()/floor = {B.fmt_x(worst)} (target <= 1.10); collectives per update and snapshot: "
          f"{'0' if zero else 'NOT 0'} (target 0); bytes written within {max(abs(f['written'] / f['share'] - 1) for f in figures) * 100:.2f} % of the share (target 1 %)")


# -- the synthesis half ---------------------------------------------------------------------

SYNTH_WIDTH = 1024
SYNTH_TARGET = "0.12"  # within what the recorded 0.05 and 0.10 reproduce (poorer targets are refused)


def _synth_build(folder: Path, layers: int, n: int) -> None:
    from posthoc_cli import Recorder

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(SYNTH_WIDTH, SYNTH_WIDTH) for _ in range(layers)))
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


def _read_once(pool: Pool | None, files: list[str], parts: int) -> float:
    t0 = time.perf_counter()
    if pool is None:
        _read_part((files, 0, 1))
    else:
        pool.map(_read_part, [(files, k, parts) for k in range(parts)])
    return time.perf_counter() - t0


def _synthesize(ckpts: Path, out: Path, ranks: int | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    args = ["synthesize", str(ckpts), "-s", SYNTH_TARGET, "--out", str(out / "ema.safetensors"), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks is None:
        command = [str(Path(sys.executable).with_name("posthoc-ema")), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "posthoc_cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode:
        raise SystemExit(result.stderr)
    return float(json.loads(result.stdout)["synthesis_seconds"])


def bench_parallel_synthesis(model_mb: int, snapshots: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each case (see the synthesis half in the docstring), interleaved."""
    layers = max(1, model_mb * B.MB // (SYNTH_WIDTH * SYNTH_WIDTH * 4 + SYNTH_WIDTH * 4))
    with tempfile.TemporaryDirectory(prefix="bench-dist-synth-", dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp)
        ckpts = root / "ckpts"
        t0 = time.perf_counter()
        _synth_build(ckpts, layers, snapshots)
        files = sorted(str(p) for p in ckpts.glob("*.safetensors"))
        total = sum(os.path.getsize(f) for f in files)
        print(f"{len(files)} snapshots, {total / 1e9:.2f} GB, built in {time.perf_counter() - t0:.1f} s")
        with Pool(2) as pool:
            cases = {
                "read once, 1 process": lambda: _read_once(None, files, 1),
                "read once, 2 processes": lambda: _read_once(pool, files, 2),
                "synthesize, one process": lambda: _synthesize(ckpts, root / "o0", None),
                "torchrun, 1 rank": lambda: _synthesize(ckpts, root / "o1", 1),
                "torchrun, 2 ranks": lambda: _synthesize(ckpts, root / "o2", 2),
            }
            return B.run_interleaved(cases, repeats)


def print_parallel_synthesis(results: dict[str, list[float]]) -> None:
    medians = {name: sorted(v)[len(v) // 2] for name, v in results.items()}
    for name, m in medians.items():
        runs = ", ".join(f"{x:.3f}" for x in results[name])
        print(f"  {name:26s} {m:7.3f} s  ({runs})")
    speedup = medians["torchrun, 1 rank"] / medians["torchrun, 2 ranks"]
    bound = medians["read once, 1 process"] / medians["read once, 2 processes"]
    print(f"speed-up of 2 ranks over 1: {speedup:.2f}x (target >= 1.5x unless memory bandwidth caps it)")
    print(f"memory bound: reading the cached inputs with 2 processes is {bound:.2f}x as fast as with 1")
    print(f"torchrun 1 rank / one process: {medians['torchrun, 1 rank'] / medians['synthesize, one process']:.2f}x")


def main() -> None:
    p = B.parser(__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16, help="Linear layers of the FSDP2 model (16)")
    p.add_argument("--width", type=int, default=768, help="their width (768: 16 x 768² x 4 B = 38 MB)")
    p.add_argument("--baseline", default=None, help="update: also time the Recorder of the checkout at PATH (A/B)")
    p.add_argument("--only", choices=("large", "small"), default=None, help="update: one model (default both)")
    p.add_argument("--half", choices=("update", "synthesis", "both"), default="both", help="which half to run")
    p.add_argument("--model-mb", type=int, default=64, help="synthesis: model size (64 MB)")
    p.add_argument("--snapshots", type=int, default=20, help="synthesis: snapshots per sigma_rel (20)")
    args = p.parse_args()
    repeats = B.repeats_of(args)
    B.print_environment({"posthoc-ema": B.load_ours()[1]})
    layers = args.layers // 2 if args.quick else args.layers
    steps = 5 if args.quick else 10
    if args.half != "synthesis":
        models = {"large": (layers, args.width, steps), "small": (150, 64, 40 if args.quick else 80)}
        for name, (n, width, k) in models.items():
            if args.only in (None, name):
                figures = bench_fsdp2_update(n, width, k, repeats, baseline=args.baseline)
                print_fsdp2_update(figures, n, width, k, repeats)
    if args.half != "update":
        model_mb, snapshots = (8, 5) if args.quick else (args.model_mb, args.snapshots)
        print(f"\nparallel synthesis: 2 x {snapshots} snapshots of a {model_mb} MB model, one target, medians of {repeats}")
        print_parallel_synthesis(bench_parallel_synthesis(model_mb, snapshots, repeats))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
