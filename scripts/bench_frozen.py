"""Recording a model that is 99 % frozen: update cost and snapshot size follow what trains, not the model.

The model: ``--layers`` frozen SIDE x SIDE linear layers (the base), each with a trainable
low-rank adapter of rank ``--rank`` beside it (two tensors, SIDE x RANK and RANK x SIDE), as
LoRA does. By default 32 x 1024x1024 frozen (128 MB) and 32 x 2 x 1024x4 trainable (1 MB): 0.8 %
of the model trains. (Each snapshot also has a header of about 80 bytes per tensor plus padding
to 4 KB: tiny tensors, e.g. ``--side 512 --rank 2`` at 4 KB each, make it ~2 % of the file.)

- floor: two plain ``torch._foreach_lerp_`` calls over pre-built lists of the trainable
  tensors alone (what any two-EMA update of the adapters must at least cost);
- posthoc-ema: ``Recorder(model, dir, sigma_rels=(0.05, 0.10), snapshot_every=huge).update()``
  with its defaults (frozen weights are not averaged);
- posthoc-ema average_frozen=True: the same with every tensor averaged, for scale.

The same two, each right after a real optimizer step (``torch.optim.SGD(foreach=True).step()``
on the adapters, fixed gradients), as in a training loop: their cost there is the time with
the step minus the step alone. Back to back, the floor's 128 small lerps run with the
dispatcher's code hot in the CPU; any Python in between (the Recorder's ~10 µs, an optimizer
step) makes them ~30 % slower, so the in-loop figure is the one a training run sees.

Then one snapshot per EMA is written (``snapshot()``) and its file size compared with the
trainable bytes. Targets (issue 13): update <= 1.10x floor; snapshot bytes <= 1.02x trainable.

    python scripts/bench_frozen.py [--quick] [--repeats N] [--device cuda]
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import _bench as B
import torch
from torch import nn

SIGMA_RELS = (0.05, 0.10)
NEVER = 10**15


class Adapted(nn.Module):
    """Frozen base layers, each with a trainable low-rank adapter."""

    def __init__(self, layers: int, side: int, rank: int, device: torch.device) -> None:
        super().__init__()
        self.base = nn.ParameterList(nn.Parameter(torch.randn(side, side, device=device), requires_grad=False) for _ in range(layers))
        self.down = nn.ParameterList(nn.Parameter(torch.randn(rank, side, device=device)) for _ in range(layers))
        self.up = nn.ParameterList(nn.Parameter(torch.zeros(side, rank, device=device)) for _ in range(layers))


def main() -> None:
    p = B.parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--side", type=int, default=1024)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="updates per timed block")
    args = p.parse_args()
    device = torch.device(args.device)
    repeats = B.repeats_of(args)
    ours, version = B.load_ours()
    if ours is None:
        raise SystemExit(version)
    B.print_environment({"posthoc-ema": version})
    steps = max(20, args.steps // 4) if args.quick else args.steps
    cuda = device.type == "cuda"
    model = Adapted(args.layers, args.side, args.rank, device)
    trainable = [t.detach() for t in model.parameters() if t.requires_grad]
    train_bytes = sum(t.numel() * t.element_size() for t in trainable)
    total_bytes = sum(t.numel() * t.element_size() for t in model.parameters())

    with tempfile.TemporaryDirectory(prefix="posthoc-bench-frozen-") as tmp, torch.no_grad():
        floor_emas = [[t.clone() for t in trainable] for _ in SIGMA_RELS]

        def floor() -> None:
            for ema in floor_emas:
                torch._foreach_lerp_(ema, trainable, 0.01)

        rec = ours.Recorder(model, Path(tmp) / "ours", sigma_rels=SIGMA_RELS, snapshot_every=NEVER)
        full = ours.Recorder(model, Path(tmp) / "full", sigma_rels=SIGMA_RELS, snapshot_every=NEVER, average_frozen=True)
        contenders: dict[str, Callable[[], object]] = {
            "floor (2x _foreach_lerp_, trainable)": floor,
            "posthoc-ema (default)": rec.update,
            "posthoc-ema average_frozen=True": full.update,
        }

        def block(fn: Callable[[], object]) -> B.Case:
            return B.per_call(fn, steps, torch.cuda.synchronize if cuda else None)

        results = B.run_interleaved({k: block(fn) for k, fn in contenders.items()}, repeats, warmup=1)
        med = {k: B.median(v) for k, v in results.items()}
        base = med["floor (2x _foreach_lerp_, trainable)"]
        B.print_table(
            f"{args.layers} x {args.side}x{args.side} frozen + {2 * args.layers} adapter tensors (rank {args.rank}): "
            f"{B.fmt_mb(train_bytes)} trainable of {B.fmt_mb(total_bytes)} ({train_bytes / total_bytes:.2%}), "
            f"2 EMAs, {device}, {steps} updates/block, median of {repeats}",
            ["contender", "median/update", "min/update", "x floor"],
            [[k, B.fmt_s(med[k]), B.fmt_s(min(results[k])), B.fmt_x(B.ratio(med[k], base))] for k in contenders],
        )
        # In a training loop: after an optimizer step, as update() is always called.
        params = [t for t in model.parameters() if t.requires_grad]
        for t in params:
            t.grad = torch.full_like(t, 1e-4)
        opt = torch.optim.SGD(params, lr=1e-3, foreach=True)

        def after_step(fn: Callable[[], object]) -> Callable[[], None]:
            def both() -> None:
                opt.step()
                fn()
            return both

        in_loop = {
            "optimizer step alone": opt.step,
            "step + floor": after_step(floor),
            "step + posthoc-ema update()": after_step(rec.update),
        }
        stepped = B.run_interleaved({k: block(fn) for k, fn in in_loop.items()}, repeats, warmup=1)
        step_med = {k: B.median(v) for k, v in stepped.items()}
        alone = step_med["optimizer step alone"]
        floor_in_loop = step_med["step + floor"] - alone
        ours_in_loop = step_med["step + posthoc-ema update()"] - alone
        B.print_table(
            f"after an SGD step (foreach) over the adapters, {steps} steps/block, median of {repeats}",
            ["contender", "median/step", "minus the step alone", "x floor"],
            [[k, B.fmt_s(v), B.fmt_s(v - alone) if k != "optimizer step alone" else "",
              B.fmt_x(B.ratio(v - alone, floor_in_loop)) if k != "optimizer step alone" else ""] for k, v in step_med.items()],
        )
        rec.snapshot()
        rec.close()
        full.close()
        files = sorted((Path(tmp) / "ours").glob("ema-*.safetensors"))
        frozen = Path(tmp) / "ours" / "frozen.safetensors"
        size = max(f.stat().st_size for f in files)
        print(
            f"  update: posthoc-ema / floor = {B.fmt_x(B.ratio(med['posthoc-ema (default)'], base))} back to back, "
            f"{B.fmt_x(B.ratio(ours_in_loop, floor_in_loop))} after an optimizer step (target <= 1.10); "
            f"snapshot file {size:,} bytes / trainable {train_bytes:,} = {size / train_bytes:.4f} (target <= 1.02); "
            f"frozen.safetensors (once) {frozen.stat().st_size:,} bytes"
        )


if __name__ == "__main__":
    main()
