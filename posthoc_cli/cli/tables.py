"""The tables ``inspect`` and ``plan`` both print: how faithfully lengths and targets are reproduced."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table

from ..ema.quality import FAITHFUL, POOR
from .common import fmt


def _verdict(row: dict[str, Any]) -> str:
    """faithful, approximate or poor by profile error; noisy when only rounding keeps it from faithful."""
    if row["profile_error"] < FAITHFUL and not row["faithful"]:
        return f"noisy (rounding ~{row['rounding_noise']:.0e})"
    return "faithful" if row["faithful"] else "approximate" if row["profile_error"] < POOR else "poor"


def grid_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per sigma_rel of the grid: profile error and Σ|w| of the best mix of snapshots."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("sigma_rel", "gamma", "profile error", "Σ|w|", ""):
        table.add_column(header, justify="right" if header else "left")
    for row in rows:
        table.add_row(
            f"{row['sigma_rel']:g}", f"{row['gamma']:.2f}", fmt(row["profile_error"], 2),
            f"{row['sum_abs_weights']:.3g}", _verdict(row) + (" (recorded)" if row["recorded"] else ""),
        )
    return table


def targets_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per asked-for target: profile error, Σ|w|, weight on the initial weights, nearest power EMA."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for header in ("target", "profile error", "Σ|w|", "initial", "closest power EMA", ""):
        table.add_column(header, justify="left" if header in ("target", "") else "right")
    for row in rows:
        if "refused" in row:
            table.add_row(escape(row["target"]), "-", "-", "-", "-", escape(f"refused: {row['refused']}"))
            continue
        table.add_row(
            escape(row["target"]), fmt(row["profile_error"], 2), f"{row['sum_abs_weights']:.3g}",
            fmt(row["initial_weight"], 2),
            f"sigma_rel {row['closest_sigma_rel']:.4g} (distance {fmt(row['closest_distance'], 2)})", _verdict(row),
        )
    return table
