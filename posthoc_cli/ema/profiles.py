"""Power-function EMA profiles (Karras et al., arXiv 2312.02696, Section 3 and Appendix C).

A power-function EMA at time ``t`` averages the training trajectory with the
profile p(tau) = (gamma+1) tau^gamma / t^(gamma+1) on [0, t]; ``sigma_rel`` is
the profile's standard deviation divided by ``t``. This module converts between
``sigma_rel`` and ``gamma``, gives the decay of each update, and the inner
products of two profiles that the least-squares solve (:mod:`.solve`) is built
on. Re-derived from the paper's formulas; pure numpy, float64, no torch.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError

SIGMA_REL_MAX: float = 12**-0.5  # sigma_rel of gamma = 0 (a uniform average)
# Below this, sigma_rel⁻² and gamma³ leave float range; such EMAs (gamma ~ 1e100) are no use anyway.
SIGMA_REL_MIN: float = 1e-100


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


__all__ = [
    "SIGMA_REL_MAX",
    "SIGMA_REL_MIN",
    "check_sigma_rel",
    "gamma_to_sigma_rel",
    "profile_dot",
    "profile_norm_sq",
    "sigma_rel_to_gamma",
    "update_beta",
]
