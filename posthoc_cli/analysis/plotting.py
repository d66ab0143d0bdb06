"""Pictures of what a folder (or a planned recording) can synthesize: ``posthoc-ema plot`` and ``plan --plot``.

:func:`plot_series` computes everything drawn (plain numpy arrays, tested
against the library's own numbers); :func:`draw` and :func:`draw_plan` only
render. matplotlib is optional (``pip install 'posthoc-ema[plot]'``) and is
imported here alone, on use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import unit_roundoff
from ..ema.quality import FAITHFUL, grid, target_rows
from ..ema.targets import fit_targets, parse_targets
from ..ema.trackers import Target
from ..errors import InvalidValueError, PosthocError

PLOT_MAX_STEPS = 5_000_000  # profiles over time are drawn step by step (then binned) up to here
_BINS = 1500


class MissingExtraError(PosthocError):
    """An optional dependency is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(
            "plotting needs matplotlib, which is not installed", "pip install 'posthoc-ema[plot]'"
        ) from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _binned(x: np.ndarray, width: int) -> np.ndarray:
    """Mean of consecutive runs of ``width`` values (the last run may be shorter)."""
    if width == 1:
        return x
    edges = np.arange(0, x.size, width)
    return np.add.reduceat(x, edges) / np.diff(np.append(edges, x.size))


def plot_series(
    t_in: Sequence[int], sigma_rel_in: Sequence[float], t: int, targets: Sequence[str | float | Target], dtype: str = "float32"
) -> dict[str, Any]:
    """Everything :func:`draw` plots, from snapshot times and sigma_rels.

    ``profiles``: per target, the step times (bin centres), its weight per step
    and the reconstruction Σ w_i p_i from the snapshots (binned alike), the
    profile error; ``snapshot_times``; ``grid`` and ``targets``: the rows of
    ``inspect`` (profile error against sigma_rel; each target placed at the
    sigma_rel of the power EMA closest to it).
    """
    if t > PLOT_MAX_STEPS:
        raise InvalidValueError(
            f"t = {t:,} is beyond what plot draws step by step ({PLOT_MAX_STEPS:,})",
            "use `posthoc-ema inspect` for the numbers",
        )
    parsed = parse_targets(list(targets))
    used = [(ti, si) for ti, si in zip(t_in, sigma_rel_in) if ti <= t]
    ti = np.array([u[0] for u in used], dtype=np.float64)
    si = np.array([u[1] for u in used], dtype=np.float64)
    unit = unit_roundoff(dtype)
    result = fit_targets(ti, si, parsed, t) if parsed else None
    steps = np.arange(1, t + 1, dtype=np.float64)
    width = max(1, -(-t // _BINS))
    centres = _binned(steps, width)
    profiles = []
    from ..ema.profiles import sigma_rel_to_gamma

    gammas = np.array([sigma_rel_to_gamma(s) for s in si])
    for j, target in enumerate(parsed):
        assert result is not None
        weights, _ = target.step_weights(t)
        recon = np.zeros(t)
        for i in np.flatnonzero(result.weights[:, j]):
            k = steps[: int(ti[i])]
            s = gammas[i] + 1.0
            with np.errstate(divide="ignore"):  # k = 1: log1p(−1) = −inf gives the exact (1/t_i)^s
                recon[: k.size] += result.weights[i, j] * np.power(k / ti[i], s) * -np.expm1(s * np.log1p(-1.0 / k))
        profiles.append(
            {
                "target": target.spec,
                "steps": centres,
                "weight": _binned(weights, width),
                "reconstruction": _binned(recon, width),
                "profile_error": float(result.profile_error[j]),
            }
        )
    return {
        "t": t,
        "snapshot_times": sorted(set(ti.tolist())),
        "recorded": sorted(set(si.tolist())),
        "profiles": profiles,
        "grid": grid(ti.tolist(), si.tolist(), t, unit),
        "targets": target_rows(ti.tolist(), si.tolist(), t, parsed, unit) if parsed else [],
        "faithful_below": FAITHFUL,
    }


def _error_panel(ax: Any, series: dict[str, Any], title: str) -> None:
    rows = series["grid"]
    x = [r["sigma_rel"] for r in rows]
    y = [max(r["profile_error"], 1e-6) for r in rows]
    ax.plot(x, y, "-o", ms=3, color="tab:blue", label="power-function EMA")
    ax.axhspan(1e-6, FAITHFUL, color="tab:green", alpha=0.12, label=f"faithful (< {FAITHFUL:g})")
    for k, s in enumerate(series["recorded"]):
        ax.axvline(s, color="tab:gray", ls="--", lw=1, label="recorded sigma_rel" if k == 0 else None)
    placed = [r for r in series["targets"] if "refused" not in r and r.get("sigma_rel") is None]
    if placed:
        ax.scatter([r["closest_sigma_rel"] for r in placed], [max(r["profile_error"], 1e-6) for r in placed],
                   marker="*", s=120, color="tab:red", zorder=3, label="other targets (at closest sigma_rel)")
        for r in placed:
            ax.annotate(r["target"], (r["closest_sigma_rel"], max(r["profile_error"], 1e-6)), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sigma_rel (EMA width / training time)")
    ax.set_ylabel("profile error (relative L2; 0 at 1e-6)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def draw(series: dict[str, Any], out: str | os.PathLike[str], *, time_unit: str = "step") -> Path:
    """Draw (a) each target's profile and its reconstruction, (b) profile error vs sigma_rel; save a PNG."""
    plt = _pyplot()
    n = len(series["profiles"])
    fig, axes = plt.subplots(n + 1, 1, figsize=(9, 2.7 * (n + 1) + 0.5), squeeze=False)
    for ax, p in zip(axes[:n, 0], series["profiles"]):
        ax.plot(p["steps"], p["weight"], color="black", lw=1.6, label="target profile")
        ax.plot(p["steps"], p["reconstruction"], color="tab:orange", lw=1.2, ls="--",
                label=f"from snapshots (profile error {p['profile_error']:.2g})")
        for k, s in enumerate(series["snapshot_times"]):
            ax.axvline(s, color="tab:gray", lw=0.5, alpha=0.5, label="snapshot times" if k == 0 else None)
        ax.set_title(f"{p['target']} at t = {series['t']:,}")
        ax.set_xlabel(f"training time ({time_unit}s)")
        ax.set_ylabel(f"weight per {time_unit}")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(True, alpha=0.3)
    _error_panel(axes[n, 0], series, f"What the snapshots can synthesize at t = {series['t']:,}")
    fig.tight_layout()
    return _save(fig, plt, out)


def draw_plan(report: dict[str, Any], out: str | os.PathLike[str]) -> Path:
    """Draw profile error vs sigma_rel for a planned recording (``posthoc-ema plan --plot``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    series = {"grid": report["grid"], "recorded": report["record"], "targets": report["targets"]}
    title = (f"Planned: sigma_rel {', '.join(f'{s:g}' for s in report['record'])} every "
             f"{report['snapshot_every']:,} steps, synthesis at t = {report['latest_t']:,}")
    _error_panel(ax, series, title)
    fig.tight_layout()
    return _save(fig, plt, out)


def check_plotting() -> None:
    """Raise :class:`MissingExtraError` now if matplotlib is missing (before hours of work that ends in a plot)."""
    _pyplot()


def draw_sweep(
    rows: Sequence[dict[str, Any]],
    out: str | os.PathLike[str],
    *,
    recorded: Sequence[float],
    bands: dict[int, tuple[float, float]],
    best: dict[str, Any] | None,
    maximize: bool = False,
) -> Path:
    """Draw a sweep's metric against sigma_rel (log x), one curve per synthesis time, with error bars
    over repeats, the recorded sigma_rels and the faithful band marked and the best starred."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.6))
    steps = sorted({row["step"] for row in rows})
    for step in steps:
        ok = sorted((r for r in rows if r["step"] == step and r["metric"] is not None), key=lambda r: r["sigma_rel"])
        ax.errorbar([r["sigma_rel"] for r in ok], [r["metric"] for r in ok], yerr=[r["std"] or 0.0 for r in ok],
                    fmt="-o", ms=4, capsize=3, label=f"t = {step:,}" if len(steps) > 1 else "metric")
        failed = [r for r in rows if r["step"] == step and r["metric"] is None]
        for r in failed:
            ax.axvline(r["sigma_rel"], color="tab:red", lw=0.8, ls=":", alpha=0.7)
    for k, (lo, hi) in enumerate(sorted(set(bands.values()))):
        ax.axvspan(lo, hi, color="tab:green", alpha=0.08, label="faithful band" if k == 0 else None)
    for k, s in enumerate(recorded):
        ax.axvline(s, color="tab:gray", ls="--", lw=1, label="recorded sigma_rel" if k == 0 else None)
    if best is not None:
        ax.scatter([best["sigma_rel"]], [best["metric"]], marker="*", s=260, color="tab:red", zorder=4,
                   label=f"best: {best['target']} at t = {best['step']:,}")
    ax.set_xscale("log")
    ax.set_xlabel("sigma_rel (EMA width / training time)")
    ax.set_ylabel(f"metric ({'higher' if maximize else 'lower'} is better)")
    ax.set_title("Sweep: the metric of each synthesized EMA")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, out)


def _save(fig: Any, plt: Any, out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    temp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(temp, dpi=110, format="png")  # complete before it takes the name: no partial file
        os.replace(temp, path)
    finally:
        plt.close(fig)
        temp.unlink(missing_ok=True)
    return path


__all__ = ["PLOT_MAX_STEPS", "MissingExtraError", "check_plotting", "draw", "draw_plan", "draw_sweep", "plot_series"]
