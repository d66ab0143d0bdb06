"""The libraries' warm-up EMAs as targets, with each library's argument names and defaults:
LitEma (latent diffusion), diffusers, timm, ema-pytorch and SuperGradients.

Each tracker's decay formula and step counting are those of the library's
current source, cited in its docstring. numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidValueError
from .schedules import Schedule
from .trackers import Tracked, check_decay, check_positive, check_whole, spec_text


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
        self.params = {"decay": check_decay("decay", decay, closed=True), "use_num_updates": bool(use_num_updates)}
        self.spec = spec_text("litema", self.params, {"use_num_updates": True})

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


def _clamp_params(decay: float, min_decay: float, update_after_step: int) -> dict[str, Any]:
    """The checked ``decay``, ``min_decay`` and ``update_after_step`` of diffusers' and timm's clamped decay."""
    return {
        "decay": check_decay("decay", decay, closed=True),
        "min_decay": check_decay("min_decay", min_decay, closed=True),
        "update_after_step": check_whole("update_after_step", update_after_step, low=0),
    }


def _clamped_ramp(t: int, ramp: Callable[[np.ndarray], np.ndarray], decay: float, min_decay: float,
                  after: int) -> Schedule:
    """Copies while k = n − after − 1 ≤ 0, then max(min(ramp(k), decay), min_decay): diffusers' and timm's
    ``get_decay``. The tail from the first k whose ramp reaches ``decay`` is geometric at max(decay, min_decay)."""

    def decays(n: np.ndarray) -> np.ndarray:
        k = n - after - 1.0
        d = np.maximum(np.minimum(ramp(np.maximum(k, 0.0)), decay), min_decay)
        return np.where(k <= 0, 0.0, d)

    reach = _first_reaching(lambda k: bool(ramp(np.array([float(k)]))[0] >= decay), 1)
    return Schedule(1, 1, t, after + 1 + reach, decays, max(decay, min_decay))


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
            **_clamp_params(decay, min_decay, update_after_step), "use_ema_warmup": bool(use_ema_warmup),
            "inv_gamma": check_positive("inv_gamma", inv_gamma), "power": check_positive("power", power),
        }
        self.spec = spec_text("diffusers", self.params, self._defaults)

    _defaults: ClassVar[dict[str, Any]] = {"min_decay": 0.0, "update_after_step": 0, "use_ema_warmup": False,
                                           "inv_gamma": 1.0, "power": 2 / 3}

    def _ramp(self, k: np.ndarray) -> np.ndarray:
        p = self.params
        return _warmup(k, p["inv_gamma"], p["power"]) if p["use_ema_warmup"] else (1.0 + k) / (10.0 + k)

    def schedule(self, t: int) -> Schedule:
        p = self.params
        return _clamped_ramp(t, self._ramp, p["decay"], p["min_decay"], p["update_after_step"])


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
            **_clamp_params(decay, min_decay, update_after_step), "use_warmup": bool(use_warmup),
            "warmup_gamma": check_positive("warmup_gamma", warmup_gamma),
            "warmup_power": check_positive("warmup_power", warmup_power),
        }
        self.spec = spec_text("timm", self.params, self._defaults)

    def schedule(self, t: int) -> Schedule:
        p = self.params
        after = p["update_after_step"]
        if not p["use_warmup"]:
            return Schedule(1, 1, t, after + 1, np.zeros_like, p["decay"])

        def ramp(k: np.ndarray) -> np.ndarray:
            return _warmup(k, p["warmup_gamma"], p["warmup_power"])

        return _clamped_ramp(t, ramp, p["decay"], p["min_decay"], after)


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
            "beta": check_decay("beta", beta, closed=True),
            "update_after_step": check_whole("update_after_step", update_after_step, low=0),
            "update_every": check_whole("update_every", update_every),
            "inv_gamma": check_positive("inv_gamma", inv_gamma),
            "power": check_positive("power", power), "min_value": check_decay("min_value", min_value, closed=True),
        }
        self.spec = spec_text("ema-pytorch", self.params, {**self._defaults, "beta": 0.9999})

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
        self.params = {"decay": check_decay("decay", decay, closed=True), "decay_type": decay_type,
                       "beta": check_positive("beta", beta),
                       "total_steps": None if total_steps is None else check_whole("total_steps", total_steps)}
        defaults = {"decay_type": "exp", "beta": 15.0}
        self.spec = spec_text("supergradients", {k: v for k, v in self.params.items() if v is not None}, defaults)

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


__all__ = ["Diffusers", "EmaPytorch", "LitEma", "SuperGradients", "Timm"]
