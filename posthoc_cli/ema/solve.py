"""The least-squares solve of Alg. 3 (Karras et al., arXiv 2312.02696, Section 3, Appendix C): the
weights that mix recorded power-function snapshots into the profile of a new EMA, and how
far the mix is from that profile. Pure numpy, float64, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError
from .profiles import check_sigma_rel, profile_dot, profile_norm_sq, sigma_rel_to_gamma

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


def drop_costs(a: np.ndarray, b: np.ndarray, rr: np.ndarray) -> np.ndarray:
    """How much leaving input j out raises each target's squared relative profile error.  # => [inputs, targets]

    For the exact least-squares fit, ‖p_r‖²·err² = ⟨p_r,p_r⟩ − bᵀA⁻¹b, and removing input j
    lowers bᵀA⁻¹b by (A⁻¹b)_j² / (A⁻¹)_jj (the block inverse of A): every candidate
    is scored from one factorisation (that of :func:`solve_gram`, equilibrated and cut off
    the same way) instead of one fit per candidate. A ranking, not a result: callers
    judge their choice by the real fit.
    """
    d = 1.0 / np.sqrt(np.diag(a))
    q, inv = _pseudo_inverse(d[:, None] * a * d[None, :])
    w = q @ (inv[:, None] * (q.T @ (d[:, None] * b)))  # => [inputs, targets], equilibrated weights
    diag = np.maximum((q * q) @ inv, np.finfo(np.float64).tiny)  # (Ã⁺)_jj  # => [inputs]
    return np.asarray(w * w / diag[:, None] / rr[None, :])


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


__all__ = ["Fit", "drop_costs", "fit", "gram", "gram_error", "profile_error", "solve_gram", "solve_weights"]
