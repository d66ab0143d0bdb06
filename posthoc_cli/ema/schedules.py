"""Update schedules: when a tracker folds in the weights, with which decay, and its profile's inner products.

A tracker's updates at u_n = first + (n−1)·every carry decays d_n; the update
stands for the steps (u_{n−1}, u_n] (the Recorder's time model). Updates whose
decay still changes are summed term by term; the constant-decay tail in closed
form (:mod:`.staircase`). numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidValueError
from .staircase import explicit_dots, geometric_sum

_NEGLIGIBLE = -41.5  # log of 1e-18: weight below this, relative to 1, is left out of the sums
# Updates summed term by term at most (a decay schedule that changes over more updates than this,
# and still holds weight at the target time, is refused with a message).
EXPLICIT_LIMIT = 1 << 22
_SHORT_HEAD = 1 << 16


@dataclass(frozen=True)
class Schedule:
    """The updates of a tracker up to time T: u_n = first + (n−1)·every, n = 1..count.

    Updates 1..warm have the decays ``decays(n)`` (0 is a copy); later ones the
    constant ``tail``. ``first == every`` allows ``warm == 0``.
    """

    first: int
    every: int
    count: int
    warm: int
    decays: Callable[[np.ndarray], np.ndarray]
    tail: float

    def times(self, n: np.ndarray) -> np.ndarray:
        return self.first + (n - 1.0) * self.every

    def head(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(update numbers, weights, initial weight) of updates 1..min(warm, count), term by term.

        A long head (> 65,536 updates) is skipped (weights of ~0) when the tail alone leaves it
        less than 1e-18 of the weight: shorter ones are summed anyway, so that early snapshots'
        tiny inner products stay accurate too.
        """
        h = min(self.warm, self.count)
        log_tail = _log_power(self.tail, self.count - h)
        if h == 0 or (log_tail < _NEGLIGIBLE and h > _SHORT_HEAD):
            return np.zeros(0), np.zeros(0), math.exp(log_tail) if h == 0 else 0.0
        if h > EXPLICIT_LIMIT:
            raise InvalidValueError(
                f"the decay of this target still changes after {EXPLICIT_LIMIT:,} updates and that part keeps "
                f"{math.exp(log_tail):.1e} of the weight at this time",
                "choose a target whose warm-up ends sooner, or a later target time",
            )
        n = np.arange(1, h + 1, dtype=np.float64)
        d = np.asarray(self.decays(n), dtype=np.float64)
        with np.errstate(divide="ignore"):
            log_d = np.log(d)
        # L_n = Σ_{j>n} log d_j: a reversed cumulative sum (exclusive) plus the tail's share
        suffix = np.concatenate([np.cumsum(log_d[::-1])[::-1][1:], [0.0]]) + log_tail
        with np.errstate(under="ignore"):
            w = (1.0 - d) * np.exp(suffix)
            initial = math.exp(float(log_d.sum()) + log_tail) if np.all(d > 0) else 0.0
        return n, w, initial

    def step_weights(self) -> tuple[np.ndarray, float]:
        """Weights of steps 1..u_count (each update spread over its steps) and the initial weight.

        Term by term over every update: for tests, plots and small T.
        """
        n = np.arange(1, self.count + 1, dtype=np.float64)
        d = np.full(self.count, self.tail)
        h = min(self.warm, self.count)
        d[:h] = self.decays(n[:h])
        with np.errstate(divide="ignore"):
            log_d = np.log(d)
        suffix = np.concatenate([np.cumsum(log_d[::-1])[::-1][1:], [0.0]]) if self.count else np.zeros(0)
        with np.errstate(under="ignore"):
            w = (1.0 - d) * np.exp(suffix)
        initial = float(np.exp(log_d.sum())) if self.count and np.all(d > 0) else float(self.count == 0)
        u = self.times(n).astype(np.int64)
        lengths = np.diff(np.concatenate([[0], u]))
        return np.repeat(w / lengths, lengths), initial


def _log_power(base: float, exponent: int) -> float:
    if exponent == 0:
        return 0.0
    return exponent * math.log(base) if base > 0 else -math.inf


def schedule_dots(sch: Schedule, t_in: np.ndarray, g_in: np.ndarray) -> np.ndarray:
    """⟨p_i, q⟩ of the schedule's staircase profile q with each snapshot's power profile.  # => [inputs]"""
    s_in = g_in + 1.0
    n, w, _ = sch.head()
    out = np.zeros(t_in.size)
    if n.size:
        u = sch.times(n)
        u_prev = np.concatenate([[0.0], u[:-1]])
        out += explicit_dots(u_prev, u, w / (u - u_prev), t_in, s_in)
    a = min(sch.warm, sch.count) + 1  # first update of the constant tail
    if a > sch.count or sch.tail >= 1.0:
        return out
    D, K, N = sch.tail, float(sch.every), sch.count
    if D <= 0.0:  # every tail update is a copy: the last one holds all the weight
        last = np.array([float(N)])
        u, u_prev = sch.times(last), (sch.times(last - 1.0) if N > 1 else np.zeros(1))
        return out + explicit_dots(u_prev, u, 1.0 / (u - u_prev), t_in, s_in)
    log_d = math.log(D)
    # n_i: updates at or before t_i; b: the last full tail update below the snapshot
    n_i = np.where(t_in >= sch.first, np.floor((t_in - sch.first) / K) + 1.0, 0.0)
    n_i = np.minimum(n_i, N)
    b = n_i
    full = b >= a
    with np.errstate(under="ignore"):
        pref = np.where(full, (1.0 - D) / K * np.exp((N - b) * log_d), 0.0)
    use = np.flatnonzero(full & (pref > 0))
    if use.size:
        t, bb = t_in[use], b[use]
        out[use] += geometric_sum(sch.times(bb) / t, K / t, s_in[use], np.full(use.size, -log_d), bb - a, pref[use])
    # the update after the snapshot time, whose interval the snapshot time splits
    n_p = n_i + 1.0
    u_last = np.where(n_i >= 1, sch.times(np.maximum(n_i, 1.0)), 0.0)
    part = (n_p >= a) & (n_p <= N) & (u_last < t_in)
    if part.any():
        with np.errstate(under="ignore"):
            share = -np.expm1(s_in * np.log(np.where(u_last > 0, u_last / t_in, 1.0)))
            share = np.where(u_last > 0, share, 1.0)
            out += np.where(part, (1.0 - D) / K * np.exp((N - n_p) * log_d) * share, 0.0)
    return out


def schedule_norm_sq(sch: Schedule) -> float:
    """∫ q² of the staircase, plus the initial weight standing for the first update's interval."""
    n, w, initial = sch.head()
    total = 0.0
    if n.size:
        u = sch.times(n)
        lengths = np.diff(np.concatenate([[0.0], u]))
        total += float(np.sum(w * w / lengths))
    a = min(sch.warm, sch.count) + 1
    if a <= sch.count and 0.0 < sch.tail < 1.0:
        D, m = sch.tail, sch.count - a + 1
        # Σ_{k<m} (1−D)² D^{2k} / K = (1−D)/(1+D) · (1 − D^{2m}) / K
        total += (1.0 - D) / (1.0 + D) * -math.expm1(2.0 * m * math.log(D)) / sch.every
    elif a <= sch.count and sch.tail <= 0.0:  # only the last update counts
        total += 1.0 / (sch.every if sch.count > 1 else sch.first)
    return total + initial * initial / sch.first


def schedule_initial(sch: Schedule) -> float:
    return sch.head()[2]


__all__ = ["EXPLICIT_LIMIT", "Schedule", "schedule_dots", "schedule_initial", "schedule_norm_sq"]
