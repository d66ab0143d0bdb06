"""Where to evaluate: the band a folder reproduces faithfully, a log-spaced grid across it,
and the next point of a bracketing search for the best sigma_rel.

Pure arithmetic on sigma_rels and metrics (lower is better here; the caller negates
a metric to maximize). The search works in log sigma_rel, where EMA lengths are
naturally spaced (the paper's own sweeps are geometric) and the quality curve is
close to a parabola around its optimum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.382: the golden-section fraction of an interval
TOLERANCE = 2e-3  # in log sigma_rel (0.2 %): closer points are the same EMA for any metric


def faithful_band(rows: Sequence[Mapping[str, Any]]) -> tuple[float, float] | None:
    """The shortest and longest sigma_rel of ``inspect``'s grid rows marked faithful (None when none is)."""
    good = [float(row["sigma_rel"]) for row in rows if row["faithful"]]
    return (min(good), max(good)) if good else None


def rounded(x: float, digits: int = 3) -> float:
    """``x`` to ``digits`` significant digits: names and placeholders stay short (0.0723, not 0.07231942…)."""
    return float(f"{x:.{digits}g}")


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` sigma_rels log-spaced from ``lo`` to ``hi`` (both included; the middle one when ``n`` is 1)."""
    if n == 1 or hi <= lo:
        return [rounded(math.sqrt(lo * hi))]
    ratio = hi / lo
    return sorted({min(max(rounded(lo * ratio ** (k / (n - 1))), lo), hi) for k in range(n)})


def next_point(
    scores: Mapping[float, float], tried: Iterable[float], lo: float, hi: float
) -> float | None:
    """The next sigma_rel to evaluate, in ``[lo, hi]``, or None when the search has converged.

    ``scores``: sigma_rel → metric (lower is better) of the candidates evaluated so
    far; ``tried``: every sigma_rel evaluated, failed ones included (never proposed
    again). The best point and its neighbours bracket the optimum. Through the three,
    a parabola's vertex is tried first (one step lands near a smooth optimum); when
    it falls outside the bracket, on a point already tried, or the best lies at an
    edge of the band, the golden-section point of the wider side is taken instead,
    which shrinks the bracket by a fixed fraction whatever the curve.
    """
    points = sorted((math.log(s), m) for s, m in scores.items() if math.isfinite(m))
    if not points:
        return None
    i = min(range(len(points)), key=lambda k: points[k][1])
    best = points[i][0]
    a = points[i - 1][0] if i > 0 else math.log(lo)
    b = points[i + 1][0] if i + 1 < len(points) else math.log(hi)
    seen = [math.log(s) for s in tried]

    def fresh(x: float | None) -> float | None:
        if x is None or not a < x < b:
            return None
        s = min(max(rounded(math.exp(x), 4), lo), hi)
        return s if all(abs(math.log(s) - y) > TOLERANCE for y in seen) else None

    if 0 < i < len(points) - 1:
        found = fresh(_vertex(points[i - 1], points[i], points[i + 1]))
        if found is not None:
            return found
    wider = a if best - a > b - best else b
    return fresh(best + GOLDEN * (wider - best))


def _vertex(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]) -> float | None:
    """The x of the minimum of the parabola through three points (None when it opens downwards)."""
    (x1, y1), (x2, y2), (x3, y3) = p, q, r
    num = (x2 - x1) ** 2 * (y2 - y3) - (x2 - x3) ** 2 * (y2 - y1)
    den = (x2 - x1) * (y2 - y3) - (x2 - x3) * (y2 - y1)
    if den >= 0:  # concave or flat: no minimum between the points
        return None
    return x2 - 0.5 * num / den


__all__ = ["GOLDEN", "TOLERANCE", "faithful_band", "log_grid", "next_point", "rounded"]
