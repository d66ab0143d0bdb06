"""Plan a recording before training: what it will reproduce, what it costs, and the cheapest that suffices.

Behind ``posthoc-ema plan``. A Recorder with ``snapshot_every=N`` writes every
recorded sigma_rel at t = N, 2N, …; the rows here are those `inspect` prints
for such a folder (the same functions of :mod:`posthoc_cli.ema.quality`), computed from the
schedule alone. numpy only: no torch, no files.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES, choose, unit_roundoff
from ..ema.profiles import check_sigma_rel
from ..ema.quality import FAITHFUL, grid, target_rows
from ..ema.targets import fit_targets, parse_targets
from ..ema.thinning import thin_schedule
from ..ema.trackers import Power, Target
from ..errors import InvalidValueError

# Snapshots per recorded sigma_rel tried by the recommendation, fewest first.
# (The solve grows with the cube of the snapshot count: a hundred per sigma_rel keeps each try fast.)
_COUNTS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 100)
_SCOUT = 16  # a pair further than 10x off the bound at this count is not pursued
_CANDIDATES = tuple(round(float(x), 3) for x in np.geomspace(0.01, 0.28, 10))


def _check_schedule(steps: int, snapshot_every: int) -> list[int]:
    for name, value in (("--steps", steps), ("--snapshot-every", snapshot_every)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise InvalidValueError(f"{name} {value!r} is invalid", "use a whole number ≥ 1")
    if snapshot_every > steps:
        raise InvalidValueError(
            f"--snapshot-every {snapshot_every} is longer than the run ({steps} steps): no snapshot would be written",
            "use a snapshot interval of at most --steps",
        )
    return list(range(snapshot_every, steps + 1, snapshot_every))


def _check_dtype(dtype: str) -> float:
    return unit_roundoff(choose("dtype", dtype, FLOAT_DTYPES))


def schedule_inputs(steps: int, snapshot_every: int, record: Sequence[float]) -> tuple[list[int], list[float], int]:
    """(snapshot times, their sigma_rels, latest time) of a Recorder run with these settings."""
    times = _check_schedule(steps, snapshot_every)
    record = [check_sigma_rel(s) for s in record]
    if not record or len(set(record)) != len(record):
        raise InvalidValueError("--record must name distinct sigma_rels", "e.g. --record 0.05 --record 0.10")
    t_in = [t for t in times for _ in record]
    s_in = [s for _ in times for s in record]
    return t_in, s_in, times[-1]


def plan_report(
    *,
    steps: int,
    snapshot_every: int,
    record: Sequence[float],
    targets: Sequence[str | float | Target] = (),
    params: int | None = None,
    dtype: str = "float32",
    max_snapshots: int | None = None,
    keep_faithful: tuple[float, float] = (0.03, 0.20),
) -> dict[str, Any]:
    """What a recording will reproduce (the `inspect` grid and target rows) and its disk cost.

    With ``max_snapshots``, of the folder a Recorder thinning to that many per sigma_rel
    leaves at the end (the same choices, :func:`posthoc_cli.ema.thinning.thin_schedule`).

    >>> r = plan_report(steps=100_000, snapshot_every=5_000, record=[0.05, 0.10], targets=["beta=0.9999"])
    >>> r["latest_t"], r["snapshots"], r["targets"][0]["faithful"]
    (100000, 40, True)
    """
    unit = _check_dtype(dtype)
    t_in, s_in, t = schedule_inputs(steps, snapshot_every, record)
    if params is not None and (isinstance(params, bool) or params < 1):
        raise InvalidValueError(f"--params {params!r} is invalid", "give the number of averaged parameters, e.g. 125000000")
    written = len(t_in)
    if max_snapshots is not None:
        if isinstance(max_snapshots, bool) or max_snapshots < 2:
            raise InvalidValueError(f"--max-snapshots {max_snapshots!r} is invalid", "use a whole number ≥ 2, e.g. 40")
        t_in, s_in = thin_schedule(t_in, s_in, max_snapshots, keep_faithful)
    files = len(t_in)
    return {
        "steps": steps,
        "snapshot_every": snapshot_every,
        "record": sorted(set(float(s) for s in s_in)),
        "latest_t": t,
        "snapshots": written,
        "max_snapshots": max_snapshots,
        "keep_faithful": list(keep_faithful) if max_snapshots is not None else None,
        "on_disk": files,  # snapshots in the folder at the end (= snapshots unless thinned)
        "dtype": dtype,
        "params": params,
        # tensor bytes only; each file adds a header of a few kB (tensor names and metadata)
        "disk_bytes": None if params is None else files * params * SAFETENSORS_DTYPES[FLOAT_DTYPES[dtype]].itemsize,
        "grid": grid(t_in, s_in, t, unit),
        "targets": target_rows(t_in, s_in, t, targets, unit) if targets else [],
        "faithful_below": FAITHFUL,
    }


def parse_range(text: str, option: str = "--want") -> tuple[float, float]:
    """``"0.03..0.25"`` → (0.03, 0.25), both valid sigma_rels."""
    lo, sep, hi = text.partition("..")
    try:
        a, b = (float(lo), float(hi)) if sep else (float(text), float(text))
    except ValueError:
        raise InvalidValueError(f"{option} {text!r} is not a range", f"write LO..HI, e.g. {option} 0.03..0.25") from None
    for x in (a, b):
        check_sigma_rel(x)
    if a > b:
        raise InvalidValueError(f"{option} {text!r} is empty (low end above high end)", "write LO..HI with LO ≤ HI")
    return a, b


def _wanted(want: tuple[float, float] | None, targets: Sequence[str | float | Target]) -> list[Target]:
    wanted = parse_targets(list(targets))
    if want is not None:
        lo, hi = want
        wanted += [Power(float(s)) for s in (np.geomspace(lo, hi, 9) if hi > lo else [lo])]
    if not wanted:
        raise InvalidValueError("nothing to plan for", "pass --want LO..HI and/or targets (--sigma-rel, --beta, --ema)")
    return wanted


def _worst(record: tuple[float, ...], count: int, steps: int, wanted: list[Target], unit: float) -> float:
    """The largest profile error over the wanted targets (∞ if one is noisy or impossible)."""
    every = steps // count
    t_in, s_in, t = schedule_inputs(steps, every, record)
    try:
        f = fit_targets(t_in, s_in, wanted, t)
    except InvalidValueError:
        return math.inf
    noisy = f.sum_abs_weights * unit > 1e-3
    return math.inf if noisy.any() else float(f.profile_error.max())


def recommend(
    *,
    steps: int,
    want: tuple[float, float] | None = None,
    targets: Sequence[str | float | Target] = (),
    max_error: float = FAITHFUL,
    dtype: str = "float32",
    params: int | None = None,
) -> dict[str, Any]:
    """The cheapest recording (fewest snapshot files: a pair, else a triple of sigma_rels, and the
    largest snapshot interval) whose profile error stays below ``max_error`` for every wanted target.

    The result holds ``record``, ``snapshot_every``, ``snapshots``, ``worst_error`` and the
    :func:`plan_report` of that recording, or ``record: None`` when nothing tried suffices.
    """
    unit = _check_dtype(dtype)
    if not (math.isfinite(max_error) and 0 < max_error < 1):
        raise InvalidValueError(f"--max-error {max_error!r} is out of range", "use a profile error in (0, 1), e.g. 0.01")
    wanted = _wanted(want, targets)
    for target in wanted:  # surface bad targets (a window longer than the run, …) as errors now
        target.norm_sq(steps)
    counts = [c for c in _COUNTS if steps // c >= 1]
    best: tuple[int, float, tuple[float, ...], int] | None = None
    for size, candidates in ((2, _CANDIDATES), (3, _CANDIDATES[::2])):
        for record in itertools.combinations(candidates, size):
            if best is not None and size * counts[0] > best[0]:
                break
            scout = min(_SCOUT, counts[-1])
            if _worst(record, scout, steps, wanted, unit) > 10 * max_error:
                continue
            if _worst(record, counts[-1], steps, wanted, unit) > max_error:
                continue  # not even the densest schedule tried suffices
            lo, hi = 0, len(counts) - 1  # the fewest snapshots that suffice (error falls as they get denser)
            while lo < hi:
                mid = (lo + hi) // 2
                if _worst(record, counts[mid], steps, wanted, unit) <= max_error:
                    hi = mid
                else:
                    lo = mid + 1
            files = size * counts[lo]
            worst = _worst(record, counts[lo], steps, wanted, unit)
            if best is None or (files, worst) < (best[0], best[1]):
                best = (files, worst, record, counts[lo])
        if best is not None:
            break
    if best is None:
        return {"record": None, "max_error": max_error, "wanted": [t.spec for t in wanted]}
    files, worst, record, count = best
    every = steps // count
    report = plan_report(steps=steps, snapshot_every=every, record=record, targets=wanted, params=params, dtype=dtype)
    return {
        "record": list(record),
        "snapshot_every": every,
        "snapshots": files,
        "worst_error": worst,
        "max_error": max_error,
        "wanted": [t.spec for t in wanted],
        "plan": report,
    }


__all__ = ["parse_range", "plan_report", "recommend", "schedule_inputs"]
