"""How faithfully a set of snapshots reproduces targets: the rows of `inspect` and `plan`.

Works from snapshot times and sigma_rels alone (no files, no torch), so a
recording can be judged before it exists (`posthoc-ema plan`) with exactly the
numbers `posthoc-ema inspect` later prints for the real folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .profiles import sigma_rel_to_gamma
from .solve import fit
from .targets import closest_power, fit_targets, parse_targets
from .trackers import Target

FAITHFUL = 1e-2  # profile error below which a synthesized EMA is, for practical purposes, the real one
POOR = 5e-2  # above this, synthesize warns that the target is only a rough approximation
NOISE_BOUND = 1e-3  # relative rounding error we accept in a synthesized tensor before warning


def verdict(error: float, faithful: bool) -> str:
    """The word for a profile error: faithful, approximate or poor."""
    return "faithful" if faithful else "approximate" if error < POOR else "poor"


def _row(error: float, amp: float, unit: float) -> dict[str, Any]:
    noise = amp * unit
    return {
        "profile_error": error,
        "sum_abs_weights": amp,
        "faithful": bool(error < FAITHFUL) and noise <= max(NOISE_BOUND, 2 * unit),
        "rounding_noise": noise,
    }


def grid(t_in: Sequence[float], sigma_rel_in: Sequence[float], t: int, unit: float) -> list[dict[str, Any]]:
    """Profile error and Σ|w| of target lengths 0.01..0.28 (plus the recorded ones) at time ``t``."""
    recorded = sorted(set(sigma_rel_in))
    if len(recorded) == 1:
        targets = recorded  # one recorded length cannot make others (synthesize refuses)
    else:
        targets = sorted({round(0.01 * k, 2) for k in range(1, 29)} | set(recorded))
    result = fit(list(t_in), list(sigma_rel_in), [t] * len(targets), targets)
    return [
        {"sigma_rel": s, "gamma": sigma_rel_to_gamma(s), **_row(float(e), float(a), unit), "recorded": s in recorded}
        for s, e, a in zip(targets, result.profile_error, result.sum_abs_weights)
    ]


def reproduced(t_in: Sequence[float], sigma_rel_in: Sequence[float], t: int) -> tuple[float, float] | None:
    """The shortest and longest sigma_rel of :func:`grid` whose profile error is at most :data:`POOR`
    (None when none is): what a refusal of a poor target offers instead."""
    good = [row["sigma_rel"] for row in grid(t_in, sigma_rel_in, t, 0.0) if row["profile_error"] <= POOR]
    return (min(good), max(good)) if good else None


def target_rows(
    t_in: Sequence[float], sigma_rel_in: Sequence[float], t: int, targets: Sequence[str | float | Target], unit: float
) -> list[dict[str, Any]]:
    """One row per asked-for target: its profile error, Σ|w|, initial weight and nearest power EMA.

    A target that cannot be made at all (mostly initial weights, a window longer
    than the run, …) gets ``"refused"`` with the reason instead of numbers.
    """
    from ..errors import InvalidValueError

    rows: list[dict[str, Any]] = []
    parsed = parse_targets(targets)
    ok: list[tuple[int, Target]] = []
    for target in parsed:
        row: dict[str, Any] = {"target": target.spec, "sigma_rel": target.sigma_rel}
        try:
            initial = target.initial_weight(t)
            row["initial_weight"] = initial
            if initial >= 0.5:
                raise InvalidValueError(f"still {initial:.0%} initial weights at t = {t}", "no mix of snapshots reproduces it")
            row["closest_sigma_rel"], row["closest_distance"] = closest_power(target, t)
            ok.append((len(rows), target))
        except InvalidValueError as e:
            row["refused"] = str(e)
        rows.append(row)
    if ok:
        recorded = set(sigma_rel_in)
        if len(recorded) == 1:  # synthesize refuses anything but the recorded length itself
            for i, target in ok:
                if target.sigma_rel not in recorded:
                    rows[i]["refused"] = "only one sigma_rel was recorded: other targets cannot be synthesized from one"
            ok = [(i, target) for i, target in ok if target.sigma_rel in recorded]
    if ok:
        result = fit_targets(list(t_in), list(sigma_rel_in), [target for _, target in ok], t)
        for (i, _), error, amp in zip(ok, result.profile_error, result.sum_abs_weights):
            rows[i].update(_row(float(error), float(amp), unit))
    return rows


__all__ = ["FAITHFUL", "NOISE_BOUND", "POOR", "grid", "reproduced", "target_rows", "verdict"]
