"""``posthoc-ema prune``: remove the snapshots a band of EMAs does not need, within an error budget.

The choice is :func:`posthoc_cli.analysis.pruning.plan_prune`'s; the removal
:func:`posthoc_cli.format.removal.remove_snapshots`' (whole sets, crash-safe).
Headers only: no torch. A dry run unless ``--yes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.filesize import decimal as human_bytes
from rich.markup import escape

from ..analysis.pruning import PrunePlan, plan_prune
from ..errors import InvalidValueError
from ..format.catalogue import no_snapshots, scan
from ..format.removal import finish_removals, remove_snapshots, write_pruned_note
from .common import Folder, app, print_json, stdout, user_errors


def _band(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("..")
    try:
        if not sep:
            raise ValueError
        return float(lo), float(hi)
    except ValueError:
        raise InvalidValueError(f"band {text!r} is not LO..HI", "write it as e.g. --band 0.03..0.20") from None


@app.command(epilog="Example:  posthoc-ema prune ckpts --band 0.03..0.20 --max-error 0.01   (then --yes to remove)")
def prune(
    folder: Folder,
    band: Annotated[str, typer.Option("--band", metavar="LO..HI", help="The sigma_rels that must stay reproducible, e.g. 0.03..0.20.")],
    max_error: Annotated[float, typer.Option("--max-error", metavar="E", help="Largest profile error allowed in the band, e.g. 0.01.")],
    at: Annotated[
        list[int] | None,
        typer.Option("--at", metavar="T", help="Also keep the band within E at time T (default: synthesize's default time only); repeatable."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Remove the snapshots (without it: only show what would go).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document: kept, removed, worst_error, bytes_freed.")] = False,
) -> None:
    """Remove the most snapshots such that every power EMA in the band stays within profile error E.

    Judged at synthesize's default time (the latest every sigma_rel reached) and at each --at T. The newest
    snapshot of each sigma_rel is always kept; frozen weights, incomplete or broken
    sets and foreign files are left alone and listed. Without --yes nothing is
    deleted: the command prints what it would remove, the worst error left and the
    bytes freed. With --yes each snapshot (a sharded set as a whole) is renamed out of
    the way, then deleted, so an interruption never leaves half a set that counts.
    A band the folder misses even before pruning exits 1, naming the band it does reproduce.
    """
    with user_errors():
        root = Path(folder)
        catalogue = scan(root)
        if not catalogue.series:
            raise no_snapshots(catalogue.folder, "pass the folder the Recorder wrote")
        plan = plan_prune(catalogue, _band(band), max_error, at or ())
        if yes:
            finish_removals(root)
            remove_snapshots([s.path for s in plan.removed])
            if plan.removed:
                write_pruned_note(root, {"band": list(plan.band), "max_error": plan.max_error, "times": plan.times,
                                         "removed": len(plan.removed)})
        if as_json:
            print_json(_document(plan, removed=yes))
        else:
            _print(plan, removed=yes)


def _document(plan: PrunePlan, *, removed: bool) -> dict[str, object]:
    return {
        "band": list(plan.band),
        "max_error": plan.max_error,
        "times": plan.times,
        "kept": [s.path.name for s in plan.kept],
        "removed": [s.path.name for s in plan.removed],
        "worst_error": plan.worst_error,
        "worst_error_before": plan.worst_before,
        "bytes_freed": plan.bytes_freed,
        "left_alone": [{"path": str(s.path), "reason": s.reason} for s in plan.left_alone],
        "dry_run": not removed,
    }


def _print(plan: PrunePlan, *, removed: bool) -> None:
    console = stdout()
    count = len(plan.kept) + len(plan.removed)
    verb = "Removed" if removed else "Would remove"
    at = ", ".join(map(str, plan.times))
    if not removed:
        for snap in plan.removed:
            console.print(f"  {escape(snap.path.name)}")
    console.print(
        f"{verb} {len(plan.removed)} of {count} snapshots ({human_bytes(plan.bytes_freed)}); "
        f"worst profile error of sigma_rel {plan.band[0]:g}..{plan.band[1]:g} at t={at}: "
        f"{plan.worst_error:.3g} (was {plan.worst_before:.3g}, allowed {plan.max_error:g})"
    )
    for skipped in plan.left_alone:
        console.print(f"Left alone: {escape(str(skipped.path))} ({escape(skipped.reason)})")
    if not removed and plan.removed:
        console.print("Nothing was removed: run again with --yes to remove them.")
