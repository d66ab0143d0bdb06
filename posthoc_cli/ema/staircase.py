"""Inner products of a per-update (staircase) profile with power-function profiles.

A tracker that folds the weights in at update times u_1 < u_2 < … gives the
n-th update a weight w_n, and the Recorder's time model (docs/design.md §1, Eq. 127)
lets that update stand for the interval (u_{n-1}, u_n] (u_0 = 0): the profile
is the staircase q(τ) = w_n / ℓ_n there, ℓ_n = u_n − u_{n-1}. Its inner product
with the power profile p_i of a snapshot (t_i, gamma_i), s = gamma_i + 1, is

    ⟨p_i, q⟩ = Σ_n (w_n/ℓ_n) · [G_i(u_n) − G_i(u_{n-1})],  G_i(x) = (min(x, t_i)/t_i)^s,

which for a per-step target is Σ_k c_k · ∫_{k-1}^{k} p_i, exactly the weight the
Recorder's update puts on step k. Two kinds of stretch are summed here:

- a short, arbitrary stretch: term by term (numpy, no Python loop over steps);
- a long stretch of constant decay D every K steps (weights (1−D) D^(N−n)):
  by the Euler–Maclaurin formula, with the integral by Gauss–Legendre panels and
  the first and last terms summed exactly, so T = 1e9 costs as little as T = 1e3.

Pure numpy, float64.
"""

from __future__ import annotations

import numpy as np

_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(8)
_HEAD = 48  # terms summed exactly next to the snapshot time (and at least this many at the far end)
_DROP = 60.0  # terms below e^-60 of the largest are left out (far below float64 resolution of the sum)
_CHUNK = 1 << 21  # elements per vectorised block
_NEGLIGIBLE_PAIR = 1e-20  # a whole sum this far below the largest of its call is left out


def _steps(y: np.ndarray, kap: np.ndarray, s: np.ndarray) -> np.ndarray:
    """y^s − (y − κ)^s for y ≥ κ > 0, without cancellation."""
    with np.errstate(divide="ignore", invalid="ignore", under="ignore", over="ignore"):
        # κ/y is 1 at the start of training; rounding of y may push it a hair above
        out = np.power(y, s) * -np.expm1(s * np.log1p(-np.minimum(kap / y, 1.0)))
    return np.where(y > 0, out, 0.0)


def explicit_dots(
    u_prev: np.ndarray, u: np.ndarray, density: np.ndarray, t_in: np.ndarray, s_in: np.ndarray
) -> np.ndarray:
    """Σ_n density_n [G_i(u_n) − G_i(u_prev_n)] for every snapshot i, term by term.  # => [inputs]"""
    out = np.zeros(t_in.size)
    if u.size == 0:
        return out
    per = max(1, _CHUNK // max(t_in.size, 1))
    for start in range(0, u.size, per):
        up, uu, d = (x[start : start + per, None] for x in (u_prev, u, density))
        hi = np.minimum(uu, t_in[None, :]) / t_in[None, :]
        lo = np.minimum(up, t_in[None, :]) / t_in[None, :]
        with np.errstate(under="ignore"):
            # hi^s − lo^s = hi^s (1 − (lo/hi)^s): no cancellation when lo is close to hi
            ratio = np.where(hi > 0, lo / np.where(hi > 0, hi, 1.0), 0.0)
            with np.errstate(divide="ignore"):
                diff = np.power(hi, s_in[None, :]) * -np.expm1(s_in[None, :] * np.log(np.where(ratio > 0, ratio, 1.0)))
            diff = np.where(ratio > 0, diff, np.power(hi, s_in[None, :]))
        out += (d * diff).sum(axis=0)
    return out


def _terms(v0: np.ndarray, kap: np.ndarray, s: np.ndarray, lam: np.ndarray, j: np.ndarray) -> np.ndarray:
    """e^{−λ j} [(v0 − jκ)^s − (v0 − (j+1)κ)^s]; j broadcasts against the per-pair columns."""
    # _steps with the exponential folded into y^s = e^{s log y}: millions of nodes, so one
    # transcendental and a few temporaries fewer per node count
    y = v0 - j * kap
    with np.errstate(divide="ignore", invalid="ignore", under="ignore", over="ignore"):
        out = np.log1p(-np.minimum(kap / y, 1.0))
        out *= s
        out = np.expm1(out, out=out)
        big = np.log(y)
        big *= s
        big -= lam * j
        out *= -np.exp(big, out=big)
    return np.where(y > 0, out, 0.0)


def _exact_range(
    v0: np.ndarray, kap: np.ndarray, s: np.ndarray, lam: np.ndarray, j0: np.ndarray, j1: np.ndarray
) -> np.ndarray:
    """Σ_{j0 ≤ j < j1} of the terms, per pair (bounds may differ), term by term.  # => [pairs]"""
    out = np.zeros(v0.size)
    count = np.maximum(j1 - j0, 0).astype(np.int64)
    ends = np.cumsum(count)
    start = 0
    while start < v0.size:
        # a block of pairs with about _CHUNK terms in all, laid out flat (no padding to the longest)
        stop = max(int(np.searchsorted(ends, ends[start] - count[start] + _CHUNK, side="right")), start + 1)
        c = count[start:stop]
        pair = np.repeat(np.arange(start, stop), c)
        j = j0[pair] + (np.arange(pair.size) - np.repeat(np.cumsum(c) - c, c))
        t = _terms(v0[pair], kap[pair], s[pair], lam[pair], j)
        out[start:stop] = np.bincount(pair - start, weights=t, minlength=stop - start)
        start = stop
    return out


def _derivatives(
    v0: np.ndarray, kap: np.ndarray, s: np.ndarray, lam: np.ndarray, x: np.ndarray, order: int
) -> np.ndarray:
    """f, f', …, f^(order) of f(x) = e^{−λx} [(v0 − xκ)^s − (v0 − (x+1)κ)^s].  # => [order+1, pairs]"""
    k = np.arange(order + 1, dtype=np.float64)[:, None]
    # h = (v0 − xκ)^s − (v0 − (x+1)κ)^s: h^(k) = (−κ)^k (s)_k [y^{s−k} − (y−κ)^{s−k}], (s)_k the falling factorial
    falling = np.cumprod(np.concatenate([np.ones((1, s.size)), s[None, :] - k[:-1]]), axis=0)
    h = np.cumprod(np.concatenate([np.ones((1, s.size)), np.broadcast_to(-kap, (order, s.size))]), axis=0)
    h *= falling * _steps(v0 - x * kap, kap, s[None, :] - k)
    # f^(m) = e^{−λx} (d/dx − λ)^m h: apply (d/dx − λ) to the whole column of derivatives m times
    out = np.empty_like(h)
    for m in range(order + 1):
        out[m] = h[0]
        h = h[1:] - lam * h[:-1]
    with np.errstate(under="ignore"):
        return out * np.exp(-lam * x)


def _integral(
    v0: np.ndarray, kap: np.ndarray, s: np.ndarray, lam: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """∫_a^b f(x) dx by 8-point Gauss–Legendre panels.

    f falls off like e^{−λx} and, near the start of training, like y^{s−1}: the
    panels are a uniform grid of width 4/λ merged with a geometric grid in y
    (ratio e^{−4/(s−1)}, never below 1/2), so f changes by at most ~e^4 on a panel
    and stays well away from its branch point at y = κ.
    """
    span = np.maximum(b - a, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        n_uniform = np.minimum(np.ceil(lam * span / 4.0), 64)
        ratio = np.maximum(0.5, np.exp(-4.0 / np.maximum(s - 1.0, 1e-300)))
        y_a, y_b = v0 - a * kap, v0 - b * kap
        n_geometric = np.minimum(np.ceil(np.log(y_a / y_b) / -np.log(ratio)), 96)
    n_uniform = np.where(np.isfinite(n_uniform), n_uniform, 0).astype(int)
    n_geometric = np.where(np.isfinite(n_geometric), n_geometric, 0).astype(int)
    cols_u, cols_g = int(n_uniform.max(initial=0)) + 1, int(n_geometric.max(initial=0)) + 1
    k_u = np.arange(cols_u)[None, :]
    k_g = np.arange(cols_g)[None, :]
    grid_u = a[:, None] + span[:, None] * np.minimum(k_u / np.maximum(n_uniform, 1)[:, None], 1.0)
    with np.errstate(under="ignore"):
        y_k = y_a[:, None] * ratio[:, None] ** np.minimum(k_g, n_geometric[:, None])
    grid_g = np.clip((v0[:, None] - y_k) / kap[:, None], a[:, None], b[:, None])
    edges = np.sort(np.concatenate([grid_u, grid_g, b[:, None]], axis=1), axis=1)  # => [pairs, panels+1]
    lo, hi = edges[:, :-1], edges[:, 1:]
    half = (hi - lo) / 2.0
    x = (lo + half)[:, :, None] + half[:, :, None] * _NODES[None, None, :]  # => [pairs, panels, nodes]
    f = _terms(v0[:, None, None], kap[:, None, None], s[:, None, None], lam[:, None, None], x)
    return (half * (f * _WEIGHTS).sum(axis=2)).sum(axis=1)


# Euler–Maclaurin: Σ_{j=A}^{B} f(j) = ∫_A^B f + (f(A)+f(B))/2 + Σ_k B_2k/(2k)! [f^(2k−1)(B) − f^(2k−1)(A)]
_EM = [(1, 1.0 / 12.0), (3, -1.0 / 720.0), (5, 1.0 / 30240.0), (7, -1.0 / 1209600.0)]


def geometric_sum(
    v0: np.ndarray, kap: np.ndarray, s: np.ndarray, lam: np.ndarray, last: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """scale · Σ_{j=0}^{last} e^{−λj} [(v0 − jκ)^s − (v0 − (j+1)κ)^s] per pair, all arrays of one shape.

    Requires v0 − (last+1)κ ≥ 0 and scale ≥ 0. Exact sums for the first and last
    terms (where the power part is not smooth on the scale of one term),
    Euler–Maclaurin between them; terms below e^-60 of the first are dropped, and
    so are pairs below 1e-20 of the largest (they are 0 here).

    >>> round(float(geometric_sum(*(np.array([x]) for x in (1.0, 0.25, 2.0, 0.0, 3, 1.0)))[0]), 12)  # telescopes to 1
    1.0
    """
    v0, kap, s, lam, last, scale = (np.asarray(x, dtype=np.float64).ravel() for x in (v0, kap, s, lam, last, scale))
    out = np.zeros(v0.size)
    # Every term is ≥ 0, so a sum lies between its first term and v0^s (where it telescopes to):
    # a pair whose upper bound is below 1e-20 of another's lower bound adds nothing a solve can see.
    with np.errstate(under="ignore"):
        upper = scale * np.power(v0, s)
        lower = scale * _steps(v0, kap, s)
    live = upper >= _NEGLIGIBLE_PAIR * lower.max(initial=0.0)
    if not live.all():
        i = np.flatnonzero(live)
        out[i] = geometric_sum(v0[i], kap[i], s[i], lam[i], last[i], scale[i])
        return out
    tail = np.maximum(_HEAD, np.ceil(8.0 * s))  # exact terms at the far end, where y^s bends fast
    with np.errstate(divide="ignore", over="ignore"):
        # beyond here the exponential alone has dropped the terms by e^-60
        reach = np.where(lam > 0, np.ceil(_DROP / np.where(lam > 0, lam, 1.0)), np.inf)
        # ... or the power part has: y^{s-1} fell by e^-60 from y = v0
        y_stop = v0 * np.exp(-_DROP / np.maximum(s - 1.0, 1e-300))
        reach = np.minimum(reach, np.ceil((v0 - y_stop) / kap) + 1)
    count = last + 1
    short = (count <= 2 * _HEAD + tail) | (reach <= 2 * _HEAD + 16)
    if short.any():
        i = np.flatnonzero(short)
        stop = np.minimum(count[i], np.where(np.isfinite(reach[i]), reach[i] + _HEAD, count[i]))
        out[i] = _exact_range(v0[i], kap[i], s[i], lam[i], np.zeros(i.size), stop)
    i = np.flatnonzero(~short)
    if i.size:
        v, k, g, l, n = v0[i], kap[i], s[i], lam[i], count[i]
        a = np.full(i.size, float(_HEAD))
        far = n - tail[i]  # first term of the exact far end
        truncated = reach[i] + _HEAD < far
        b = np.where(truncated, reach[i] + _HEAD, far - 1)
        total = _exact_range(v, k, g, l, np.zeros(i.size), a)
        total += _exact_range(v, k, g, l, np.where(truncated, n, far), n)
        total += _integral(v, k, g, l, a, b)
        da = _derivatives(v, k, g, l, a, 7)
        db = _derivatives(v, k, g, l, b, 7)
        total += (da[0] + db[0]) / 2.0
        for order, c in _EM:
            total += c * (db[order] - da[order])
        out[i] = total
    return scale * out


__all__ = ["explicit_dots", "geometric_sum"]
