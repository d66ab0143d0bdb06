"""``posthoc-ema plan`` and ``plot``: what a recording will reproduce, before training and after.

``plan`` answers before training, from the schedule alone
(:mod:`posthoc_cli.analysis.recording_plan`); ``plot`` draws what a recorded
folder reproduces (:mod:`posthoc_cli.analysis.plotting`, matplotlib: imported
only when a drawing is asked for, as it is an optional dependency).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.filesize import decimal as human_bytes

from ..ema.quality import FAITHFUL
from ..ema.targets import from_options
from ..errors import InvalidValueError
from ..format.catalogue import no_snapshots, scan
from .common import (
    Betas,
    Folder,
    SigmaRels,
    Specs,
    app,
    fail,
    print_json,
    say,
    stdout,
    user_errors,
)
from .tables import grid_table, targets_table


@app.command(
    "plan",
    epilog="Examples:  posthoc-ema plan --steps 100000 --snapshot-every 5000 --record 0.05 --record 0.10 --beta 0.9999"
    "   |   posthoc-ema plan --steps 100000 --want 0.03..0.25 --beta 0.9999",
)
def plan_command(
    steps: Annotated[int, typer.Option("--steps", "-T", help="Training length T (the target time).")],
    snapshot_every: Annotated[
        int | None, typer.Option("--snapshot-every", help="Recorder's snapshot interval (with --record).")
    ] = None,
    record: Annotated[list[float] | None, typer.Option("--record", help="A sigma_rel to record; repeat.")] = None,
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    want: Annotated[
        str | None, typer.Option("--want", metavar="LO..HI", help="Recommend a recording for this sigma_rel range.")
    ] = None,
    max_error: Annotated[float, typer.Option("--max-error", help="Profile error the recommendation must stay below.")] = FAITHFUL,
    params: Annotated[int | None, typer.Option("--params", min=1, help="Averaged parameters, for the disk cost.")] = None,
    dtype: Annotated[str, typer.Option(help="Snapshot dtype: float32, float16 or bfloat16.")] = "float32",
    max_snapshots: Annotated[
        int | None, typer.Option("--max-snapshots", metavar="N", help="Recorder's max_snapshots (with --record): disk and errors thinned.")
    ] = None,
    keep_faithful: Annotated[
        str, typer.Option("--keep-faithful", metavar="LO..HI", help="Recorder's keep_faithful band, with --max-snapshots.")
    ] = "0.03..0.20",
    plot: Annotated[Path | None, typer.Option("--plot", metavar="FILE.png", help="Draw profile error vs sigma_rel.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")] = False,
) -> None:
    """Before training: what a recording will reproduce, and what it costs; or the cheapest that suffices.

    With --snapshot-every and --record: the table `inspect` will print for that
    folder (profile error and Σ|w| of lengths 0.01..0.28, a row per target) and
    the disk it takes (with --params). Without --record: a recommendation, the
    cheapest pair (or triple) of sigma_rels and the largest snapshot interval
    whose profile error stays below --max-error for every --want length and target.
    """
    from ..analysis import recording_plan as planning

    with user_errors():
        targets = from_options(sigma_rel, beta, ema, required=False)
        if record:
            if snapshot_every is None:
                raise InvalidValueError("--record needs --snapshot-every", "give the Recorder's snapshot interval")
            report = planning.plan_report(steps=steps, snapshot_every=snapshot_every, record=record,
                                          targets=targets, params=params, dtype=dtype, max_snapshots=max_snapshots,
                                          keep_faithful=planning.parse_range(keep_faithful, "--keep-faithful"))
            document: dict[str, Any] = report
        else:
            if max_snapshots is not None:
                raise InvalidValueError("--max-snapshots needs --record and --snapshot-every", "give the recording to thin")
            wanted = planning.parse_range(want) if want is not None else None
            document = planning.recommend(steps=steps, want=wanted, targets=targets, max_error=max_error,
                                          dtype=dtype, params=params)
            if document["record"] is None:
                raise fail(f"no pair or triple of sigma_rels tried reaches profile error {max_error:g} for "
                           f"{', '.join(document['wanted'][:4])}{' …' if len(document['wanted']) > 4 else ''} — "
                           "allow a larger --max-error or narrow --want", 1)
            report = document["plan"]
        if plot is not None:
            from ..analysis.plotting import draw_plan

            draw_plan(report, plot)
        if as_json:
            print_json(document)
            return
        console = stdout()
        if not record:
            console.print(
                f"Recommended: --record {' --record '.join(f'{s:g}' for s in document['record'])} "
                f"--snapshot-every {document['snapshot_every']} ({document['snapshots']} snapshots; "
                f"worst profile error {document['worst_error']:.2g} ≤ {max_error:g})\n"
            )
        disk = "" if report["disk_bytes"] is None else f", {human_bytes(report['disk_bytes'])} of tensors ({report['dtype']})"
        kept = "" if report["max_snapshots"] is None else f", {report['on_disk']} kept on disk (--max-snapshots {report['max_snapshots']})"
        console.print(
            f"Recording sigma_rel {', '.join(f'{s:g}' for s in report['record'])} every {report['snapshot_every']} steps "
            f"up to {report['steps']}: {report['snapshots']} snapshots{kept}{disk}; synthesis at t={report['latest_t']}"
        )
        console.print()
        console.print(grid_table(report["grid"], f"Synthesizable at t={report['latest_t']} (faithful: profile error < {FAITHFUL:g})"))
        if report["targets"]:
            console.print()
            console.print(targets_table(report["targets"], f"Targets at t={report['latest_t']}"))


# -- plot -------------------------------------------------------------------------------------------


@app.command(epilog="Example:  posthoc-ema plot ckpts --beta 0.9999 -s 0.1 --out ema.png   (needs pip install 'posthoc-ema\\[plot]')")
def plot(
    folder: Folder = Path("ckpts"),
    sigma_rel: SigmaRels = None,
    beta: Betas = None,
    ema: Specs = None,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE.png", help="The PNG to write.")] = Path("posthoc-ema.png"),
    step: Annotated[int | None, typer.Option("--step", "-t", help="Target training time (default: the latest).")] = None,
) -> None:
    """Draw each target's profile over training time next to its reconstruction from the snapshots
    (snapshot times marked), and the profile error against sigma_rel (recorded lengths marked,
    the faithful band shaded, other targets placed at their closest sigma_rel)."""
    from ..analysis.plotting import draw, plot_series

    with user_errors():
        targets = from_options(sigma_rel, beta, ema, required=False)
        catalogue = scan(folder)
        catalogue.raise_if_broken()
        snaps = catalogue.snapshots
        if not snaps:
            raise no_snapshots(catalogue.folder, "pass the folder the Recorder wrote")
        t = catalogue.complete_t if step is None else step  # as synthesize
        dtype = max((s.dtype for s in snaps), key=lambda d: {"float32": 0, "bfloat16": 2, "float16": 1}[d])
        series = plot_series([s.t for s in snaps], [s.sigma_rel for s in snaps], t, targets, dtype)
        draw(series, out, time_unit=snaps[-1].time_unit)
        say(f"wrote {out}")
