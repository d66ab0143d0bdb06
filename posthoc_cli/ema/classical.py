"""The classical EMA of constant decay ``beta`` seen as a profile: its exact ``sigma_rel``
after a given number of steps from the initial weights, the inverse, and its half-life and
spread in steps, so a familiar beta can be compared with (and synthesized as) a
power-function EMA. Pure float math, no torch.
"""

from __future__ import annotations

import math
from fractions import Fraction

from ..errors import InvalidValueError, arg
from .profiles import SIGMA_REL_MAX


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise InvalidValueError(f"{name} {value!r} is invalid", "use a whole number ≥ 1")
    return int(value)


def _check_beta(beta: float) -> float:
    b = float(beta)
    if not (math.isfinite(b) and 0.0 < b < 1.0):
        raise InvalidValueError(f"beta {beta!r} is out of range", "use a decay in (0, 1), e.g. 0.999")
    return b


def _age_variance(q: float, n: int) -> float:
    """Var(min(G, n)) in updates, G geometric with P(G = a) = (1 − q) q^a."""
    if q == 0.0 or n == 0:
        return 0.0
    u = 1.0 - q
    if u == 1.0:  # q below float resolution next to 1: Var = q + O(q²)
        return q
    if n * u > 1.0:
        # From E[A] = q(1−x)/u and E[A²] = Σ_{a≤n} (2a−1) q^a with x = q^n:
        # Var = q [(1−x)(1+qx) − 2n u x] / u². Fine while n·u > 1; below, the
        # bracket is ~(nu)³/3 from terms ~nu and cancels catastrophically.
        log_q = math.log1p(-u)
        x = math.exp(n * log_q)
        return q * (-math.expm1(n * log_q) * (1.0 + q * x) - 2.0 * n * u * x) / (u * u)
    # Small n·u: Var = E[A²] − E[A]² as a polynomial in u with exact integer
    # coefficients (E[A] = Σ (1−u)^a expanded by the hockey-stick identity),
    # summed exactly in rationals. Its terms fall like (nu)^k/k!, so 40 suffice
    # (the polynomial has degree 2n: fewer for short runs).
    m, terms = n + 1, min(40, 2 * n + 1)
    e1 = [(-1) ** j * (math.comb(m, j + 1) - (j == 0)) for j in range(terms)]
    e2 = [
        (-1) ** j * (2 * (j + 1) * math.comb(m, j + 2) + (2 * j - 1) * math.comb(m, j + 1) + (j == 0))
        for j in range(terms)
    ]
    u_exact, total, u_pow = Fraction(u), Fraction(0), Fraction(1)
    for k in range(terms):
        total += (e2[k] - sum(e1[i] * e1[k - i] for i in range(k + 1))) * u_pow
        u_pow *= u_exact
    return float(total)


def beta_std_steps(beta: float, update_every: int = 1) -> float:
    """Standard deviation in steps of a long-running constant-beta EMA: k√β/(1−β).

    >>> round(beta_std_steps(0.999), 1)
    999.5
    """
    b, k = _check_beta(beta), _positive_int("update_every", update_every)
    return k * math.sqrt(b) / (1.0 - b)


def beta_half_life(beta: float, update_every: int = 1) -> float:
    """Steps after which a value's weight in a constant-beta EMA has halved: k ln2 / −ln β.

    >>> beta_half_life(0.5)
    1.0
    """
    b, k = _check_beta(beta), _positive_int("update_every", update_every)
    return k * math.log(2.0) / -math.log(b)


def _sigma_rel_of_beta(q: float, steps: int, k: int) -> float:
    # Updates happen at k, 2k, …; after n = ⌊T/k⌋ of them the initial weights
    # keep mass q^n (the truncation). Ages scale by k; a shift does not matter.
    return k * math.sqrt(max(_age_variance(q, steps // k), 0.0)) / steps


def beta_to_sigma_rel(beta: float, steps: int, update_every: int = 1) -> float:
    """Exact ``sigma_rel`` at time ``steps`` of a constant-beta EMA started from the initial weights.

    May exceed :data:`SIGMA_REL_MAX`; no power-function EMA matches such a value.

    >>> round(beta_to_sigma_rel(0.999, 100_000), 4)  # ≈ √β / ((1−β) T)
    0.01
    """
    b = _check_beta(beta)
    return _sigma_rel_of_beta(b, _positive_int("steps", steps), _positive_int("update_every", update_every))


def sigma_rel_to_beta(sigma_rel: float, steps: int, update_every: int = 1) -> float:
    """The smaller beta whose EMA has this ``sigma_rel`` at time ``steps``.

    The inverse of :func:`beta_to_sigma_rel` on its increasing branch.
    As beta → 1 the EMA barely leaves the initial weights and its spread goes
    back to 0, so two betas share each reachable value; this is the smaller.

    >>> beta = sigma_rel_to_beta(0.05, 100_000)
    >>> round(beta_to_sigma_rel(beta, 100_000), 12)
    0.05
    """
    s = float(sigma_rel)
    t, k = _positive_int("steps", steps), _positive_int("update_every", update_every)
    n = t // k

    def spread(q: float) -> float:
        return _sigma_rel_of_beta(q, t, k)

    # Golden-section search for the maximiser over ln(1 − beta); it sits near
    # n(1 − beta) ≈ 1.1 for long runs, at beta = 0.5 for n = 1.
    lo, hi = math.log(1e-4 / max(n, 1)), 0.0
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(90):
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if spread(-math.expm1(x1)) > spread(-math.expm1(x2)):
            hi = x2
        else:
            lo = x1
    beta_peak = -math.expm1((lo + hi) / 2.0)
    peak = spread(beta_peak)
    # The search pins the peak's value only to rounding: accept values a hair above.
    if not (math.isfinite(s) and 0.0 < s <= peak * (1.0 + 1e-12)):
        # The spread peaks near n(1 − beta) ≈ 1; far from it, no float64 beta was close enough to 1.
        if math.isfinite(s) and 0.0 < s < SIGMA_REL_MAX and n * (1.0 - beta_peak) > 10.0:
            raise _beyond_float64(s, t)
        raise InvalidValueError(
            f"sigma_rel {s!r} is not reachable by a constant-beta EMA after {t} steps "
            f"updated every {k}",
            f"choose a value in (0, {peak:.4g}]" if peak > 0 else "train for at least update_every steps",
        )
    # Bisection on the increasing branch (0, beta_peak] down to adjacent floats
    # (200 halvings reach them for any beta above ~1e-45).
    b_lo, b_hi = 0.0, beta_peak
    for _ in range(200):
        mid = 0.5 * (b_lo + b_hi)
        if mid in (b_lo, b_hi):
            break
        if spread(mid) < s:
            b_lo = mid
        else:
            b_hi = mid
    beta = b_hi if abs(spread(b_hi) - s) <= abs(spread(b_lo) - s) else b_lo
    if beta <= 0.0:  # the decay would underflow: an EMA that short is just the latest weights
        raise InvalidValueError(
            f"sigma_rel {s!r} is too small for a constant-beta EMA after {t} steps", "use a larger sigma_rel"
        )
    if abs(spread(beta) - s) > 1e-3 * s:  # adjacent float64 betas straddle it too coarsely
        raise _beyond_float64(s, t)
    return beta


def _beyond_float64(sigma_rel: float, t: int) -> InvalidValueError:
    return InvalidValueError(
        f"sigma_rel {sigma_rel!r} after {t} steps needs a decay closer to 1 than a float64 can hold",
        f"give the training length in coarser units (e.g. per 1,000 steps) or use {arg('update_every')}",
    )


__all__ = ["beta_half_life", "beta_std_steps", "beta_to_sigma_rel", "sigma_rel_to_beta"]
