"""The EMAs a Recorder tracks over one binding of the model: their tensors, times and update counts.

An update brings every due EMA to time t with one fused multi-tensor lerp over the
binding's float32 inputs, its weight 1 - beta from Eq. 127 for the exact step
length Δ, computed in Python from integers: no device tensor is read, nothing
synchronises. Each EMA keeps its own time, so EMAs resumed at different times, or
updated only every ``update_every`` steps, stay exact.

>>> avg = Averages(binding, sigma_rels=(0.05, 0.10), gammas=(6.94, 16.97))  # doctest: +SKIP
>>> avg.advance(1, 1, staging=[]); avg.t_ema  # doctest: +SKIP
[1, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..ema.profiles import update_beta
from ..errors import InvalidValueError, ModelChangedError
from .binding import Binding
from .writer import Job


class Averages:
    """One float32 EMA per sigma_rel of every averaged tensor of ``binding``, starting at the model's current values."""

    def __init__(self, binding: Binding, sigma_rels: Sequence[float], gammas: Sequence[float]) -> None:
        self.binding = binding
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = tuple(gammas)
        self.emas = binding.new_emas(len(self.gammas))  # per EMA: one tensor per binding.sources
        self.t = 0  # time of the latest update
        self.t_ema = [0] * len(self.gammas)  # time of each EMA's latest update
        self.updates = [0] * len(self.gammas)

    def index(self, sigma_rel: float) -> int:
        """Which EMA tracks ``sigma_rel``."""
        for k, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-12):
                return k
        raise InvalidValueError(
            f"sigma_rel {sigma_rel} is not tracked by this Recorder", f"use one of {', '.join(map(str, self.sigma_rels))}"
        )

    def advance(self, t: int, every: int, staging: list[Job]) -> None:
        """Bring each EMA to time ``t`` if it is at least ``every`` behind (a snapshot passes 1).

        ``staging``: snapshot jobs that may still be copying the EMAs, waited for before they change.
        """
        # No torch.no_grad() here: the inputs are detached aliases (dtensors.local), so autograd records
        # nothing, and the decorator cost ~20 µs per update, 7 % of a small adapter's two lerps.
        inputs = None
        for k, ema in enumerate(self.emas):
            if t - self.t_ema[k] < every:
                continue  # not due, or resumed ahead of the others with this step already inside it
            if inputs is None:
                inputs = self.binding.current_inputs()
                while staging:  # a snapshot may still be copying these EMAs
                    staging.pop().wait_released()
            torch._foreach_lerp_(ema, inputs, 1.0 - update_beta(t, self.t_ema[k], self.gammas[k]))
            self.t_ema[k] = t
            self.updates[k] += 1

    def move_to(self, binding: Binding) -> None:
        """Continue over ``binding``, the same tensors moved or cast: the EMAs stay float32, on its inputs' devices.

        Tensors of another layout or sharding are refused: the averages so far belong to other tensors.
        """
        binding.frozen.carry_over(self.binding.frozen)
        if binding.layout() != self.binding.layout():
            raise ModelChangedError(
                f"the model's tensors were replaced by tensors of another layout or sharding after the Recorder "
                f"had averaged {max(self.updates)} updates (e.g. fully_shard or load_state_dict(assign=True) with other shapes; "
                "FSDP2 also leaves the root's parameters unsharded after a forward pass without backward)",
                "create the Recorder after the model is moved, sharded and loaded (it resumes from its folder); "
                "with FSDP2 call model.reshard() before update() after a forward pass without backward",
            )
        with torch.no_grad():
            self.emas = [[old.to(new.device) for old, new in zip(ema, binding.inputs)] for ema in self.emas]
        self.binding = binding

    def adopt(self, t: int, t_ema: list[int], updates: list[int], emas: list[list[torch.Tensor]]) -> None:
        """Become exactly the given EMAs (copied into ours, float32 → float32), times and update counts."""
        with torch.no_grad():
            for mine, theirs in zip(self.emas, emas):
                for ema, saved in zip(mine, theirs):
                    ema.copy_(saved)  # e.g. from a CPU copy back to the EMA's device
        self.t, self.t_ema, self.updates = t, t_ema, updates


__all__ = ["Averages"]
