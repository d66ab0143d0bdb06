"""Targets of a synthesis: power-function EMAs and every other EMA-like average.

Every EMA a tracker keeps is linear in the training trajectory: a target is a
profile, non-negative weights over training time (docs/design.md §6). A tracker with
per-update decays d_n (ema ← d_n·ema + (1 − d_n)·θ) gives the n-th update the
weight (1 − d_n)·∏_{j>n} d_j and leaves ∏_j d_j on the weights it started from.
An update at step u_n stands for the steps (u_{n−1}, u_n] since the previous
one, as the Recorder's own Δ-aware update does (:mod:`.staircase`).

Spec strings (``parse_target``), parameters named as in each library:

- ``sigma_rel=S`` — a power-function EMA (a bare number means the same);
- ``beta=B[,every=K][,after=S]`` — constant decay, updates at K, 2K, …; the first
  update, and every update at a step ≤ S, is a copy (torch's ``AveragedModel``);
- ``window=W`` — the plain average of the last W steps (SWA, checkpoint averaging);
- ``litema:…``, ``diffusers:…``, ``timm:…``, ``ema-pytorch:…``, ``supergradients:…``.

Time is the folder's training time (optimizer steps by default); the library
forms count one update call per unit of it. Pure numpy, float64; no torch.

>>> t = parse_target("beta=0.999")
>>> round(float(t.dots(10_000, [10_000], [6.94])[0]) * 10_000, 4)  # ⟨p_i, p_r⟩ · t
4.5695
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError, spelled
from .libraries import Diffusers, EmaPytorch, LitEma, SuperGradients, Timm
from .profiles import (
    SIGMA_REL_MAX,
    gamma_to_sigma_rel,
    profile_norm_sq,
    sigma_rel_to_gamma,
)
from .schedules import EXPLICIT_LIMIT, Schedule
from .solve import Fit, gram, gram_error, solve_gram
from .trackers import Classical, Power, Target, Tracked, Window

MOSTLY_INITIAL = 0.5  # a target still holding this much of the initial weights is refused


# --- parsing --------------------------------------------------------------------------------------


_BOOL = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}

# kind → (class, {accepted parameter name: constructor argument}, {argument: type})
_LIBRARIES: dict[str, tuple[type[Tracked], dict[str, str]]] = {
    "litema": (LitEma, {"decay": "decay", "use_num_upates": "use_num_updates", "use_num_updates": "use_num_updates"}),
    "diffusers": (Diffusers, {n: n for n in ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power")}
                  | {"max_value": "decay", "min_value": "min_decay"}),
    "timm": (Timm, {n: n for n in ("decay", "min_decay", "update_after_step", "use_warmup", "warmup_gamma", "warmup_power")}),
    "ema-pytorch": (EmaPytorch, {n: n for n in ("beta", "update_after_step", "update_every", "inv_gamma", "power", "min_value")}),
    "supergradients": (SuperGradients, {n: n for n in ("decay", "decay_type", "beta", "total_steps")}),
}
_BOOLEANS = {"use_num_updates", "use_ema_warmup", "use_warmup"}
_STRINGS = {"decay_type"}
ACCEPTED = (
    "sigma_rel=S · beta=B[,every=K][,after=S] · window=W · "
    + " · ".join(f"{k}:{'|'.join(dict.fromkeys(v[1]))}=…" for k, v in _LIBRARIES.items())
)


def _pairs(spec: str, body: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or not value:
            raise InvalidValueError(f"target {spec!r}: {part!r} is not name=value", f"write e.g. {ACCEPTED}")
        if name in out:
            raise InvalidValueError(f"target {spec!r}: {name} is given twice", "give each parameter once")
        out[name] = value
    return out


def _convert(spec: str, name: str, value: str) -> Any:
    if name in _BOOLEANS:
        if value.lower() not in _BOOL:
            raise InvalidValueError(f"target {spec!r}: {name}={value!r} is not a boolean", "use true or false")
        return _BOOL[value.lower()]
    if name in _STRINGS:
        return value
    try:
        return float(value)
    except ValueError:
        raise InvalidValueError(f"target {spec!r}: {name}={value!r} is not a number", "give a number") from None


def parse_target(target: str | float | Target) -> Target:
    """A target from a sigma_rel, a spec string, or a target (returned as is).

    >>> parse_target(0.1).spec, parse_target("beta=0.999,every=10").spec
    ('sigma_rel=0.1', 'beta=0.999,every=10')
    >>> parse_target("litema:decay=0.999,use_num_upates=false").spec
    'litema:decay=0.999,use_num_updates=false'
    """
    if isinstance(target, Target):
        return target
    if isinstance(target, (int, float, np.floating, np.integer)) and not isinstance(target, bool):
        return Power(float(target))
    if not isinstance(target, str):
        raise InvalidValueError(f"target {target!r} is neither a number nor a spec", f"use one of: {ACCEPTED}")
    spec = target.strip()
    kind, colon, body = spec.partition(":")
    try:
        if colon:
            library = _LIBRARIES.get(kind.strip().lower())
            if library is None:
                raise InvalidValueError(f"target {spec!r}: unknown kind {kind!r}", f"use one of: {ACCEPTED}")
            cls, names = library
            args: dict[str, Any] = {}
            for name, value in _pairs(spec, body).items():
                if name not in names:
                    raise InvalidValueError(
                        f"target {spec!r}: {kind} has no parameter {name!r}",
                        f"{kind} accepts {', '.join(dict.fromkeys(names))}",
                    )
                if names[name] in args:
                    raise InvalidValueError(f"target {spec!r}: {name} is given twice", "give each parameter once")
                args[names[name]] = _convert(spec, names[name], value)
            return cls(**args)
        try:
            return Power(float(spec))
        except ValueError:
            pass
        pairs = _pairs(spec, spec)
        keys = set(pairs)
        if keys == {"sigma_rel"}:
            return Power(_convert(spec, "sigma_rel", pairs["sigma_rel"]))
        if keys == {"window"}:
            return Window(_convert(spec, "window", pairs["window"]))
        if "beta" in keys and keys <= {"beta", "every", "after"}:
            return Classical(**{k: _convert(spec, k, v) for k, v in pairs.items()})
        raise InvalidValueError(f"target {spec!r} is not understood", f"use one of: {ACCEPTED}")
    except InvalidValueError as e:
        if e.what.startswith("target "):
            raise
        what, fix = e.raw
        raise InvalidValueError(f"target {spec!r}: {what}", fix) from None
    except TypeError as e:  # e.g. a missing required argument
        raise InvalidValueError(f"target {spec!r}: {e}", f"use one of: {ACCEPTED}") from None


def parse_targets(targets: str | float | Target | Sequence[str | float | Target]) -> list[Target]:
    """A list of targets from one target or a sequence of them (numbers, specs or targets, mixed)."""
    if isinstance(targets, (str, int, float, Target, np.floating, np.integer)):
        return [parse_target(targets)]
    return [parse_target(t) for t in targets]


def from_options(
    sigma_rels: Sequence[float] | None, betas: Sequence[float] | None, specs: Sequence[str] | None, *, required: bool = True
) -> list[Target]:
    """The targets of the CLI options ``--sigma-rel``, ``--beta`` and ``--ema``, in that order."""
    targets: list[Target] = [Power(s) for s in sigma_rels or ()]
    targets += [_beta(b) for b in betas or ()]
    targets += [parse_target(spec) for spec in specs or ()]
    if required and not targets:
        raise InvalidValueError("no target given", "pass --sigma-rel S, --beta B or --ema SPEC (each repeatable)")
    return targets


def _beta(beta: float) -> Target:
    try:
        return Classical(beta)
    except InvalidValueError as e:
        raise InvalidValueError(f"--beta {beta!r} is out of range", "use a decay in (0, 1), e.g. 0.9999") from e


# --- how close a power EMA comes ------------------------------------------------------------------


def relative_distance(target: Target, t: float, gamma: np.ndarray) -> np.ndarray:
    """‖p_r − p_g‖ / ‖p_r‖ for power profiles of exponents ``gamma`` at time ``t``.  # => [gammas]"""
    g = np.atleast_1d(np.asarray(gamma, dtype=np.float64))
    rr = target.norm_sq(t)
    b = target.dots(t, np.full(g.size, float(t)), g)
    pp = profile_norm_sq(float(t), g)
    return np.sqrt(np.maximum(rr - 2.0 * b + pp, 0.0) / rr)


def closest_power(target: Target, t: float) -> tuple[float, float]:
    """(sigma_rel, relative profile distance) of the power-function EMA at ``t`` closest to the target.

    >>> s, d = closest_power(Power(0.1), 1000)
    >>> round(s, 6), d < 1e-6
    (0.1, True)
    """
    if isinstance(target, Power):
        return target.sigma_rel, 0.0
    grid = np.geomspace(1e-3, 1e6, 181)
    dist = relative_distance(target, t, grid)
    k = int(np.argmin(dist))
    lo, hi = math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, grid.size - 1)])
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):  # golden section on log gamma between the grid neighbours
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        f1, f2 = relative_distance(target, t, np.exp([x1, x2]))
        if f1 < f2:
            hi = x2
        else:
            lo = x1
    g = math.exp((lo + hi) / 2.0)
    best = float(relative_distance(target, t, np.array([g]))[0])
    sigma_rel = min(gamma_to_sigma_rel(g), math.nextafter(SIGMA_REL_MAX, 0.0))
    return sigma_rel, best


# --- the solve -----------------------------------------------------------------------------------


def fit_targets(
    t_in: ArrayLike, sigma_rel_in: ArrayLike, targets: Sequence[str | float | Target], t: float
) -> Fit:
    """Snapshot weights for any targets at time ``t``, their profile errors and Σ|w|.

    The least-squares solve of :func:`~posthoc_cli.ema.solve.fit` (Alg. 3) with b and
    ⟨p_r, p_r⟩ from each target. Inputs later than ``t`` get weight 0; a power
    target equal to an input gets exactly that input.

    >>> f = fit_targets([1000, 2000, 1000, 2000], [0.05, 0.05, 0.10, 0.10], ["beta=0.999", 0.08], 2000)
    >>> f.weights.shape, bool(f.profile_error[1] < 0.05)
    ((4, 2), True)
    """
    ti = np.atleast_1d(np.asarray(t_in, dtype=np.float64))
    si = np.atleast_1d(np.asarray(sigma_rel_in, dtype=np.float64))
    if ti.shape != si.shape or ti.size == 0 or ti.ndim != 1:
        raise InvalidValueError(f"{ti.size} input times for {si.size} input sigma_rels", "give one (t, sigma_rel) per snapshot")
    parsed = parse_targets(targets)
    if not parsed:
        raise InvalidValueError("no target given", f"pass at least one, e.g. {spelled('0.15 or beta=0.999', '--sigma-rel 0.15 or --beta 0.999')}")
    t_r = float(t)
    used = ti <= t_r
    if not used.any():
        raise InvalidValueError(
            f"target time {t_r:g} precedes every snapshot (earliest t = {ti.min():g})",
            "choose a target time at or after the first snapshot",
        )
    gi = np.array([sigma_rel_to_gamma(x) for x in si])
    tu, gu = ti[used], gi[used]
    a = gram(tu, gu)
    b = np.stack([target.dots(t_r, tu, gu) for target in parsed], axis=1)  # => [inputs, targets]
    rr = np.array([target.norm_sq(t_r) for target in parsed])
    w = np.zeros((ti.size, len(parsed)))
    w[used] = solve_gram(a, b, t_r)
    for r, target in enumerate(parsed):
        if isinstance(target, Power):
            same = np.flatnonzero((ti == t_r) & (si == target.sigma_rel))
            if same.size:  # a recorded EMA: copy it exactly (the first of any duplicates)
                w[:, r] = 0.0
                w[same[0], r] = 1.0
    error = gram_error(a, b, rr, w[used])
    return Fit(weights=w, profile_error=error, sum_abs_weights=np.abs(w).sum(axis=0))


def target_name(target: Target) -> str:
    """How messages name a target: ``sigma_rel 0.1`` or its spec."""
    return f"sigma_rel {target.sigma_rel}" if target.sigma_rel is not None else target.spec


def check_initial(target: Target, t: float) -> float:
    """The target's weight on the initial weights; refused (InvalidValueError) when it is most of the target."""
    initial = target.initial_weight(t)
    if initial >= MOSTLY_INITIAL:
        raise InvalidValueError(
            f"{target.spec} at t = {t:g} is still {initial:.0%} initial weights: no mix of snapshots reproduces it",
            "use a smaller decay or a later target time",
        )
    return initial


__all__ = [
    "ACCEPTED",
    "EXPLICIT_LIMIT",
    "MOSTLY_INITIAL",
    "Classical",
    "Diffusers",
    "EmaPytorch",
    "LitEma",
    "Power",
    "Schedule",
    "SuperGradients",
    "Target",
    "Timm",
    "Tracked",
    "Window",
    "check_initial",
    "closest_power",
    "fit_targets",
    "from_options",
    "parse_target",
    "parse_targets",
    "relative_distance",
    "target_name",
]
