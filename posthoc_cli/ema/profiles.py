"""The math of post-hoc EMA: power-function profiles, their inner products, the
least-squares solve that mixes recorded snapshots into a new EMA, and the
classical constant-beta EMA expressed as a ``sigma_rel``.

Everything follows Karras et al., "Analyzing and Improving the Training Dynamics
of Diffusion Models" (arXiv 2312.02696), Section 3 and Appendix C, re-derived
from the formulas. Pure numpy, float64 throughout, no torch.

A power-function EMA at time ``t`` averages the training trajectory with the
profile p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t]; ``sigma_rel`` is
the profile's standard deviation divided by ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError, arg

SIGMA_REL_MAX: float = 12**-0.5  # sigma_rel of gamma = 0 (a uniform average)
# Below this, sigma_rel⁻² and gamma³ leave float range; such EMAs (gamma ~ 1e100) are no use anyway.
SIGMA_REL_MIN: float = 1e-100

# Relative cut-off for the singular values of the equilibrated Gram matrix
# (lstsq's rcond). Its entries carry ~1e-16 relative rounding; directions below
# ~1e-14 of the largest are that noise, and keeping them turns near-duplicate
# snapshots into huge alternating weights. 1e-12 leaves a 100x margin above the
# noise yet keeps the real fine structure of dense schedules: 2×400 snapshots
# reach 4e-9 and 2×2000 reach 6e-12 (a cut at 1e-11 there made the profile
# error 40x worse). Large weights that remain are reported as Σ|w|.
_RCOND = 1e-12


def _vector(name: str, values: ArrayLike) -> np.ndarray:
    """A 1-D float64 array of finite values (a scalar becomes length 1)."""
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise InvalidValueError(f"{name} has shape {arr.shape}", "pass a 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise InvalidValueError(f"{name} contains NaN or Inf", "pass finite numbers")
    return arr


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise InvalidValueError(f"{name} {value!r} is invalid", "use a whole number ≥ 1")
    return int(value)


# --- power-function profiles ---------------------------------------------------


def check_sigma_rel(sigma_rel: float) -> float:
    """Return ``sigma_rel`` as a float if a power-function EMA can have it.

    >>> check_sigma_rel(0.05)
    0.05
    """
    s = float(sigma_rel)
    if not (math.isfinite(s) and 0.0 < s < SIGMA_REL_MAX):
        raise InvalidValueError(
            f"sigma_rel {s!r} is out of range",
            f"choose a value in (0, {SIGMA_REL_MAX:.4f}); values ≥ 1/√12 have no power-function profile",
        )
    return s


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent ``gamma`` of the power-function profile with this ``sigma_rel``.

    >>> round(sigma_rel_to_gamma(0.10), 2)
    6.94
    """
    s = check_sigma_rel(sigma_rel)
    if s < SIGMA_REL_MIN:
        raise InvalidValueError(f"sigma_rel {s!r} is too small", f"use a value of at least {SIGMA_REL_MIN:g}")
    c = s**-2
    # Eq. 126: gamma is the largest real root of g³ + 7g² + (16 − c)g + (12 − c),
    # i.e. of f(g) = (g+2)²(g+3) − c(g+1). f(0) = 12 − c < 0 in the valid range
    # and f is convex for g > −7/3, so Newton started right of the root (at
    # g = √c, where f > 0) decreases monotonically onto it: we iterate until the
    # sequence stops decreasing, which lands within an ulp or two of the root.
    g = math.sqrt(c)
    for _ in range(200):
        f = ((g + 7.0) * g + (16.0 - c)) * g + (12.0 - c)
        step = f / ((3.0 * g + 14.0) * g + (16.0 - c))
        if not step > 0.0:
            break
        g_next = g - step
        if g_next >= g:
            break
        g = g_next
    return g


def gamma_to_sigma_rel(gamma: float) -> float:
    """``sigma_rel`` of the power-function profile with exponent ``gamma``.

    >>> round(gamma_to_sigma_rel(16.97), 3)
    0.05
    """
    g = float(gamma)
    if not (math.isfinite(g) and g > 0.0):
        raise InvalidValueError(f"gamma {gamma!r} is out of range", "use a finite exponent > 0")
    # Eq. 123: sigma_rel² = (g+1) / ((g+2)² (g+3))
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def update_beta(t: int, t_prev: int, gamma: float) -> float:
    """Decay for the EMA update that brings the time from ``t_prev`` to ``t``.

    Called every training step, so it is plain float math. The first update
    (``t_prev = 0``) has beta = 0: the EMA starts as a copy of the weights.

    >>> update_beta(1, 0, 6.94), update_beta(2, 1, 1.0)
    (0.0, 0.25)
    """
    if not 0 <= t_prev < t:
        raise InvalidValueError(f"update from t_prev={t_prev} to t={t}", "need 0 ≤ t_prev < t")
    # Eq. 127: beta = (1 − Δ/t)^(gamma+1) with Δ = t − t_prev; t_prev/t is the
    # same number without the cancellation of 1 − Δ/t.
    return (t_prev / t) ** (gamma + 1.0)


def profile_dot(t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike) -> np.ndarray:
    """Inner product ∫ p_a p_b of two power profiles; broadcasts like numpy.

    >>> float(profile_dot(100, 1.0, 100, 1.0))  # = (g+1)²/((2g+1) t)
    0.013333333333333334
    """
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    # Eq. 151: (g_a+1)(g_b+1) min^(g_a+g_b+1) / ((g_a+g_b+1) t_a^(g_a+1) t_b^(g_b+1)).
    # Dividing through by max^(g_a+g_b+1) leaves r = t_a/t_b raised to a
    # non-negative power if r < 1, a non-positive one if r ≥ 1: always ≤ 1, so
    # nothing overflows however large t or gamma get (it may underflow to 0).
    m = np.maximum(t_a, t_b)
    r = t_a / t_b
    power = np.where(t_a < t_b, g_b, -g_a)
    return np.asarray((g_a + 1) * (g_b + 1) * r**power / ((g_a + g_b + 1) * m))


def profile_norm_sq(t: ArrayLike, gamma: ArrayLike) -> np.ndarray:
    """Squared norm ∫ p² = (g+1)² / ((2g+1) t), bit-equal to ``profile_dot(t, g, t, g)``.

    >>> float(profile_norm_sq(1.0, 0.5))
    1.125
    """
    return profile_dot(t, gamma, t, gamma)


# --- solving for snapshot weights (Alg. 3) ------------------------------------


def _gammas(sigma_rels: np.ndarray) -> np.ndarray:
    for s in sigma_rels:
        check_sigma_rel(s)
    return np.array([sigma_rel_to_gamma(s) for s in sigma_rels], dtype=np.float64)


def _times(name: str, values: ArrayLike) -> np.ndarray:
    t = _vector(name, values)
    if np.any(t <= 0):
        raise InvalidValueError(f"{name} contains a time ≤ 0", "training times start at 1")
    return t


def _inputs_targets(
    t_in: ArrayLike, sigma_rel_in: ArrayLike, t_out: ArrayLike, sigma_rel_out: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated (t_in, sigma_rel_in, t_out, sigma_rel_out); targets broadcast together."""
    ti, si = _times("t_in", t_in), _vector("sigma_rel_in", sigma_rel_in)
    if ti.shape != si.shape or ti.size == 0:
        raise InvalidValueError(
            f"{ti.size} input times for {si.size} input sigma_rels", "give one (t, sigma_rel) per snapshot"
        )
    to, so = _times("t_out", t_out), _vector("sigma_rel_out", sigma_rel_out)
    try:
        to, so = (np.array(x) for x in np.broadcast_arrays(to, so))
    except ValueError:
        raise InvalidValueError(
            f"{to.size} target times for {so.size} target sigma_rels", "give one time, or one per target"
        ) from None
    return ti, si, to, so


def gram(t_in: np.ndarray, g_in: np.ndarray) -> np.ndarray:
    """A_ij = ⟨p_i, p_j⟩ of the inputs' power profiles.  # => [inputs, inputs]"""
    return profile_dot(t_in[:, None], g_in[:, None], t_in[None, :], g_in[None, :])


def _pseudo_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Q, 1/λ) of the symmetric ``a`` = Q diag(λ) Qᵀ, over the eigenvalues above the cut-off: a⁺ = Q diag(1/λ) Qᵀ."""
    # The least-squares solve of numpy's SVD lstsq, factored once for all
    # targets: for a symmetric matrix the singular values are the |λ|, and the
    # same cut-off (rcond times the largest) gives the minimum-norm solution,
    # so duplicate or nearly identical snapshots stay finite (a direction they
    # do not tell apart gets the equal split). eigh is a few times cheaper than an SVD.
    lam, q = np.linalg.eigh(a)
    keep = np.abs(lam) > _RCOND * np.abs(lam).max()
    return np.ascontiguousarray(q[:, keep]), 1.0 / lam[keep]


def solve_gram(a: np.ndarray, b: np.ndarray, t_r: float) -> np.ndarray:
    """Weights from the Gram matrix ``a`` and the targets' inner products ``b``, columns summing to 1.  # => [inputs, targets]

    Any target works: only b_i = ⟨p_i, p_r⟩ depends on its profile (docs/design.md §6).
    """
    # Symmetric diagonal equilibration: the profiles are rescaled to unit norm,
    # so the diagonal is 1 and entries from different t and gamma are
    # comparable; rcond then measures how close two profiles are, not their size.
    d = 1.0 / np.sqrt(np.diag(a))
    q, inv = _pseudo_inverse(d[:, None] * a * d[None, :])
    q_t = np.ascontiguousarray(q.T)
    w = np.empty(b.shape)
    # One target at a time, by matrix-vector products and a sum over a contiguous
    # vector, whose shapes depend only on the inputs: each column is rounded the
    # same whether it is solved alone or with others (a matrix-matrix product, or
    # a sum down the columns of a matrix, would round it differently).
    for j in range(b.shape[1]):
        col = d * (q @ (inv * (q_t @ (d * b[:, j]))))
        total = col.sum()
        if not (np.all(np.isfinite(col)) and total > 0):  # b underflowed: no overlap left
            raise InvalidValueError(
                f"the snapshots up to t = {t_r:g} cannot represent these targets",
                "record snapshots closer to the target time, or choose a larger sigma_rel",
            )
        w[:, j] = col / total  # profiles have unit mass, so a good fit already has Σw ≈ 1
    return w


def gram_error(a: np.ndarray, b: np.ndarray, rr: np.ndarray, w: np.ndarray) -> np.ndarray:
    """‖p_r − Σ w_i p_i‖ / ‖p_r‖ from A, b and ⟨p_r, p_r⟩.  # => [targets]"""
    # ‖p_r − Σ w_i p_i‖² expanded; rounding can push it slightly below 0.
    sq = rr - 2.0 * (w * b).sum(axis=0) + (w * (a @ w)).sum(axis=0)
    return np.asarray(np.sqrt(np.maximum(sq, 0.0) / rr))


def _solve_group(t_in: np.ndarray, g_in: np.ndarray, t_r: float, g_out: np.ndarray) -> np.ndarray:
    """Weights of the inputs (all with t_i ≤ t_r) for targets at one time.  # => [inputs, targets]"""
    b = profile_dot(t_in[:, None], g_in[:, None], t_r, g_out[None, :])  # => [inputs, targets]
    return solve_gram(gram(t_in, g_in), b, t_r)


def solve_weights(
    t_in: ArrayLike, sigma_rel_in: ArrayLike, t_out: ArrayLike, sigma_rel_out: ArrayLike
) -> np.ndarray:
    """Weights that mix snapshots (t_in, sigma_rel_in) into each target EMA.

    Returns an array ``[inputs, targets]`` whose columns sum to 1. Inputs later
    than a target's time get weight 0. A target equal to an input gets exactly
    that input (a one-hot column), so it is reproduced bit for bit.

    >>> w = solve_weights([1000, 2000, 1000, 2000], [0.05, 0.05, 0.10, 0.10], 2000, 0.10)
    >>> w[:, 0].tolist()
    [0.0, 0.0, 0.0, 1.0]
    """
    ti, si, to, so = _inputs_targets(t_in, sigma_rel_in, t_out, sigma_rel_out)
    gi, go = _gammas(si), _gammas(so)
    w = np.zeros((ti.size, to.size))  # => [inputs, targets]
    for t_r in np.unique(to):
        used = ti <= t_r
        if not used.any():
            raise InvalidValueError(
                f"target time {t_r:g} precedes every snapshot (earliest t = {ti.min():g})",
                "choose a target time at or after the first snapshot",
            )
        cols = np.flatnonzero(to == t_r)
        w[np.ix_(used, cols)] = _solve_group(ti[used], gi[used], float(t_r), go[cols])
    for r in range(to.size):
        same = np.flatnonzero((ti == to[r]) & (si == so[r]))
        if same.size:  # a recorded EMA: copy it exactly (the first of any duplicates)
            w[:, r] = 0.0
            w[same[0], r] = 1.0
    return w


def profile_error(
    t_in: ArrayLike, sigma_rel_in: ArrayLike, weights: ArrayLike, t_out: ArrayLike, sigma_rel_out: ArrayLike
) -> np.ndarray:
    """Relative error ‖p_r − Σ w_i p_i‖ / ‖p_r‖ of each synthesized profile.  # => [targets]

    >>> profile_error([100], [0.1], [[1.0]], 100, 0.1).tolist()
    [0.0]
    """
    ti, si, to, so = _inputs_targets(t_in, sigma_rel_in, t_out, sigma_rel_out)
    gi, go = _gammas(si), _gammas(so)
    w = np.asarray(weights, dtype=np.float64)
    if w.size != ti.size * to.size:
        raise InvalidValueError(
            f"weights of shape {w.shape}", f"expected [inputs, targets] = [{ti.size}, {to.size}]"
        )
    w = w.reshape(ti.size, to.size)  # => [inputs, targets]
    b = profile_dot(ti[:, None], gi[:, None], to[None, :], go[None, :])  # => [inputs, targets]
    return gram_error(gram(ti, gi), b, profile_norm_sq(to, go), w)


@dataclass(frozen=True)
class Fit:
    """Snapshot weights for some targets and how well they match."""

    weights: np.ndarray  # [inputs, targets]
    profile_error: np.ndarray  # [targets]
    sum_abs_weights: np.ndarray  # [targets]


def fit(t_in: ArrayLike, sigma_rel_in: ArrayLike, t_out: ArrayLike, sigma_rel_out: ArrayLike) -> Fit:
    """:func:`solve_weights` plus the profile error and Σ|w| of each target.

    >>> f = fit([1000, 2000, 1000, 2000], [0.05, 0.05, 0.10, 0.10], 2000, 0.08)
    >>> bool(f.profile_error[0] < 0.05), bool(f.sum_abs_weights[0] >= 1)
    (True, True)
    """
    w = solve_weights(t_in, sigma_rel_in, t_out, sigma_rel_out)
    err = profile_error(t_in, sigma_rel_in, w, t_out, sigma_rel_out)
    return Fit(weights=w, profile_error=err, sum_abs_weights=np.abs(w).sum(axis=0))


# --- classical EMA (constant beta) --------------------------------------------


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


__all__ = [
    "SIGMA_REL_MAX",
    "SIGMA_REL_MIN",
    "Fit",
    "beta_half_life",
    "beta_std_steps",
    "beta_to_sigma_rel",
    "check_sigma_rel",
    "fit",
    "gamma_to_sigma_rel",
    "gram",
    "gram_error",
    "profile_dot",
    "profile_error",
    "profile_norm_sq",
    "sigma_rel_to_beta",
    "sigma_rel_to_gamma",
    "solve_gram",
    "solve_weights",
    "update_beta",
]
