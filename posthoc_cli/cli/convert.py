"""``posthoc-ema beta-to-sigma`` and ``sigma-to-beta``: a classical EMA's decay and sigma_rel, either way.

A constant-beta EMA spans a fixed number of steps, sigma_rel a fraction of the
run, so each translation needs the training length; the arithmetic is
:mod:`posthoc_cli.ema.profiles`'s. No snapshot folder, no torch.
"""

from __future__ import annotations

import math
import sys
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from ..ema.classical import (
    beta_half_life,
    beta_std_steps,
    beta_to_sigma_rel,
    sigma_rel_to_beta,
)
from ..ema.profiles import (
    SIGMA_REL_MAX,
    SIGMA_REL_MIN,
    check_sigma_rel,
    sigma_rel_to_gamma,
)
from ..ema.targets import MOSTLY_INITIAL, closest_power
from ..ema.trackers import Classical
from .common import app, fail, print_json, say, stdout, user_errors


def _classical(beta: float, steps: int, update_every: int) -> tuple[float, float, bool]:
    """(sigma_rel, weight left on the initial weights, whether a power-function EMA can match it)."""
    sigma_rel = beta_to_sigma_rel(beta, steps, update_every)
    initial = beta ** (steps // update_every)
    return sigma_rel, initial, SIGMA_REL_MIN <= sigma_rel < SIGMA_REL_MAX and initial < MOSTLY_INITIAL


def _unreachable(sigma_rel: float, initial: float) -> str:
    if initial >= MOSTLY_INITIAL:
        return f"the EMA is still {initial:.0%} initial weights: no power-function EMA matches it"
    if sigma_rel < SIGMA_REL_MIN:
        return f"sigma_rel {sigma_rel:.4g} < {SIGMA_REL_MIN:g}: the latest weights, shorter than any power-function EMA"
    return f"sigma_rel {sigma_rel:.4g} ≥ 1/√12 = {SIGMA_REL_MAX:.4f}: no power-function EMA is that long"


@app.command(
    "beta-to-sigma",
    epilog="Examples:  posthoc-ema beta-to-sigma 0.999   |   posthoc-ema beta-to-sigma 0.9999 --steps 100000",
)
def beta_to_sigma(
    beta: Annotated[float, typer.Argument(metavar="BETA", help="Decay of a classical EMA, in (0, 1), e.g. 0.999.")],
    steps: Annotated[
        int | None, typer.Option("--steps", "-T", min=1, help="Training length T; prints the sigma_rel alone.")
    ] = None,
    update_every: Annotated[int, typer.Option("--update-every", "-k", min=1, help="The EMA is updated every k steps.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document instead.")] = False,
) -> None:
    """Translate a classical EMA decay (beta) into the sigma_rel of post-hoc EMA.

    A constant-beta EMA averages over a fixed number of steps; sigma_rel is that
    width relative to the training length, so the answer depends on T. With
    --steps T only the number is printed on stdout (exact, including the weight
    the EMA still gives the initial weights). Lengths no power-function EMA can
    have (sigma_rel ≥ 1/√12, or an EMA that is still mostly its initial weights)
    are reported on stderr with exit code 1 instead. Without --steps a table
    for several training lengths is printed, with the half-life and the standard
    deviation of the EMA in steps. Equal standard deviation is not equal shape:
    the power-function EMA closest in profile (to the EMA as torch's AveragedModel
    keeps it, the first update a copy) is printed too, on stderr with --steps.
    """
    with user_errors():
        half_life, std = beta_half_life(beta, update_every), beta_std_steps(beta, update_every)
        if steps is not None:
            sigma_rel, initial, ok = _classical(beta, steps, update_every)
            if not ok:
                too_short = sigma_rel < SIGMA_REL_MIN  # the other failures are EMAs too long for the run
                raise fail(f"beta {beta} after {steps} steps: {_unreachable(sigma_rel, initial)} — "
                           f"use {'a larger beta or a shorter run' if too_short else 'a smaller beta or a longer run'}", 1)
            closest, distance = closest_power(Classical(beta, update_every), steps)
            if as_json:
                print_json({"beta": beta, "steps": steps, "update_every": update_every, "sigma_rel": sigma_rel,
                       "initial_weight": initial, "closest_sigma_rel": closest, "profile_distance": distance})
                return
            say(f"closest power-function EMA in profile: sigma_rel {closest:.6g} (relative profile distance {distance:.2g})")
            sys.stdout.write(f"{sigma_rel:.6g}\n")
            return
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for header in ("training length T", "sigma_rel", "gamma", "closest in profile", ""):
            table.add_column(header, justify="right" if header else "left")
        first = max(2, int(math.floor(math.log10(std))))
        rows: list[dict[str, Any]] = []
        for exponent in range(first, first + 5):  # every row is computed before anything is printed
            t = 10**exponent
            if t < update_every:
                continue
            sigma_rel, initial, ok = _classical(beta, t, update_every)
            row: dict[str, Any] = {"steps": t, "sigma_rel": sigma_rel if ok else None, "initial_weight": initial}
            if ok:
                row["closest_sigma_rel"], row["profile_distance"] = closest_power(Classical(beta, update_every), t)
                table.add_row(f"{t:,}", f"{sigma_rel:.4g}", f"{sigma_rel_to_gamma(sigma_rel):.2f}",
                              f"{row['closest_sigma_rel']:.4g} (distance {row['profile_distance']:.2g})", "")
            else:
                row["problem"] = _unreachable(sigma_rel, initial)
                table.add_row(f"{t:,}", "-", "-", "-", row["problem"])
            rows.append(row)
        if as_json:
            print_json({"beta": beta, "update_every": update_every, "half_life": half_life, "std_steps": std, "rows": rows})
            return
        console = stdout()
        every = "every step" if update_every == 1 else f"every {update_every} steps"
        console.print(f"Classical EMA with beta = {beta!r}, updated {every}")
        console.print(f"  half-life {half_life:,.1f} steps; standard deviation of its profile {std:,.1f} steps\n")
        console.print(table)
        console.print(
            "\nsigma_rel is relative to the training length: the same beta is a relatively longer EMA in a "
            "shorter run. Pass --steps T for the value at your T alone."
        )


@app.command("sigma-to-beta", epilog="Example:  posthoc-ema sigma-to-beta 0.10 --steps 100000")
def sigma_to_beta(
    sigma_rel: Annotated[float, typer.Argument(metavar="SIGMA_REL", help="Post-hoc EMA length, in (0, 0.2887).")],
    steps: Annotated[int, typer.Option("--steps", "-T", min=1, help="Training length T.")],
    update_every: Annotated[int, typer.Option("--update-every", "-k", min=1, help="The EMA is updated every k steps.")] = 1,
) -> None:
    """Find the classical EMA decay (beta) that has this sigma_rel after T steps.

    The inverse of beta-to-sigma: prints only the number, so scripts can use it.
    Of the two decays with the same spread it gives the one that has forgotten
    the initial weights (the smaller).
    """
    with user_errors():
        check_sigma_rel(sigma_rel)
        sys.stdout.write(f"{sigma_rel_to_beta(sigma_rel, steps, update_every)!r}\n")  # repr: exact round trip
