"""Which snapshots a folder can lose: the fewest-harm removals for a band of sigma_rel.

A band ``[lo, hi]`` of power EMAs, judged at some times, must stay within a profile
error (the number ``inspect`` prints, from :func:`.solve.fit`). Removing a snapshot
can only raise those errors; :func:`drop_one` picks the removal that raises the
worst of them least (what a Recorder with ``max_snapshots`` does at each snapshot),
:func:`prune` removes greedily for as long as the worst stays within a budget
(``posthoc-ema prune``).

Greedy, one removal at a time, because the harm of a removal depends on what is
left: two neighbours may each be redundant, but not both. Each step ranks every
candidate from one factorisation per time (:func:`.solve.drop_costs`, exact for an
exact solve) and then fits the best few for real, so a choice is always judged by
the same profile error ``inspect`` reports. Pure numpy, float64, no torch.

>>> t = [100 * k for k in range(1, 41) for _ in (0, 1)]
>>> s = [0.05, 0.10] * 40
>>> kept = prune(t, s, [k < 78 for k in range(80)], (0.03, 0.2), [4000], 0.01)
>>> bool(kept.worst_error <= 0.01), len(kept.removed)
(True, 18)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError
from .profiles import check_sigma_rel, profile_dot, profile_norm_sq, sigma_rel_to_gamma
from .solve import drop_costs, fit, gram, gram_error, solve_gram

BAND_STEP = 0.005  # the band is judged at this spacing of sigma_rel (and at both ends)
BATCH = 8  # far below the budget, a step removes up to 1/BATCH of what is left
TRIES = 2  # candidates fitted for real at each step, best-ranked first (4 chose no better in the runs measured)


def check_band(band: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` with 0 < lo ≤ hi < 1/√12, as floats."""
    if len(band) != 2:
        raise InvalidValueError(f"band {tuple(band)!r} is not (lo, hi)", "pass two sigma_rels, e.g. (0.03, 0.20)")
    lo, hi = (check_sigma_rel(x) for x in band)
    if lo > hi:
        raise InvalidValueError(f"band {lo:g}..{hi:g} is reversed", f"write it as {hi:g}..{lo:g}")
    return lo, hi


def band_sigma_rels(band: Sequence[float]) -> np.ndarray:
    """The sigma_rels a band is judged at: both ends and every :data:`BAND_STEP` between."""
    lo, hi = check_band(band)
    count = max(2, int(np.ceil((hi - lo) / BAND_STEP)) + 1)
    return np.unique(np.linspace(lo, hi, count))


def errors(t_in: ArrayLike, sigma_rel_in: ArrayLike, sigma_rels: np.ndarray, times: Sequence[int]) -> np.ndarray:
    """Profile error of each of ``sigma_rels`` at each of ``times``, as ``inspect`` computes it.  # => [times, sigma_rels]"""
    return np.array([fit(t_in, sigma_rel_in, [t] * len(sigma_rels), sigma_rels).profile_error for t in times])


def worst_error(t_in: Sequence[float], sigma_rel_in: Sequence[float], band: Sequence[float], times: Sequence[int]) -> float:
    """The largest profile error of the band's power EMAs at any of ``times``."""
    return float(errors(t_in, sigma_rel_in, band_sigma_rels(band), times).max())


def achievable(t_in: Sequence[float], sigma_rel_in: Sequence[float], times: Sequence[int], max_error: float) -> tuple[float, float] | None:
    """The longest run of sigma_rels (0.01 apart, 0.01..0.28) within ``max_error`` at every time, or None."""
    grid = np.round(np.arange(1, 29) * 0.01, 2)
    ok = errors(t_in, sigma_rel_in, grid, times).max(axis=0) <= max_error
    best: tuple[int, int] | None = None
    start = None
    for i, good in enumerate([*ok, False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return None if best is None else (float(grid[best[0]]), float(grid[best[1] - 1]))


def _ranked(t: np.ndarray, g: np.ndarray, kept: np.ndarray, candidates: np.ndarray, band_g: np.ndarray,
            times: Sequence[int]) -> np.ndarray:
    """``candidates`` (indices into t), the least harmful removal first, by the predicted worst squared error."""
    predicted = np.zeros(t.size)
    for time in times:
        used = np.flatnonzero(kept & (t <= time))
        a = gram(t[used], g[used])
        b = profile_dot(t[used][:, None], g[used][:, None], float(time), band_g[None, :])  # => [inputs, band]
        rr = profile_norm_sq(float(time), band_g)
        base = gram_error(a, b, rr, solve_gram(a, b, float(time))) ** 2  # => [band]
        predicted = np.maximum(predicted, base.max())  # removals after this time leave it as it is
        predicted[used] = np.maximum(predicted[used], (base[None, :] + drop_costs(a, b, rr)).max(axis=1))
    return candidates[np.argsort(predicted[candidates], kind="stable")]


def _spread(ranked: np.ndarray, t: np.ndarray, s: np.ndarray, kept: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` of ``ranked``, in order, no two of them neighbours in time in one series."""
    chosen: list[int] = []
    taken: set[int] = set()
    for j in ranked:
        if len(chosen) >= count:
            break
        series = np.flatnonzero(kept & (s == s[j]))
        series = series[np.argsort(t[series], kind="stable")]
        at = int(np.flatnonzero(series == j)[0])
        near = {int(series[i]) for i in (at - 1, at + 1) if 0 <= i < series.size}
        if not near & taken:
            chosen.append(int(j))
            taken.add(int(j))
    return chosen


@dataclass(frozen=True)
class Pruned:
    """What :func:`prune` removes (indices into its inputs, in removal order) and the worst error left."""

    removed: list[int]
    worst_error: float


def drop_one(t_in: Sequence[float], sigma_rel_in: Sequence[float], removable: Sequence[bool], band: Sequence[float],
             times: Sequence[int]) -> tuple[int, float]:
    """The removable input whose removal raises the band's worst error least, and that error."""
    t = np.asarray(t_in, dtype=np.float64)
    s = np.asarray(sigma_rel_in, dtype=np.float64)
    candidates = np.flatnonzero(np.asarray(removable, dtype=bool))
    if candidates.size == 0:
        raise InvalidValueError("no snapshot may be removed", "keep more snapshots")
    g = np.array([sigma_rel_to_gamma(x) for x in s])
    sigma_rels = band_sigma_rels(band)
    kept = np.ones(t.size, dtype=bool)
    ranked = _ranked(t, g, kept, candidates, np.array([sigma_rel_to_gamma(x) for x in sigma_rels]), times)
    return _least_harmful(ranked, t, s, kept, sigma_rels, times)


def _least_harmful(ranked: np.ndarray, t: np.ndarray, s: np.ndarray, kept: np.ndarray, sigma_rels: np.ndarray,
                   times: Sequence[int]) -> tuple[int, float]:
    """Of the ``TRIES`` best-ranked inputs, the one whose removal (alone, from ``kept``) leaves the band's
    smallest worst error, fitted for real; and that error. ``kept`` is left as it was."""
    best, best_error = -1, np.inf
    for j in ranked[:TRIES]:
        kept[j] = False
        err = float(errors(t[kept], s[kept], sigma_rels, times).max())
        kept[j] = True
        if err < best_error:
            best, best_error = int(j), err
    return best, best_error


def thin_schedule(t_in: Sequence[int], sigma_rel_in: Sequence[float], max_snapshots: int,
                  band: Sequence[float]) -> tuple[list[int], list[float]]:
    """The snapshots a Recorder with ``max_snapshots`` keeps of a schedule (written in order of t):
    after each snapshot time, each series above the limit loses :func:`drop_one`'s choice, never its newest."""
    by_time: dict[int, list[float]] = {}
    for t, s in zip(t_in, sigma_rel_in):
        by_time.setdefault(int(t), []).append(float(s))
    kept_t: list[int] = []
    kept_s: list[float] = []
    for t in sorted(by_time):
        kept_t += [t] * len(by_time[t])
        kept_s += by_time[t]
        for series in sorted(set(kept_s)):
            while kept_s.count(series) > max_snapshots:
                newest = max(u for u, x in zip(kept_t, kept_s) if x == series)
                removable = [x == series and u != newest for u, x in zip(kept_t, kept_s)]
                j, _ = drop_one(kept_t, kept_s, removable, band, [t])
                del kept_t[j], kept_s[j]
    return kept_t, kept_s


def prune(t_in: Sequence[float], sigma_rel_in: Sequence[float], removable: Sequence[bool], band: Sequence[float],
          times: Sequence[int], max_error: float) -> Pruned:
    """Remove removable inputs greedily, least harmful first, while the band's worst error at ``times`` stays ≤ ``max_error``.

    Raises :class:`InvalidValueError` when the inputs miss the budget before any removal.
    """
    t = np.asarray(t_in, dtype=np.float64)
    s = np.asarray(sigma_rel_in, dtype=np.float64)
    sigma_rels = band_sigma_rels(band)
    band_g = np.array([sigma_rel_to_gamma(x) for x in sigma_rels])
    g = np.array([sigma_rel_to_gamma(x) for x in s])
    kept = np.ones(t.size, dtype=bool)
    left = np.asarray(removable, dtype=bool).copy()
    worst = float(errors(t, s, sigma_rels, times).max())
    if worst > max_error:
        raise InvalidValueError(f"the snapshots miss profile error {max_error:g} before any removal (worst {worst:.3g})",
                                "choose a narrower band or a larger error")
    removed: list[int] = []
    size = int(left.sum()) // BATCH  # halved whenever a batch overshoots, never grown again
    while left.any():
        ranked = _ranked(t, g, kept, np.flatnonzero(left), band_g, times)
        # Far below the budget, a batch of the best-ranked (no two neighbours in a series) is cheap
        # and safe; close to it, one careful step at a time.
        if size > 1 and worst < max_error / 2:
            batch = _spread(ranked, t, s, kept, size)
            kept[batch] = False
            err = float(errors(t[kept], s[kept], sigma_rels, times).max())
            if err <= max_error / 2:
                left[batch] = False
                removed += batch
                worst = err
                continue
            kept[batch] = True
            size //= 2
            continue
        best, best_error = _least_harmful(ranked, t, s, kept, sigma_rels, times)
        if best_error > max_error:
            break
        kept[best] = left[best] = False
        removed.append(best)
        worst = best_error
    return Pruned(removed, worst)


__all__ = ["BAND_STEP", "Pruned", "achievable", "band_sigma_rels", "check_band", "drop_one", "errors", "prune", "thin_schedule", "worst_error"]
