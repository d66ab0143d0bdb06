"""Per-update cost of the Recorder (2 sigma_rels) against the floor and the peers.

Install the peers (benchmark only, never project dependencies; --no-deps keeps pip from
replacing the installed torch; pytorch-posthoc-ema imports PIL at import time):

    pip install --no-deps ema-pytorch pytorch-posthoc-ema
    pip install pillow

What is measured, per update, for three model shapes (64 large tensors; 1,200 and 300 small ones):

- floor: two plain ``torch._foreach_lerp_`` calls (one per EMA) over pre-built lists of
  the same float32 tensors, the least any two-EMA update can cost;
- one fused call: a single ``torch._foreach_lerp_`` over both EMAs' tensors with a list of
  weights (the ScalarList overload), on the floor's lists;
- posthoc-ema: ``Recorder(model, dir, sigma_rels=(0.05, 0.10), snapshot_every=huge).update()``;
- ema-pytorch: ``PostHocEMA(model, sigma_rels=(0.05, 0.10), update_every=1,
  checkpoint_every_num_steps="manual").update()``;
- pytorch-posthoc-ema: ``PostHocEMA.from_model(model, dir, sigma_rels=(0.05, 0.10),
  update_every=1, update_after_step=0, checkpoint_every=huge).update_(model)``.

- baseline (``--baseline PATH``): the Recorder of another checkout (e.g. the previous
  commit), imported beside ours (``_bench.load_baseline``) and timed in the same rounds.

No snapshot or checkpoint is written while timing. Each timed block is ``--steps`` calls
(with ``--device cuda`` the device is synchronised before and after a block); the table
shows the median over ``--repeats`` blocks, run interleaved after a warm-up. With
``--device cuda`` each contender is also run under ``torch.cuda.set_sync_debug_mode("error")``
to show whether its update synchronises with the host.

Targets (issue 4): posthoc-ema <= 1.10x floor on both shapes; ema-pytorch / posthoc-ema
>= 3 on the 1,200-tensor model; on a GPU, zero host syncs and <= 1.2x floor.

    python scripts/bench_update.py [--quick] [--repeats N] [--device cuda] [--baseline PATH] [--only 300]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import _bench as B
import torch
from torch import nn

SIGMA_RELS = (0.05, 0.10)
NEVER = 10**15  # a snapshot/checkpoint interval that is never reached


class Flat(nn.Module):
    """A model that is only a list of parameters of one shape."""

    def __init__(self, count: int, shape: tuple[int, ...], device: torch.device) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.randn(shape, device=device)) for _ in range(count))


def make_updaters(model: nn.Module, tmp: Path, closers: list[Callable[[], object]], baseline: str | None = None
                  ) -> dict[str, Callable[[], object] | str]:
    """One zero-argument update function per contender, or a string saying why it is skipped."""
    out: dict[str, Callable[[], object] | str] = {}

    # First: from_model() moves the model to the CPU and back, which replaces the parameters'
    # storage on an accelerator; everything built after it sees the final tensors.
    ph, why = B.load_peer("posthoc_ema", "pytorch-posthoc-ema")
    if ph is None:
        peer2: Callable[[], object] | str = why
    else:
        # Its EMAs always live on the CPU (KarrasEMA(device="cpu")); update_after_step=0 so it
        # updates from the first step.
        phema = ph.PostHocEMA.from_model(model, tmp / "pytorch-posthoc-ema", sigma_rels=SIGMA_RELS,
                                         update_every=1, checkpoint_every=NEVER, update_after_step=0)
        peer2 = lambda: phema.update_(model)

    # The floor: two fused lerps over lists built once, nothing else.
    src = [p.detach() for p in model.parameters()]
    floor_emas = [[t.clone() for t in src] for _ in SIGMA_RELS]

    def floor() -> None:
        for ema in floor_emas:
            torch._foreach_lerp_(ema, src, 0.01)

    out["floor (2x _foreach_lerp_)"] = floor

    # Both EMAs in one call, one weight per tensor (the ScalarList overload): fewer calls, but on
    # the CPU each tensor's lerp costs more than with one Scalar (measured 1.1-1.3x the floor).
    both_emas, both_src = [t for ema in floor_emas for t in ema], src * len(SIGMA_RELS)
    weights = [w for w in (0.01, 0.02) for _ in src]

    def fused() -> None:
        torch._foreach_lerp_(both_emas, both_src, weights)

    out["1x _foreach_lerp_, ScalarList"] = fused

    ours, why = B.load_ours()
    if ours is None:
        out["posthoc-ema"] = why
    else:
        rec = ours.Recorder(model, tmp / "ours", sigma_rels=SIGMA_RELS, snapshot_every=NEVER)
        out["posthoc-ema"] = rec.update
        closers.append(rec.close)
    if baseline:
        old = B.load_baseline(baseline).Recorder(model, tmp / "baseline", sigma_rels=SIGMA_RELS, snapshot_every=NEVER)
        out["baseline"] = old.update
        closers.append(old.close)

    ep, why = B.load_peer("ema_pytorch", "ema-pytorch")
    if ep is None:
        out["ema-pytorch"] = why
    else:
        # update_every=1 (its KarrasEMA default is 100); float32 like ours.
        pema = ep.PostHocEMA(model, sigma_rels=SIGMA_RELS, update_every=1,
                             checkpoint_every_num_steps="manual",
                             checkpoint_folder=str(tmp / "ema-pytorch"), checkpoint_dtype=torch.float32)
        out["ema-pytorch"] = pema.update

    out["pytorch-posthoc-ema"] = peer2
    return out


def sync_check(fn: Callable[[], object]) -> str:
    """Run a few updates with CUDA sync debugging set to raise; report whether any synced."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            fn()
    except RuntimeError as exc:
        return "syncs: " + str(exc).splitlines()[0][:60]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
    return "none"


def bench_shape(label: str, count: int, shape: tuple[int, ...], steps: int, repeats: int,
                device: torch.device, baseline: str | None = None) -> None:
    model = Flat(count, shape, device)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="posthoc-bench-update-") as tmp:
        closers: list[Callable[[], object]] = []
        updaters = make_updaters(model, Path(tmp), closers, baseline)
        runnable = {k: v for k, v in updaters.items() if callable(v)}

        def block(fn: Callable[[], object]) -> B.Case:
            return B.per_call(fn, steps, torch.cuda.synchronize if cuda else None)

        # Warm-up: also performs each library's first update (a copy, not a lerp).
        results = B.run_interleaved({k: block(fn) for k, fn in runnable.items()}, repeats, warmup=1)
        syncs = {k: sync_check(fn) for k, fn in runnable.items()} if cuda else {}

        med = {k: B.median(v) for k, v in results.items()}
        floor = med.get("floor (2x _foreach_lerp_)")
        ours = med.get("posthoc-ema")
        headers = ["contender", "median/update", "min/update", "x floor", "/ posthoc-ema"]
        if cuda:
            headers.append("host syncs")
        rows: list[list[object]] = []
        for name, fn in updaters.items():
            if not callable(fn):
                rows.append([name, "skipped", *[""] * (len(headers) - 2)])
                continue
            row: list[object] = [name, B.fmt_s(med[name]), B.fmt_s(min(results[name])),
                                 B.fmt_x(B.ratio(med[name], floor)), B.fmt_x(B.ratio(med[name], ours))]
            if cuda:
                row.append(syncs[name])
            rows.append(row)
        B.print_table(f"{label}: {count} x {'x'.join(map(str, shape))} float32 = {B.fmt_mb(n_bytes)}, "
                      f"2 EMAs, {device}, {steps} updates/block, median of {repeats}", headers, rows)
        summary = [f"posthoc-ema / floor = {B.fmt_x(B.ratio(ours, floor))} (target <= 1.10)"]
        if "baseline" in med:
            summary.append(f"baseline / floor = {B.fmt_x(B.ratio(med['baseline'], floor))}")
        for peer in ("ema-pytorch", "pytorch-posthoc-ema"):
            if peer in med:
                target = " (target >= 3 on 1,200 tensors)" if peer == "ema-pytorch" else ""
                summary.append(f"{peer} / posthoc-ema = {B.fmt_x(B.ratio(med[peer], ours))}{target}")
        print("  " + "; ".join(summary))
        for close in closers:  # let the Recorder finish before its folder goes
            close()


def main() -> None:
    p = B.parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--steps", type=int, default=None, help="updates per timed block (default: by shape)")
    p.add_argument("--large-side", type=int, default=512, help="the 64 large tensors are SIDE x SIDE (512)")
    p.add_argument("--small-side", type=int, default=64, help="the 1,200 and 300 small tensors are SIDE x SIDE (64)")
    p.add_argument("--baseline", default=None, help="also time the Recorder of the checkout at PATH (A/B)")
    p.add_argument("--only", choices=("64", "1200", "300"), default=None, help="run one shape (by tensor count)")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    repeats = B.repeats_of(args)
    _, ours_v = B.load_ours()
    B.print_environment({
        "posthoc-ema": ours_v,
        "ema-pytorch": B.load_peer("ema_pytorch", "ema-pytorch")[1],
        "pytorch-posthoc-ema": B.load_peer("posthoc_ema", "pytorch-posthoc-ema")[1],
    })
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    with torch.no_grad():
        # 64 x 512x512 = 64 MB and 1,200 x 64x64 = 19 MB by default; --quick halves the large model.
        large_count = 32 if args.quick else 64
        if args.only in (None, "64"):
            bench_shape("large tensors", large_count, (args.large_side,) * 2,
                        args.steps or (5 if args.quick else 10), repeats, device, args.baseline)
        if args.only in (None, "1200"):
            bench_shape("small tensors", 1200, (args.small_side,) * 2,
                        args.steps or (10 if args.quick else 20), repeats, device, args.baseline)
        if args.only in (None, "300"):  # where a per-tensor cost of the update shows most
            bench_shape("300 small tensors", 300, (args.small_side,) * 2,
                        args.steps or (40 if args.quick else 80), repeats, device, args.baseline)


if __name__ == "__main__":
    main()
