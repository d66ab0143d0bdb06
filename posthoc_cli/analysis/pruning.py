"""`posthoc-ema prune`: which snapshots of a folder to remove while a band of EMAs stays within an error.

The choice is :func:`posthoc_cli.ema.thinning.prune`'s, over every snapshot of the
folder but the newest of each series (resuming and the default synthesis time need
those). Files a scan does not count (frozen weights, incomplete or broken sets,
foreign files) are never candidates: they are left alone, and listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..ema.thinning import achievable, check_band, prune, worst_error
from ..errors import CatalogueError, InvalidValueError, arg
from ..format.catalogue import Catalogue
from ..format.snapshot import Skipped, Snapshot


@dataclass(frozen=True)
class PrunePlan:
    """What ``prune`` keeps and removes, the worst error before and after, and the bytes it frees."""

    band: tuple[float, float]
    max_error: float
    times: list[int]
    kept: list[Snapshot]
    removed: list[Snapshot]
    worst_before: float
    worst_error: float
    left_alone: list[Skipped]

    @property
    def bytes_freed(self) -> int:
        return sum(s.nbytes for s in self.removed)


def _left_alone(catalogue: Catalogue) -> list[Skipped]:
    alone = [Skipped(f.path, "frozen weights stored once") for f in catalogue.frozen]
    alone += [Skipped(s.path, f"incomplete: {s.reason}") for s in catalogue.incomplete]
    alone += [Skipped(s.path, f"broken: {s.reason}") for s in catalogue.broken]
    return alone + [Skipped(s.path, s.reason) for s in catalogue.ignored]


def plan_prune(catalogue: Catalogue, band: Sequence[float], max_error: float, at: Sequence[int] = ()) -> PrunePlan:
    """The most snapshots ``catalogue`` can lose with every power EMA in ``band`` within ``max_error``
    at the default synthesis time and at each time in ``at``.

    Raises :class:`CatalogueError` (naming the band the folder does reproduce) when the band
    misses the budget before any removal.
    """
    lo, hi = check_band(band)
    if not 0 < max_error < 1:
        raise InvalidValueError(f"max error {max_error!r} is not in (0, 1)", f"pass e.g. {arg('max_error', 0.01)}")
    snaps = catalogue.snapshots
    first, last = snaps[0].t, catalogue.latest_t
    for t in at:
        if not first <= t <= last:
            raise InvalidValueError(f"time {t} is outside the snapshots' {first}..{last}", f"pass {arg('at')} within it")
    times = sorted({catalogue.complete_t, *at})
    ts, sigma_rels = [s.t for s in snaps], [s.sigma_rel for s in snaps]
    before = worst_error(ts, sigma_rels, (lo, hi), times)
    if before > max_error:
        reach = achievable(ts, sigma_rels, times, max_error)
        where = f"t={times[0]}" if len(times) == 1 else "t=" + ", ".join(map(str, times))
        offer = f"only {reach[0]:g}..{reach[1]:g}" if reach else "no sigma_rel"
        raise CatalogueError(
            f"even before pruning, sigma_rel {lo:g}..{hi:g} misses profile error {max_error:g} at {where} "
            f"(worst {before:.3g}); achievable band: {offer}",
            f"pass {arg('band')} within it, or a larger {arg('max_error')}",
        )
    newest = {id(group[-1]) for group in catalogue.series.values()}
    removable = [id(s) not in newest for s in snaps]
    result = prune(ts, sigma_rels, removable, (lo, hi), times, max_error)
    gone = set(result.removed)
    return PrunePlan(
        band=(lo, hi), max_error=max_error, times=times,
        kept=[s for i, s in enumerate(snaps) if i not in gone], removed=[snaps[i] for i in sorted(gone)],
        worst_before=before, worst_error=result.worst_error, left_alone=_left_alone(catalogue),
    )


__all__ = ["PrunePlan", "plan_prune"]
