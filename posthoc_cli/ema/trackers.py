"""The kinds of target: power-function EMAs, windows, and trackers defined by their decay per update
(the :class:`Target` base, :class:`Power`, :class:`Window`, :class:`Tracked` and the constant-beta
:class:`Classical`), and the checks of their parameters that the libraries' trackers share. numpy only.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError
from .profiles import check_sigma_rel, profile_dot, profile_norm_sq, sigma_rel_to_gamma
from .schedules import Schedule, schedule_dots, schedule_initial, schedule_norm_sq


def check_whole(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int if it is a whole number ≥ ``low`` (a spec's ``10`` or ``10.0``, never a bool)."""
    try:
        v = float(value)
        ok = math.isfinite(v) and v == int(v) and int(v) >= low and not isinstance(value, bool)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidValueError(f"{name}={value!r} is invalid", f"use a whole number ≥ {low}")
    return int(float(value))


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and > 0."""
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InvalidValueError(f"{name}={value!r} is out of range", "use a number > 0")
    return v


def check_decay(name: str, value: Any, *, closed: bool = False, open_low: bool = False) -> float:
    """``value`` as a float if it is a decay in [0, 1), with 1 allowed if ``closed`` and 0 refused if ``open_low``."""
    v = float(value)
    ok = math.isfinite(v) and (0.0 < v if open_low else 0.0 <= v) and (v <= 1.0 if closed else v < 1.0)
    if not ok:
        lo = "(0" if open_low else "[0"
        raise InvalidValueError(f"{name}={value!r} is out of range", f"use a decay in {lo}, 1{']' if closed else ')'}")
    return v


def spec_text(prefix: str, params: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The canonical spec ``prefix:name=value,…`` of a target, leaving out parameters at their defaults."""
    def text(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)

    body = ",".join(f"{k}={text(v)}" for k, v in params.items() if k not in defaults or defaults[k] != v)
    return f"{prefix}:{body}" if prefix else body


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
        self.window = check_whole("window", window)
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
        return schedule_dots(self._schedule(t), ti, np.ascontiguousarray(gi))

    def norm_sq(self, t: float) -> float:
        return schedule_norm_sq(self._schedule(t))

    def initial_weight(self, t: float) -> float:
        return schedule_initial(self._schedule(t))

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
        self.params = {"beta": check_decay("beta", beta, open_low=True), "every": check_whole("every", every),
                       "after": check_whole("after", after, low=0)}
        self.spec = spec_text("", self.params, {"every": 1, "after": 0})

    def schedule(self, t: int) -> Schedule:
        k = self.params["every"]
        copies = max(1, self.params["after"] // k)
        return Schedule(k, k, t // k, copies, np.zeros_like, self.params["beta"])


__all__ = [
    "Classical",
    "Power",
    "Target",
    "Tracked",
    "Window",
    "check_decay",
    "check_positive",
    "check_whole",
    "spec_text",
]
