"""Targets of a synthesis: power-function EMAs and every other EMA-like average.

Every EMA a tracker keeps is linear in the training trajectory: a target is a
profile, non-negative weights over training time (DESIGN §6). A tracker with
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
>>> round(float(t.dots(10_000, [10_000], [6.94])[0]) * 10_000, 4)
0.5493
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from .errors import InvalidValueError
from .profiles import (
    SIGMA_REL_MAX,
    Fit,
    check_sigma_rel,
    gamma_to_sigma_rel,
    gram,
    gram_error,
    profile_dot,
    profile_norm_sq,
    sigma_rel_to_gamma,
    solve_gram,
)
from .staircase import explicit_dots, geometric_sum

MOSTLY_INITIAL = 0.5  # a target still holding this much of the initial weights is refused
_NEGLIGIBLE = -41.5  # log of 1e-18: weight below this, relative to 1, is left out of the sums
# Updates summed term by term at most (a decay schedule that changes over more updates than this,
# and still holds weight at the target time, is refused with a message).
EXPLICIT_LIMIT = 1 << 22
_SHORT_HEAD = 1 << 16


# --- update schedules ------------------------------------------------------------------------------


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


def _schedule_dots(sch: Schedule, t_in: np.ndarray, g_in: np.ndarray) -> np.ndarray:
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
        sums = geometric_sum(sch.times(bb) / t, K / t, s_in[use], np.full(use.size, -log_d), bb - a)
        out[use] += pref[use] * sums
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


def _schedule_norm_sq(sch: Schedule) -> float:
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


def _schedule_initial(sch: Schedule) -> float:
    return sch.head()[2]


# --- targets ----------------------------------------------------------------------------------------


class Target:
    """A profile over training time that synthesis can aim at. Subclasses define the schedule or the math."""

    kind: ClassVar[str] = ""
    spec: str

    @property
    def sigma_rel(self) -> float | None:
        """The power-function length, for power targets only."""
        return None

    def dots(self, t: float, t_in: ArrayLike, gamma_in: ArrayLike) -> np.ndarray:
        """⟨p_i, p_r⟩ with the power profiles of snapshots (t_in, gamma_in), target at time ``t``.  # => [inputs]"""
        raise NotImplementedError

    def norm_sq(self, t: float) -> float:
        """⟨p_r, p_r⟩ at time ``t``."""
        raise NotImplementedError

    def initial_weight(self, t: float) -> float:
        """Weight left on the weights the tracker started from (before step 1)."""
        return 0.0

    def step_weights(self, t: int) -> tuple[np.ndarray, float]:
        """Weights of steps 1..t (term by term, for tests and plots) and the initial weight."""
        raise NotImplementedError

    def label(self) -> str:
        """A file-name-safe name: ``beta0.9999``, ``window1000``, ``diffusers-decay0.999``."""
        body = self.spec.replace("=", "").replace(":", "-").replace(",", "-")
        return re.sub(r"[^A-Za-z0-9._-]+", "_", body)

    def describe(self) -> dict[str, Any]:
        """The spec and every parameter (defaults included), for output metadata."""
        return {"spec": self.spec, "kind": self.kind}

    def __repr__(self) -> str:
        return f"parse_target({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Target) and type(other) is type(self) and other.describe() == self.describe()

    def __hash__(self) -> int:
        return hash(self.spec)


class Power(Target):
    """A power-function EMA of relative width ``sigma_rel`` (what the Recorder records).

    >>> Power(0.1).spec
    'sigma_rel=0.1'
    """

    kind = "sigma_rel"

    def __init__(self, sigma_rel: float) -> None:
        self._sigma_rel = check_sigma_rel(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self._sigma_rel)
        self.spec = f"sigma_rel={self._sigma_rel!r}"

    @property
    def sigma_rel(self) -> float:
        return self._sigma_rel

    def dots(self, t: float, t_in: ArrayLike, gamma_in: ArrayLike) -> np.ndarray:
        return np.asarray(profile_dot(np.asarray(t_in, dtype=np.float64), gamma_in, float(t), self.gamma))

    def norm_sq(self, t: float) -> float:
        return float(profile_norm_sq(float(t), self.gamma))

    def step_weights(self, t: int) -> tuple[np.ndarray, float]:
        k = np.arange(1, t + 1, dtype=np.float64)
        s = self.gamma + 1.0
        with np.errstate(divide="ignore"):  # k = 1: log1p(−1) = −inf gives the exact (1/t)^s
            return np.power(k / t, s) * -np.expm1(s * np.log1p(-1.0 / k)), 0.0

    def label(self) -> str:
        return f"s{self._sigma_rel!r}"

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "sigma_rel": self._sigma_rel, "gamma": self.gamma}


class Window(Target):
    """The uniform average of the weights of the last ``window`` steps.

    >>> Window(100).norm_sq(1000)
    0.01
    """

    kind = "window"

    def __init__(self, window: int) -> None:
        self.window = _whole("window", window)
        self.spec = f"window={self.window}"

    def _check(self, t: float) -> None:
        if self.window > t:
            raise InvalidValueError(
                f"window={self.window} is longer than the run (t = {t:g})", f"use a window of at most {int(t)} steps"
            )

    def dots(self, t: float, t_in: ArrayLike, gamma_in: ArrayLike) -> np.ndarray:
        self._check(t)
        ti, s = np.asarray(t_in, dtype=np.float64), np.asarray(gamma_in, dtype=np.float64) + 1.0
        start = float(t) - self.window
        # (G_i(t) − G_i(t − W)) / W with G_i(x) = (min(x, t_i)/t_i)^s, t_i ≤ t
        with np.errstate(divide="ignore", under="ignore"):
            inside = -np.expm1(s * np.log(np.where(start > 0, start / ti, 1.0))) if start > 0 else np.ones_like(ti)
        return np.where(ti > start, inside, 0.0) / self.window

    def norm_sq(self, t: float) -> float:
        self._check(t)
        return 1.0 / self.window

    def step_weights(self, t: int) -> tuple[np.ndarray, float]:
        self._check(t)
        w = np.zeros(t)
        w[t - self.window :] = 1.0 / self.window
        return w, 0.0

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, "window": self.window}


class Tracked(Target):
    """A tracker defined by its decay per update; subclasses give :meth:`schedule`."""

    params: dict[str, Any]

    def schedule(self, t: int) -> Schedule:
        raise NotImplementedError

    def _schedule(self, t: float) -> Schedule:
        sch = self.schedule(int(t))
        if sch.count < 1:
            raise InvalidValueError(f"{self.spec} has made no update by t = {t:g}", "choose a later target time")
        return sch

    def dots(self, t: float, t_in: ArrayLike, gamma_in: ArrayLike) -> np.ndarray:
        ti = np.atleast_1d(np.asarray(t_in, dtype=np.float64))
        gi = np.broadcast_to(np.asarray(gamma_in, dtype=np.float64), ti.shape)
        return _schedule_dots(self._schedule(t), ti, np.ascontiguousarray(gi))

    def norm_sq(self, t: float) -> float:
        return _schedule_norm_sq(self._schedule(t))

    def initial_weight(self, t: float) -> float:
        return _schedule_initial(self._schedule(t))

    def step_weights(self, t: int) -> tuple[np.ndarray, float]:
        w, initial = self._schedule(t).step_weights()
        out = np.zeros(t)
        out[: w.size] = w
        return out, initial

    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "kind": self.kind, **self.params}


class Classical(Tracked):
    """Constant decay ``beta``, an update every ``every`` steps; updates at steps ≤ ``after`` (and the first) copy.

    The same as ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta))``
    with ``update_parameters`` called every ``every`` steps.

    >>> Classical(0.5).step_weights(3)[0].tolist()
    [0.25, 0.25, 0.5]
    """

    kind = "beta"

    def __init__(self, beta: float, every: int = 1, after: int = 0) -> None:
        self.params = {"beta": _unit("beta", beta, open_low=True), "every": _whole("every", every),
                       "after": _whole("after", after, low=0)}
        self.spec = _spec("", self.params, {"every": 1, "after": 0})

    def schedule(self, t: int) -> Schedule:
        k = self.params["every"]
        copies = max(1, self.params["after"] // k)
        return Schedule(k, k, t // k, copies, np.zeros_like, self.params["beta"])


# --- the libraries' trackers --------------------------------------------------------------------------


def _f32(x: Any) -> Any:
    return np.float32(x)


def _first_reaching(ok: Callable[[int], bool], start: int) -> int:
    """The smallest n ≥ start with ok(n), ok monotone (False … True); bisection on integers."""
    lo, hi = start, max(start, 1)
    while not ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 62:
            return 1 << 62
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


class LitEma(Tracked):
    """``ldm.modules.ema.LitEma(model, decay=0.9999, use_num_upates=True)`` (CompVis latent diffusion).

    Source: CompVis/stable-diffusion ``ldm/modules/ema.py``, ``LitEma.forward``: the
    shadow starts as the initial weights; with ``use_num_upates`` the counter is
    incremented first, then decay = min(decay, (1+n)/(10+n)). Both are float32
    tensors there, so the decays here are the float32 values.
    """

    kind = "litema"

    def __init__(self, decay: float = 0.9999, use_num_updates: bool = True) -> None:
        self.params = {"decay": _unit("decay", decay, closed=True), "use_num_updates": bool(use_num_updates)}
        self.spec = _spec("litema", self.params, {"use_num_updates": True})

    def schedule(self, t: int) -> Schedule:
        d32 = _f32(self.params["decay"])
        if not self.params["use_num_updates"]:
            return Schedule(1, 1, t, 0, np.zeros_like, float(d32))

        def ramp(n: np.ndarray) -> np.ndarray:
            n32 = np.asarray(n, dtype=np.float32)
            return (n32 + np.float32(1)) / (n32 + np.float32(10))

        def decays(n: np.ndarray) -> np.ndarray:
            return np.minimum(ramp(n), d32).astype(np.float64)

        warm = _first_reaching(lambda n: bool(ramp(np.array([n]))[0] >= d32), 1)
        return Schedule(1, 1, t, warm, decays, float(d32))


def _warmup(k: np.ndarray, inv_gamma: float, power: float) -> np.ndarray:
    """1 − (1 + k/inv_gamma)^−power (@crowsonkb's warm-up, as diffusers, timm and ema-pytorch write it)."""
    return 1.0 - (1.0 + k / inv_gamma) ** -power


class Diffusers(Tracked):
    """``diffusers.training_utils.EMAModel(parameters, decay=0.9999, min_decay=0.0, update_after_step=0,
    use_ema_warmup=False, inv_gamma=1.0, power=2/3)``, ``step()`` once per optimizer step.

    Source: huggingface/diffusers ``src/diffusers/training_utils.py``, ``EMAModel.step`` /
    ``EMAModel.get_decay``: ``optimization_step`` is incremented first; k = optimization_step −
    update_after_step − 1; k ≤ 0 gives decay 0 (a copy); else (1+k)/(10+k), or the warm-up
    1 − (1 + k/inv_gamma)^−power, then min(·, decay) and max(·, min_decay). float64.
    """

    kind = "diffusers"

    def __init__(self, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_ema_warmup: bool = False, inv_gamma: float = 1.0, power: float = 2 / 3) -> None:
        self.params = {
            "decay": _unit("decay", decay, closed=True), "min_decay": _unit("min_decay", min_decay, closed=True),
            "update_after_step": _whole("update_after_step", update_after_step, low=0),
            "use_ema_warmup": bool(use_ema_warmup), "inv_gamma": _positive("inv_gamma", inv_gamma),
            "power": _positive("power", power),
        }
        self.spec = _spec("diffusers", self.params, self._defaults)

    _defaults: ClassVar[dict[str, Any]] = {"min_decay": 0.0, "update_after_step": 0, "use_ema_warmup": False,
                                           "inv_gamma": 1.0, "power": 2 / 3}

    def _ramp(self, k: np.ndarray) -> np.ndarray:
        p = self.params
        return _warmup(k, p["inv_gamma"], p["power"]) if p["use_ema_warmup"] else (1.0 + k) / (10.0 + k)

    def schedule(self, t: int) -> Schedule:
        p = self.params
        after = p["update_after_step"]
        top = max(p["decay"], p["min_decay"])  # min(·, decay) then max(·, min_decay), once the ramp passes decay

        def decays(n: np.ndarray) -> np.ndarray:
            k = n - after - 1.0
            d = np.maximum(np.minimum(self._ramp(np.maximum(k, 0.0)), p["decay"]), p["min_decay"])
            return np.where(k <= 0, 0.0, d)

        reach = _first_reaching(lambda k: bool(self._ramp(np.array([float(k)]))[0] >= p["decay"]), 1)
        return Schedule(1, 1, t, after + 1 + reach, decays, top)


class Timm(Tracked):
    """``timm.utils.ModelEmaV3(model, decay=0.9999, min_decay=0.0, update_after_step=0, use_warmup=False,
    warmup_gamma=1.0, warmup_power=2/3)`` with ``update(model, step=num_updates)`` as timm's train.py calls it.

    Source: huggingface/pytorch-image-models ``timm/utils/model_ema.py``, ``ModelEmaV3.get_decay``:
    k = step − update_after_step − 1; k ≤ 0 gives decay 0 (a copy); with ``use_warmup``
    max(min(1 − (1 + k/warmup_gamma)^−warmup_power, decay), min_decay), else decay. ``step`` is
    the number of optimizer steps taken (1 after the first). float64. (``ModelEmaV2(decay)``
    applies ``decay`` from the initial weights on: ``litema:decay=D,use_num_updates=false``
    up to LitEma's float32 rounding of D.)
    """

    kind = "timm"
    _defaults: ClassVar[dict[str, Any]] = {"min_decay": 0.0, "update_after_step": 0, "use_warmup": False,
                                           "warmup_gamma": 1.0, "warmup_power": 2 / 3}

    def __init__(self, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3) -> None:
        self.params = {
            "decay": _unit("decay", decay, closed=True), "min_decay": _unit("min_decay", min_decay, closed=True),
            "update_after_step": _whole("update_after_step", update_after_step, low=0),
            "use_warmup": bool(use_warmup), "warmup_gamma": _positive("warmup_gamma", warmup_gamma),
            "warmup_power": _positive("warmup_power", warmup_power),
        }
        self.spec = _spec("timm", self.params, self._defaults)

    def schedule(self, t: int) -> Schedule:
        p = self.params
        after = p["update_after_step"]
        if not p["use_warmup"]:
            return Schedule(1, 1, t, after + 1, np.zeros_like, p["decay"])

        def ramp(k: np.ndarray) -> np.ndarray:
            return _warmup(k, p["warmup_gamma"], p["warmup_power"])

        def decays(n: np.ndarray) -> np.ndarray:
            k = n - after - 1.0
            d = np.maximum(np.minimum(ramp(np.maximum(k, 0.0)), p["decay"]), p["min_decay"])
            return np.where(k <= 0, 0.0, d)

        reach = _first_reaching(lambda k: bool(ramp(np.array([float(k)]))[0] >= p["decay"]), 1)
        return Schedule(1, 1, t, after + 1 + reach, decays, max(p["decay"], p["min_decay"]))


class EmaPytorch(Tracked):
    """``ema_pytorch.EMA(model, beta=0.9999, update_after_step=100, update_every=10, inv_gamma=1.0,
    power=2/3, min_value=0.0)``, ``update()`` once per optimizer step.

    Source: lucidrains/ema-pytorch ``ema_pytorch/ema_pytorch.py``, ``EMA.update`` /
    ``EMA.get_current_decay``: the first call copies; call c (c = 1, 2, …) then acts when
    (c − 1) % update_every == 0: a copy while c − 1 ≤ update_after_step, else decay
    clamp(1 − (1 + epoch/inv_gamma)^−power, min_value, beta) with epoch = c − update_after_step − 1,
    computed on float32 tensors (emulated here with numpy float32).
    """

    kind = "ema-pytorch"
    _defaults: ClassVar[dict[str, Any]] = {"update_after_step": 100, "update_every": 10, "inv_gamma": 1.0,
                                           "power": 2 / 3, "min_value": 0.0}

    def __init__(self, beta: float = 0.9999, update_after_step: int = 100, update_every: int = 10,
                 inv_gamma: float = 1.0, power: float = 2 / 3, min_value: float = 0.0) -> None:
        self.params = {
            "beta": _unit("beta", beta, closed=True),
            "update_after_step": _whole("update_after_step", update_after_step, low=0),
            "update_every": _whole("update_every", update_every), "inv_gamma": _positive("inv_gamma", inv_gamma),
            "power": _positive("power", power), "min_value": _unit("min_value", min_value, closed=True),
        }
        self.spec = _spec("ema-pytorch", self.params, {**self._defaults, "beta": 0.9999})

    def _value(self, epoch: np.ndarray) -> np.ndarray:
        p = self.params
        e = np.asarray(epoch, dtype=np.float32)
        v = _f32(1) - (_f32(1) + e / _f32(p["inv_gamma"])) ** _f32(-p["power"])
        return np.minimum(np.maximum(v, _f32(p["min_value"])), _f32(p["beta"]))

    def schedule(self, t: int) -> Schedule:
        p = self.params
        k, after = p["update_every"], p["update_after_step"]
        count = (t - 1) // k + 1 if t >= 1 else 0  # updates at c = 1, 1+k, 1+2k, …

        def decays(n: np.ndarray) -> np.ndarray:
            c = 1.0 + (n - 1.0) * k
            d = self._value(np.maximum(c - after - 1.0, 0.0)).astype(np.float64)
            return np.where((n == 1) | (c - 1.0 <= after), 0.0, d)

        top = _f32(p["beta"])
        reach = _first_reaching(lambda e: bool(self._value(np.array([float(e)]))[0] >= top), 1)
        # the first update number whose epoch has reached the plateau, and every copy before it
        warm = max(1 + after // k, -(-(after + reach) // k))
        return Schedule(1, k, count, warm, decays, float(top))


class SuperGradients(Tracked):
    """``super_gradients.training.utils.ema.ModelEMA.from_params(model, decay_type="exp", decay=0.9999, beta=15)``
    as SuperGradients' Trainer calls it: ``update(model, step=global_step, total_steps=…)``.

    Source: Deci-AI/super-gradients ``src/super_gradients/training/utils/ema.py`` (``ModelEMA``, the
    shadow starts as the initial weights, no copy) and ``ema_decay_schedules.py``: ``constant``
    decay; ``threshold`` min(decay, (1+step)/(10+step)); ``exp`` decay·(1 − exp(−beta·step/total_steps)).
    ``global_step`` is 1 after the first optimizer step (``sg_trainer.py``, ``_backward_step``).
    """

    kind = "supergradients"
    _types = ("constant", "threshold", "exp")

    def __init__(self, decay: float = 0.9999, decay_type: str = "exp", beta: float = 15.0,
                 total_steps: int | None = None) -> None:
        if decay_type not in self._types:
            raise InvalidValueError(
                f"supergradients decay_type={decay_type!r} is unknown", f"use one of {', '.join(self._types)}"
            )
        if decay_type == "exp" and total_steps is None:
            raise InvalidValueError(
                "supergradients decay_type=exp needs total_steps",
                "add total_steps=N (len(train_loader) · max_epochs), or use decay_type=constant|threshold",
            )
        self.params = {"decay": _unit("decay", decay, closed=True), "decay_type": decay_type,
                       "beta": _positive("beta", beta),
                       "total_steps": None if total_steps is None else _whole("total_steps", total_steps)}
        defaults = {"decay_type": "exp", "beta": 15.0}
        self.spec = _spec("supergradients", {k: v for k, v in self.params.items() if v is not None}, defaults)

    def schedule(self, t: int) -> Schedule:
        p = self.params
        decay, kind = p["decay"], p["decay_type"]
        if kind == "constant":
            return Schedule(1, 1, t, 0, np.zeros_like, decay)
        if kind == "threshold":
            def threshold(n: np.ndarray) -> np.ndarray:
                return np.minimum(decay, (1.0 + n) / (10.0 + n))

            warm = _first_reaching(lambda n: bool(threshold(np.array([float(n)]))[0] >= decay), 1)
            return Schedule(1, 1, t, warm, threshold, decay)
        beta, total = p["beta"], float(p["total_steps"])

        def exp_ramp(n: np.ndarray) -> np.ndarray:
            return decay * (1.0 - np.exp(-(n / total) * beta))

        # where the float64 value has settled on decay itself, the tail is exactly geometric
        warm = _first_reaching(lambda n: bool(exp_ramp(np.array([float(n)]))[0] >= decay), 1)
        return Schedule(1, 1, t, warm, exp_ramp, decay)


# --- parsing --------------------------------------------------------------------------------------


def _whole(name: str, value: Any, low: int = 1) -> int:
    try:
        v = float(value)
        ok = math.isfinite(v) and v == int(v) and int(v) >= low and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidValueError(f"{name}={value!r} is invalid", f"use a whole number ≥ {low}")
    return int(float(value))


def _positive(name: str, value: Any) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InvalidValueError(f"{name}={value!r} is out of range", "use a number > 0")
    return v


def _unit(name: str, value: Any, *, closed: bool = False, open_low: bool = False) -> float:
    v = float(value)
    ok = math.isfinite(v) and (0.0 < v if open_low else 0.0 <= v) and (v <= 1.0 if closed else v < 1.0)
    if not ok:
        lo = "(0" if open_low else "[0"
        raise InvalidValueError(f"{name}={value!r} is out of range", f"use a decay in {lo}, 1{']' if closed else ')'}")
    return v


def _spec(prefix: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)

    body = ",".join(f"{k}={text(v)}" for k, v in params.items() if k not in defaults or defaults[k] != v)
    return f"{prefix}:{body}" if prefix else body


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
        raise InvalidValueError(f"target {spec!r}: {e.what}", e.fix) from None
    except TypeError as e:  # e.g. a missing required argument
        raise InvalidValueError(f"target {spec!r}: {e}", f"use one of: {ACCEPTED}") from None


def parse_targets(targets: str | float | Target | Sequence[str | float | Target]) -> list[Target]:
    """A list of targets from one target or a sequence of them (numbers, specs or targets, mixed)."""
    if isinstance(targets, (str, int, float, Target, np.floating, np.integer)):
        return [parse_target(targets)]  # type: ignore[arg-type]
    return [parse_target(t) for t in targets]


def from_options(
    sigma_rels: Sequence[float] | None, betas: Sequence[float] | None, specs: Sequence[str] | None, *, required: bool = True
) -> list[Target]:
    """The targets of the CLI options ``--sigma-rel``, ``--beta`` and ``--ema``, in that order."""
    targets = [Power(s) for s in sigma_rels or ()]
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

    The least-squares solve of :func:`~posthoc_cli.profiles.fit` (Alg. 3) with b and
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
        raise InvalidValueError("no target given", "pass at least one, e.g. --sigma-rel 0.15 or --beta 0.999")
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
