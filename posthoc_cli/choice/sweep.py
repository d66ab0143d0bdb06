"""A sweep from start to end: its space, its results file and claims, the loop, and what it found.

:func:`sweep` is the Python entry point (candidates synthesized in memory and
given to a function); ``posthoc-ema sweep`` runs the same :class:`~.engine.Engine`
on a command. Both keep their results in the same kind of file, so either can
resume a sweep, and :func:`summarize` turns the finished evaluations into the
rows both print.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..ema.targets import parse_targets
from ..ema.trackers import Target
from ..errors import EvaluationError
from .claims import Claims
from .engine import Engine, Evaluate, Progress
from .evaluators import Evaluator, FunctionEvaluator, identity
from .results import Results, default_path
from .space import Key, Space, build

CLAIM_TIMEOUT = 600.0  # seconds without a sign of life before another process takes over a claim


@dataclass(frozen=True)
class SweepRow:
    """One candidate: its target and time, its metric (the mean over repeats) and how it was made."""

    target: str  # the target's spec, e.g. 'sigma_rel=0.1' or 'beta=0.999'
    sigma_rel: float  # the target's, or that of the closest power EMA
    step: int
    metric: float | None  # the mean over repeats; None when an evaluation failed
    metrics: list[float | None]  # per repeat
    std: float | None  # the standard deviation over repeats (None for one)
    status: str  # "ok" or "failed"
    profile_error: float
    sum_abs_weights: float
    seconds: float  # evaluation time, all repeats together
    error: str | None = None  # the first failure's reason
    refined: bool = False  # placed by the search after the grid

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepResult:
    """What a sweep found: a row per candidate (by time, then sigma_rel) and the best of them."""

    rows: list[SweepRow]
    best: SweepRow | None  # None only when every candidate failed
    results: Path  # the results file
    recorded: list[float]  # the recorded sigma_rels
    bands: dict[int, tuple[float, float]]  # the faithfully reproduced sigma_rels at each time
    maximize: bool = False

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Draw the metric against sigma_rel into a PNG (needs the ``[plot]`` extra)."""
        from ..analysis.plotting import draw_sweep

        return draw_sweep(
            [row.as_dict() for row in self.rows], path, recorded=self.recorded, bands=self.bands,
            best=None if self.best is None else self.best.as_dict(), maximize=self.maximize,
        )

    def document(self) -> dict[str, Any]:
        """The ``--json`` document."""
        best = self.best
        return {
            "results": str(self.results),
            "maximize": self.maximize,
            "best": None if best is None else {k: getattr(best, k) for k in ("target", "sigma_rel", "step", "metric")},
            "rows": [row.as_dict() for row in self.rows],
            "recorded": self.recorded,
            "faithful_band": {str(t): list(band) for t, band in self.bands.items()},
        }


def summarize(space: Space, done: Mapping[Key, Mapping[str, Any]], results: Path) -> SweepResult:
    """The rows of every candidate the sweep evaluated, and the best one."""
    candidates = {c for c, _ in space.evaluations(done)[0]}
    rows = []
    for c in sorted(candidates, key=lambda c: (c.step, c.sigma_rel, c.spec)):
        lines = [done.get(c.key(r)) for r in range(space.repeats)]
        if any(line is None for line in lines):
            continue  # not evaluated (the search stopped before it)
        metrics = [line["metric"] if line and line["status"] == "ok" else None for line in lines]
        ok = all(m is not None for m in metrics)
        values = [m for m in metrics if m is not None]
        failure = next((line["error"] for line in lines if line and line["status"] != "ok"), None)
        rows.append(SweepRow(
            target=c.spec, sigma_rel=c.sigma_rel, step=c.step,
            metric=math.fsum(values) / len(values) if ok else None, metrics=metrics,
            std=statistics.stdev(values) if ok and len(values) > 1 else None,
            status="ok" if ok else "failed", profile_error=c.profile_error, sum_abs_weights=c.sum_abs_weights,
            seconds=round(math.fsum(line["seconds"] for line in lines if line), 3), error=failure, refined=c.refined,
        ))
    scored = [row for row in rows if row.metric is not None]
    sign = -1.0 if space.maximize else 1.0
    best = min(scored, key=lambda row: sign * row.metric) if scored else None  # type: ignore[operator]
    return SweepResult(rows, best, results, space.recorded, dict(space.bands), space.maximize)


def no_success(result: SweepResult) -> EvaluationError:
    first = result.rows[0] if result.rows else None
    what = "no candidate was evaluated" if first is None else (
        f"every evaluation failed; the first, {first.target} at t={first.step}: {first.error}"
    )
    return EvaluationError(what, f"fix the evaluation (each failure's stderr is in {result.results})")


def run(space: Space, results: Path, evaluate: Evaluate, *, claim_timeout: float = CLAIM_TIMEOUT, **options: Any) -> SweepResult:
    """Run a sweep's evaluations (see :class:`~.engine.Engine` for ``options``) and summarize them."""
    claims = Claims(results.with_suffix(".claims"), claim_timeout)
    try:
        done = Engine(space, Results(results), claims, evaluate, **options).run()
    finally:
        with contextlib.suppress(OSError):  # only once empty: other processes may still hold claims
            claims.folder.rmdir()
    return summarize(space, done, results)


def sweep(
    ckpt_dir: str | os.PathLike[str],
    evaluate: Evaluator,
    targets: float | str | Target | Sequence[float | str | Target] | None = None,
    *,
    grid: int = 7,
    refine: int = 3,
    steps: int | Sequence[int] | None = None,
    repeats: int = 1,
    maximize: bool = False,
    results: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> SweepResult:
    """Find the best EMA by your own metric: evaluate candidates synthesized in memory, best first.

    ``evaluate(state_dict, target)`` gets each candidate's complete state dict (as
    :func:`~posthoc_cli.load_synthesized` returns it) and its target, and returns a
    number (lower is better unless ``maximize``). Without ``targets``: ``grid``
    sigma_rels log-spaced across the band the folder reproduces faithfully, plus
    the recorded ones, then ``refine`` more placed by a bracketing search around
    the best. ``steps``: synthesis times (default: the latest complete one);
    ``repeats``: evaluations per candidate (their mean decides). Every evaluation
    is a line of the results file (default ``ckpt_dir/sweeps/<name>.jsonl``, named by the
    function's module and qualified name and by the snapshots: give ``results`` to keep
    apart two evaluators that share a name, such as two lambdas), so calling again
    with the same arguments resumes, and an evaluation that raises becomes a failed row. Raises :class:`~posthoc_cli.errors.EvaluationError` when
    every evaluation failed.

    >>> result = sweep("ckpts", lambda sd, target: val_loss(sd))  # doctest: +SKIP
    >>> result.best.sigma_rel, result.best.metric  # doctest: +SKIP
    (0.134, 0.0123)
    """
    space = build(
        ckpt_dir, parse_targets(targets) if targets is not None else [],
        steps=[steps] if isinstance(steps, int) else steps, grid=grid, refine=refine, repeats=repeats, maximize=maximize,
    )
    path = Path(results) if results is not None else default_path(space.folder, identity(evaluate), space.catalogue.snapshots)
    result = run(space, path, FunctionEvaluator(space.folder, evaluate), inline=True, progress=progress)
    if result.best is None:
        raise no_success(result)
    return result


__all__ = ["CLAIM_TIMEOUT", "SweepResult", "SweepRow", "no_success", "run", "summarize", "sweep"]
