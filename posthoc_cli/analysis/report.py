"""What a snapshot folder holds and what it can synthesize: the report behind `posthoc-ema inspect`.

Plain data (JSON-ready dicts), built from headers alone; the CLI renders it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import median
from typing import Any

from ..dtypes import SAFETENSORS_DTYPES, unit_roundoff
from ..ema.quality import (  # FAITHFUL, POOR: also imported from here
    FAITHFUL,
    grid,
    target_rows,
)
from ..ema.trackers import Target
from ..format.catalogue import Catalogue, layout_problems
from ..format.frozen import WHERE
from ..format.removal import thinned_by
from ..format.snapshot import Snapshot


def _spacing(ts: list[int]) -> str:
    gaps = sorted({b - a for a, b in zip(ts, ts[1:])})
    if not gaps:
        return "-"
    return str(gaps[0]) if len(gaps) == 1 else f"{gaps[0]}..{gaps[-1]}"


def _schedule_problems(catalogue: Catalogue, thinned: bool) -> list[str]:
    """Holes in a series' time schedule, and times that one series has and another lacks (a thinned folder has them on purpose)."""
    problems: list[str] = []
    if thinned:
        return problems
    every = sorted({s.t for s in catalogue.snapshots})
    for sigma_rel, snaps in catalogue.series.items():
        ts = [s.t for s in snaps]
        diffs = [b - a for a, b in zip(ts, ts[1:])]
        if len(diffs) >= 2:
            usual = median(diffs)
            for a, b in zip(ts, ts[1:]):
                if b - a > 1.5 * usual:
                    problems.append(f"sigma_rel {sigma_rel}: no snapshot between t={a} and t={b} (usual spacing {usual:g})")
        missing = sorted(set(every) - set(ts))
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            problems.append(f"sigma_rel {sigma_rel}: no snapshot at t={shown}, which other sigma_rels have")
    return problems


def _at_default_t(catalogue: Catalogue) -> tuple[list[int], list[float], int, float]:
    """The snapshots a synthesis at its default time would use (times, sigma_rels), that time, and their unit roundoff."""
    t = catalogue.complete_t
    snaps = [s for s in catalogue.snapshots if s.t <= t]
    return [s.t for s in snaps], [s.sigma_rel for s in snaps], t, max(unit_roundoff(s.dtype) for s in snaps)


def _grid(catalogue: Catalogue) -> list[dict[str, Any]]:
    """Profile error and Σ|w| of target lengths 0.01..0.28 (plus the recorded ones) at synthesize's default time."""
    return grid(*_at_default_t(catalogue))


def _target_rows(catalogue: Catalogue, targets: Sequence[str | float | Target]) -> list[dict[str, Any]]:
    ts, sigma_rels, t, unit = _at_default_t(catalogue)
    return target_rows(ts, sigma_rels, t, targets, unit)


def _series_summary(sigma_rel: float, snaps: list[Snapshot]) -> dict[str, Any]:
    latest = snaps[-1]
    ts = [s.t for s in snaps]
    return {
        "sigma_rel": sigma_rel,
        "gamma": latest.gamma,
        "snapshots": len(snaps),
        "t_first": ts[0],
        "t_last": ts[-1],
        "spacing": _spacing(ts),
        "dtype": latest.dtype,
        "tensors": len(latest.layout),
        "parameters": sum(
            math.prod(shape) for code, shape in latest.layout.values() if SAFETENSORS_DTYPES[code].is_floating_point
        ),
        "bytes": sum(s.nbytes for s in snaps),
        "sharded": sum(s.sharded for s in snaps),
    }


def contents_report(catalogue: Catalogue) -> tuple[dict[str, Any], list[str]]:
    """What the latest snapshot averages, what it keeps as it is, and what is stored once (with bytes);
    plus the problems found (a missing frozen file). JSON-ready, for ``inspect``."""
    snaps = catalogue.snapshots
    if not snaps:
        return {}, []
    latest = snaps[-1]

    def part(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, int]:
        counts = [(math.prod(shape), SAFETENSORS_DTYPES[code].itemsize) for code, shape in shapes]
        return {"tensors": len(counts), "parameters": sum(n for n, _ in counts), "bytes": sum(n * size for n, size in counts)}

    entries = list(latest.layout.values())  # global shapes: a sharded snapshot counts all its rank files, not rank 0's
    ident = latest.frozen_id
    file = next((f for f in catalogue.frozen if f.id == ident), None)
    problems = []
    if ident is not None and file is None:
        problems.append(
            f"the snapshots keep their frozen weights in {WHERE} (id {ident}), which is missing: "
            "complete outputs cannot be made (--trainable-only still works)"
        )
    report: dict[str, Any] = {
        "averaged": part([e for e in entries if SAFETENSORS_DTYPES[e[0]].is_floating_point]),
        "as_is": part([e for e in entries if not SAFETENSORS_DTYPES[e[0]].is_floating_point]),
        "stored_once": None if file is None else {"path": str(file.path), **part([(e.code, e.shape) for e in file.tensors.values()])},
        "frozen_id": ident,
        "unused_frozen_files": [str(f.path) for f in catalogue.frozen if f is not file],
    }
    return report, problems


def inspect_report(catalogue: Catalogue, targets: Sequence[str | float | Target] = ()) -> dict[str, Any]:
    """Series summaries, problems, the grid of synthesizable lengths and a row per asked-for
    target (key ``targets``), as one JSON-ready dict."""
    snaps = catalogue.snapshots
    problems = [f"{s.path}: {s.reason}" for s in catalogue.broken]
    thinned = thinned_by(catalogue.folder, snaps[-1].info) if snaps else None
    problems += layout_problems(snaps) + _schedule_problems(catalogue, thinned is not None)
    if len(catalogue.series) == 1:
        only = next(iter(catalogue.series))
        problems.append(f"only sigma_rel {only} was recorded: other lengths cannot be synthesized from one")
    contents, missing = contents_report(catalogue)  # averaged / as-is / stored once, with bytes
    problems += missing
    return {
        "folder": str(catalogue.folder),
        "latest_t": catalogue.latest_t if snaps else None,
        "t": catalogue.complete_t if snaps else None,  # where the grid and targets are judged: synthesize's default time
        "time_unit": snaps[-1].time_unit if snaps else None,
        "series": [_series_summary(s, group) for s, group in sorted(catalogue.series.items())],
        "broken": [{"path": str(s.path), "reason": s.reason} for s in catalogue.broken],
        "ignored": [{"path": str(s.path), "reason": s.reason} for s in catalogue.ignored],
        "incomplete": [{"path": str(s.path), "reason": s.reason} for s in catalogue.incomplete],
        "problems": problems,
        "grid": _grid(catalogue) if snaps else [],
        "targets": _target_rows(catalogue, targets) if snaps and targets else [],
        "faithful_below": FAITHFUL,
        "contents": contents,
        "thinned": thinned,
    }
