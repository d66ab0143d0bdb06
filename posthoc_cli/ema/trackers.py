"""The kinds of target: power-function EMAs, windows, and trackers defined by their decay per update
(constant beta and each library's own schedule, with that library's argument names and defaults).

Each tracker's decay formula and step counting are those of the library's
current source, cited in its docstring. numpy only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from ..errors import InvalidValueError
from .profiles import check_sigma_rel, profile_dot, profile_norm_sq, sigma_rel_to_gamma
from .schedules import Schedule, schedule_dots, schedule_initial, schedule_norm_sq


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


__all__ = ["Classical", "Diffusers", "EmaPytorch", "LitEma", "Power", "SuperGradients", "Target", "Timm", "Tracked", "Window"]
