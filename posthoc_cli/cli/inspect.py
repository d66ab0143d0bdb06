"""``posthoc-ema inspect``: what a snapshot folder holds and which EMA lengths it can synthesize.

The report itself is :func:`posthoc_cli.analysis.report.inspect_report`'s (also
the ``--json`` document); this module only renders it. Headers only: no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.filesize import decimal as human_bytes
from rich.markup import escape
from rich.table import Table

from ..analysis.report import inspect_report
from ..ema.quality import FAITHFUL
from ..ema.targets import from_options
from ..format.catalogue import no_snapshots, scan
from .common import (
    Betas,
    Folder,
    SigmaRels,
    Specs,
    app,
    print_json,
    stdout,
    user_errors,
)
from .tables import grid_table, targets_table


@app.command(epilog="Example:  posthoc-ema inspect ckpts   (or --json for scripts)")
def inspect(
    folder: Folder = Path("ckpts"),
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Show what a snapshot folder holds and which EMA lengths it can synthesize, and how well.

    Reads headers only. Prints a table per recorded sigma_rel (snapshots, time
    range and spacing, dtype, tensors, parameters, bytes on disk), every problem
    found (files skipped and why, gaps in the schedule, snapshots whose tensors
    disagree), and for target lengths from 0.01 to 0.28 at the latest time the
    profile error and Σ|w| of the best mix of snapshots: lengths with an error
    below 0.01 are faithful. --sigma-rel, --beta and --ema add a row for each
    such target: how faithfully this folder reproduces it. Broken or foreign
    files are listed, never fatal; the exit code is 1 only when the folder holds
    no usable snapshot at all.
    """
    with user_errors():
        targets = from_options(sigma_rel, beta, ema, required=False)
        catalogue = scan(folder)
        report = inspect_report(catalogue, targets)
        if as_json:
            print_json(report)
        else:
            _print_inspect(report)
        if not catalogue.series:
            raise no_snapshots(catalogue.folder, "record some with posthoc_cli.Recorder, or pass the folder it wrote")


def _print_contents(console: Console, contents: dict[str, Any]) -> None:
    """What each snapshot averages and what the folder stores once (frozen weights)."""

    def part(p: dict[str, Any]) -> str:
        values = f"{p['parameters']:,} value{'s' if p['parameters'] != 1 else ''}"
        return f"{p['tensors']} tensor{'s' if p['tensors'] != 1 else ''} ({values}, {human_bytes(p['bytes'])})"

    line = f"Each snapshot averages {part(contents['averaged'])}"
    if contents["as_is"]["tensors"]:
        line += f" and keeps {part(contents['as_is'])} as they are (integer buffers)"
    once = contents["stored_once"]
    if once is None and contents["frozen_id"] is None:
        line += "; nothing is stored once (no frozen weights)"
    console.print(line)
    if once is not None:
        console.print(f"Stored once (frozen weights, not averaged): {part(once)} in {escape(once['path'])}")


def _print_thinned(console: Console, thinned: dict[str, Any] | None) -> None:
    """How the folder was kept small: the Recorder's max_snapshots, and the last prune."""
    if thinned is None:
        return
    if "recorder" in thinned:
        r = thinned["recorder"]
        lo, hi = r["keep_faithful"]
        console.print(f"Thinned while recording: at most {r['max_snapshots']} snapshots per sigma_rel, keeping {lo:g}..{hi:g} faithful")
    if "prune" in thinned:
        p = thinned["prune"]
        lo, hi = p["band"]
        console.print(f"Pruned: {p.get('removed', '?')} snapshots removed, keeping {lo:g}..{hi:g} within profile error {p['max_error']:g}")


def _print_inspect(report: dict[str, Any]) -> None:
    console = stdout()
    series = report["series"]
    count = sum(s["snapshots"] for s in series)
    if series:
        console.print(
            f"{escape(report['folder'])}: {count} snapshots of {len(series)} sigma_rel(s), "
            f"latest t={report['latest_t']} ({escape(report['time_unit'])})"
        )
        table = Table(title="Recorded", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in ("sigma_rel", "gamma", "snapshots", "t range", "spacing", "dtype", "tensors", "parameters", "on disk"):
            table.add_column(header, justify="left" if header in ("t range", "dtype") else "right")
        for s in series:
            table.add_row(
                f"{s['sigma_rel']:g}", f"{s['gamma']:.2f}", str(s["snapshots"]), f"{s['t_first']}..{s['t_last']}",
                s["spacing"], s["dtype"], str(s["tensors"]), f"{s['parameters']:,}", human_bytes(s["bytes"]),
            )
        console.print(table)
        _print_contents(console, report["contents"])
        _print_thinned(console, report["thinned"])
    else:
        console.print(f"{escape(report['folder'])}: no posthoc-ema snapshots")
    if report["problems"] or report["ignored"] or report["incomplete"]:
        console.print("\nProblems:" if report["problems"] else "\nNotes:")
        for line in report["problems"]:
            console.print(f"  - {escape(line)}")
        for skipped in report["incomplete"]:
            console.print(f"  - incomplete sharded snapshot {escape(skipped['path'])}: {escape(skipped['reason'])} (never used)")
        for skipped in report["ignored"]:
            console.print(f"  - skipped {escape(skipped['path'])}: {escape(skipped['reason'])}")
        if report["broken"]:
            console.print("  synthesize refuses to run until the broken files above are moved out of the folder.")
    if report["grid"]:
        console.print()
        console.print(grid_table(report["grid"], f"Synthesizable at t={report['t']} (faithful: profile error < {FAITHFUL:g})"))
        if report["t"] != report["latest_t"]:
            console.print(f"(t={report['t']}, synthesize's default: the latest time every sigma_rel has a snapshot)")
    if report.get("targets"):
        console.print()
        console.print(targets_table(report["targets"], f"Asked-for targets at t={report['t']}"))
    if any(row["faithful"] for row in report["grid"]) and not report["broken"]:
        folder = escape(report["folder"])
        console.print(
            f"\nNext: find the best of the faithful lengths by your own metric:  "
            f"posthoc-ema sweep {folder} --eval 'python eval.py {{weights}}'"
        )

