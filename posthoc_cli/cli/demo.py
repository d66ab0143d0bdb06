"""``posthoc-ema demo``: train a small model, record two EMAs, then pick the EMA length afterwards.

The work is :mod:`.demo_run`'s (torch, imported only when the command runs);
this module shows its progress and prints what it found.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from .common import app, fmt, progress_bar, stdout, user_errors

if TYPE_CHECKING:
    from . import demo_run


@app.command(epilog="Example:  posthoc-ema demo --out demo-ckpts   then   posthoc-ema inspect demo-ckpts")
def demo(
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Keep the snapshots in this new folder (default: a temporary one, removed)."),
    ] = None,
    steps: Annotated[int | None, typer.Option(hidden=True, min=1, help="Training steps (for quick tests).")] = None,
    snapshot_every: Annotated[int | None, typer.Option(hidden=True, min=1)] = None,
) -> None:
    """Train a small model on built-in data, record two EMAs, then pick the best EMA length afterwards.

    An MLP learns a noisy synthetic regression task with a high learning rate
    while a Recorder keeps EMAs with sigma_rel 0.05 and 0.10. Then a sweep (what
    `posthoc-ema sweep` does with your own evaluation) synthesizes lengths across the
    band the snapshots reproduce faithfully and homes in on the best; the validation
    loss of the raw weights, of both recorded EMAs and of every synthesized one is
    printed, best marked. Seeded, no downloads, a few seconds on a laptop CPU.
    """
    from . import demo_run  # torch: only this command trains a model

    steps = demo_run.STEPS if steps is None else steps
    snapshot_every = demo_run.SNAPSHOT_EVERY if snapshot_every is None else snapshot_every
    with user_errors(), _demo_folder(out) as folder:
        with progress_bar(enabled=sys.stderr.isatty(), in_bytes=False, transient=True) as bar:
            tasks: dict[str, Any] = {}

            def report(stage: str, done: int, total: int) -> None:
                if bar is not None:
                    if stage not in tasks:
                        tasks[stage] = bar.add_task(stage, total=total)
                    bar.update(tasks[stage], completed=done, total=total)

            result = demo_run.run_demo(folder, steps=steps, snapshot_every=snapshot_every, progress=report)
        _print_demo(result, kept=out is not None)


@contextlib.contextmanager
def _demo_folder(out: Path | None) -> Iterator[Path]:
    if out is not None:
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix="posthoc-ema-demo-"))
    try:
        yield scratch / "ckpts"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _print_demo(result: demo_run.DemoResult, *, kept: bool) -> None:
    from . import demo_run

    console = stdout()
    swept = [row for row in result.rows if row.label == "synthesized"]
    searched = sum(row.searched for row in swept)
    console.print(
        f"Trained a {result.parameters:,}-parameter MLP for {result.steps:,} steps in {result.train_seconds:.1f} s, "
        f"recording EMAs with sigma_rel {' and '.join(map(str, demo_run.RECORDED))} "
        f"({result.snapshots} snapshots); swept {len(swept)} lengths ({searched} placed by the search) "
        f"in {result.sweep_seconds:.2f} s."
    )
    raw = result.rows[0].val_loss
    best = result.best
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("weights", "sigma_rel", "profile error", "val loss", "vs raw", ""):
        table.add_column(header, justify="left" if header in ("weights", "") else "right")
    for row in result.rows:
        table.add_row(
            row.label,
            "-" if row.sigma_rel is None else f"{row.sigma_rel:g}",
            "-" if row.profile_error is None else fmt(row.profile_error, 2),
            f"{row.val_loss:.4f}",
            f"{row.val_loss / raw - 1:+.1%}" if row is not result.rows[0] else "",
            "<- best" if row is best else "",
        )
    console.print(table)
    kind = best.label.removesuffix(" EMA")  # "recorded" or "synthesized"
    what = "the raw weights" if best.sigma_rel is None else f"the {kind} EMA with sigma_rel {best.sigma_rel:g}"
    console.print(f"\nBest: {what}, validation loss {best.val_loss:.4f} ({best.val_loss / raw - 1:+.1%} vs raw weights).")
    if kept:
        folder = escape(str(result.folder))
        console.print(
            f"Snapshots kept in {folder} (the sweep's results in {escape(str(result.results))}). Try:\n"
            f"  posthoc-ema inspect {folder}\n"
            f"  posthoc-ema synthesize {folder} --sigma-rel {best.sigma_rel or 0.15:g} --out ema.safetensors\n"
            f"  posthoc-ema sweep {folder} --eval 'python eval.py {{weights}}'   (your own evaluation)"
        )
