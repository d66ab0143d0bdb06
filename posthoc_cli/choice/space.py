"""What a sweep evaluates: its candidates (target × time), each repeated, and the refinement that follows the grid.

A :class:`Space` is built once from the folder's headers (no tensor is read) and
decides every evaluation from the results alone, so every process that runs the
same sweep, on one host or many, proposes the same candidates in the same order,
and a rerun proposes again those of the run it resumes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import unit_roundoff
from ..ema.quality import grid as quality_grid
from ..ema.targets import closest_power
from ..ema.trackers import Power, Target
from ..errors import CatalogueError, InvalidValueError, arg
from ..format.catalogue import Catalogue, no_snapshots, scan
from ..synth.plan import check_time, plan
from .search import faithful_band, log_grid, next_point

Key = tuple[str, int, int]  # (target spec, step, repeat): one evaluation


@dataclass(frozen=True)
class Candidate:
    """One target at one synthesis time, with what the fit says of it."""

    target: Target
    step: int
    sigma_rel: float  # the target's own, or that of the power EMA closest to it
    profile_error: float
    sum_abs_weights: float
    refined: bool = False  # placed by the search, after the grid

    @property
    def spec(self) -> str:
        return self.target.spec

    def key(self, repeat: int) -> Key:
        return (self.spec, self.step, repeat)


@dataclass
class Space:
    """The candidates of one sweep, and how to extend them from results."""

    catalogue: Catalogue
    candidates: list[Candidate]
    repeats: int = 1
    refine: int = 0  # search points still to place after the grid (0 with explicit targets)
    maximize: bool = False
    bands: dict[int, tuple[float, float]] = field(default_factory=dict)  # the faithful band at each step
    _fits: dict[tuple[int, float], Candidate] = field(default_factory=dict, repr=False)  # search points, fitted

    @property
    def folder(self) -> Path:
        return self.catalogue.folder

    @property
    def recorded(self) -> list[float]:
        return sorted(self.catalogue.series)

    def evaluations(
        self, done: Mapping[Key, Mapping[str, Any]], recorded: Mapping[Key, Mapping[str, Any]] | None = None
    ) -> tuple[list[tuple[Candidate, int]], bool]:
        """The evaluations known so far, given the finished ones (``done``), and whether that list is final.

        Grid candidates come first, then the search points: those already in the results
        (``recorded``: every latest line, failures included, in the order first written)
        stay where they are, and each further one is placed once the grid and the points
        before it are all finished (ok or failed), from their mean metrics alone."""
        candidates = list(self.candidates)
        final = True
        if self.refine:
            candidates += self._placed(done if recorded is None else recorded)
            for _ in range(self.refine - (len(candidates) - len(self.candidates))):
                if not all(c.key(r) in done for c in candidates for r in range(self.repeats)):
                    final = False
                    break
                found = self._refinement(candidates, done)
                if found is None:
                    break
                candidates.append(found)
        return [(c, r) for c in candidates for r in range(self.repeats)], final

    def total(self) -> int:
        """How many evaluations the sweep expects (the search may stop early, having converged)."""
        return (len(self.candidates) + self.refine) * self.repeats

    def _placed(self, recorded: Mapping[Key, Mapping[str, Any]]) -> list[Candidate]:
        """The search points the results hold, in the order they were placed."""
        grid = {c.key(0)[:2] for c in self.candidates}
        placed: dict[tuple[str, int], float] = {}
        for (spec, step, _), row in recorded.items():
            if row.get("refined") and step in self.bands and (spec, step) not in grid:
                placed.setdefault((spec, step), float(row["sigma_rel"]))
        return [self._searched(step, s) for (_, step), s in placed.items()]

    def _searched(self, step: int, sigma_rel: float) -> Candidate:
        if (step, sigma_rel) not in self._fits:  # fitted once: the loop asks on every turn
            self._fits[(step, sigma_rel)] = fitted(self.catalogue, [Power(sigma_rel)], step, refined=True)[0]
        return self._fits[(step, sigma_rel)]

    def _refinement(self, candidates: list[Candidate], done: Mapping[Key, Mapping[str, Any]]) -> Candidate | None:
        means = mean_metrics(candidates, done, self.repeats)
        scored = [(c, m if not self.maximize else -m) for c, m in means.items() if m is not None]
        if not scored:
            return None
        step = min(scored, key=lambda cm: cm[1])[0].step
        lo, hi = self.bands[step]
        # Power EMAs inside the band at the best one's time (a recorded length may lie outside it).
        here = [(c, m) for c, m in scored if c.step == step and isinstance(c.target, Power) and lo <= c.sigma_rel <= hi]
        tried = [c.sigma_rel for c in candidates if c.step == step and isinstance(c.target, Power)]
        found = next_point({c.sigma_rel: m for c, m in here}, tried, lo, hi)
        return None if found is None else self._searched(step, found)


def mean_metrics(
    candidates: Sequence[Candidate], done: Mapping[Key, Mapping[str, Any]], repeats: int
) -> dict[Candidate, float | None]:
    """Each candidate's mean metric over its repeats (None unless every repeat succeeded)."""
    means: dict[Candidate, float | None] = {}
    for c in candidates:
        rows = [done.get(c.key(r)) for r in range(repeats)]
        ok = all(row is not None and row["status"] == "ok" for row in rows)
        means[c] = math.fsum(row["metric"] for row in rows if row) / repeats if ok else None
    return means


def fitted(catalogue: Catalogue, targets: Sequence[Target], step: int, *, refined: bool = False, allow_poor: bool = True) -> list[Candidate]:
    """Candidates for ``targets`` at ``step``, with their profile error and Σ|w| (as ``synthesize`` would fit them)."""
    p = plan(catalogue.folder, targets, t=step, allow_poor=allow_poor)
    return [
        Candidate(
            target, step, target.sigma_rel if target.sigma_rel is not None else closest_power(target, step)[0],
            float(p.fit.profile_error[j]), float(p.fit.sum_abs_weights[j]), refined,
        )
        for j, target in enumerate(p.targets)
    ]


def build(
    folder: str | os.PathLike[str],
    targets: Sequence[Target],
    *,
    steps: Sequence[int] | None = None,
    grid: int = 7,
    refine: int = 3,
    repeats: int = 1,
    maximize: bool = False,
    allow_poor: bool = False,
) -> Space:
    """The space of a sweep: the given targets at each step, or (none given) a grid across the faithful
    band plus the recorded sigma_rels, to be refined by ``refine`` search points."""
    for name, value, least in (("grid", grid, 1), ("refine", refine, 0), ("repeats", repeats, 1)):
        if value < least:
            raise InvalidValueError(f"{arg(name, value)} is below {least}", f"pass {arg(name)} {least} or more")
    catalogue = scan(folder)
    catalogue.raise_if_broken()
    if not catalogue.series:
        raise no_snapshots(catalogue.folder, "record some with posthoc_cli.Recorder, or pass the folder it wrote")
    times = sorted(set(steps)) if steps else [catalogue.complete_t]
    space = Space(catalogue, [], repeats=repeats, maximize=maximize)
    for step in times:
        check_time(catalogue, step)  # before the band: beyond the run, "nothing is faithful" would mislead
        band = _band(catalogue, step)
        if band is not None:
            space.bands[step] = band
        if targets:
            space.candidates += fitted(catalogue, targets, step, allow_poor=allow_poor)
            continue
        if band is None:
            raise CatalogueError(
                f"the snapshots in {catalogue.folder} reproduce no sigma_rel faithfully at t={step}",
                "pass targets with --sigma-rel, --beta or --ema, or record longer",
            )
        lengths = sorted(set(log_grid(*band, grid)) | set(space.recorded))
        space.candidates += fitted(catalogue, [Power(s) for s in lengths], step)
    space.refine = 0 if targets else refine
    return space


def _band(catalogue: Catalogue, step: int) -> tuple[float, float] | None:
    snaps = [s for s in catalogue.snapshots if s.t <= step]
    if not snaps:
        return None
    unit = max(unit_roundoff(s.dtype) for s in snaps)
    return faithful_band(quality_grid([s.t for s in snaps], [s.sigma_rel for s in snaps], step, unit))


__all__ = ["Candidate", "Key", "Space", "build", "fitted", "mean_metrics"]
