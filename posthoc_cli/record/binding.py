"""The model's tensors as a Recorder binds them: roles, local shards, and the float32 inputs of the lerp.

A binding is built when the Recorder is made, and again when the model's tensors
are replaced (:mod:`.live`), so that every update works on flat lists built in
advance: ``sources``, the model's unique floating-point tensors (a sharded model's
local shards; tied weights, one tensor under two names, share one EMA), the float32
``inputs`` the lerp reads from them, and per recorded name a slot saying whether it
is averaged and where its tensor sits. Frozen tensors are stored once per folder
(:class:`.frozen.FrozenWeights`), never averaged.

>>> b = Binding(model, Path("ckpts"), Filter.make(), None, None)  # doctest: +SKIP
>>> b.names, len(b.sources)  # doctest: +SKIP
(['fc.weight', 'fc.bias'], 2)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidValueError
from ..format.keys import WRAPPER_PREFIXES, strip_wrappers
from . import dtensors, ranks
from .frozen import FrozenWeights
from .live import Watch
from .selection import AVERAGED, STORED_ONCE, Filter, select


def _storage_key(t: torch.Tensor) -> tuple[object, ...]:
    """Identifies the memory a tensor covers, so tied weights (one tensor, two names) share one EMA."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def frozen_set_id(model: nn.Module, selection: Filter) -> str | None:
    """For a sharded model with tensors to store once, one new id shared by every rank.

    One broadcast, when the Recorder is made (every rank makes its Recorder), so the
    frozen set is written later without any communication.
    """
    state = model.state_dict(keep_vars=True)
    if not any(dtensors.is_dtensor(t) for t in state.values()):
        return None
    if STORED_ONCE not in select({strip_wrappers(n): t for n, t in state.items()}, selection).values():
        return None
    return ranks.agreed_id()


class Binding:
    """The flat lists an update works on, built once from ``model.state_dict(keep_vars=True)``."""

    def __init__(
        self,
        model: nn.Module,
        folder: Path,
        selection: Filter,
        set_id: str | None,
        ema_device: torch.device | str | None,
    ) -> None:
        state = model.state_dict(keep_vars=True)
        dtensors.refuse_unsupported(model, state)
        names = [strip_wrappers(n) for n in state]
        if len(set(names)) != len(names):
            raise InvalidValueError("tensor names collide after removing wrapper prefixes", "record the unwrapped model")
        sharded = any(dtensors.is_dtensor(t) for t in state.values())
        # What is averaged (selection.py); the rest is stored once per folder (frozen.py), not in every snapshot.
        named = dict(zip(names, state.values()))
        self.roles = select(named, selection)
        # Every update checks the tensors it averages or stores; the stored-once ones (often most of a
        # fine-tuned model) are checked where they are used: snapshots, state dicts, swaps.
        once_keys = {k for k, n in zip(state, names) if self.roles[n] == STORED_ONCE}
        self.watch = Watch.of(model, [k for k in state if k not in once_keys], sharded=sharded)
        self.watch_once = Watch.of(model, [k for k in state if k in once_keys], sharded=sharded)
        once = {n: t for n, t in named.items() if self.roles[n] == STORED_ONCE}
        if once and sharded and (set_id is None or dtensors.shard_plan(once) is None):
            raise InvalidValueError(
                f"{len(once)} frozen tensors of a sharded (DTensor) model would be stored once, which sharded recording "
                "supports only when the model is sharded before the Recorder is made and some stored-once tensor is a DTensor",
                "make the Recorder after fully_shard / parallelize_module, or pass average_frozen=True to average them with the rest",
            )
        self.frozen = FrozenWeights(folder, once, names, selection.as_json(), set_id if sharded else None)
        state = {k: t for (k, t), n in zip(state.items(), names) if self.roles[n] != STORED_ONCE}
        self.names = [n for n in names if self.roles[n] != STORED_ONCE]
        self.plan = dtensors.shard_plan(state)
        self.specs = [dtensors.spec(t) for t in state.values()]  # per name: how to rebuild a DTensor (or None)
        self.sources: list[torch.Tensor] = []  # unique floating-point tensors of the model (local shards)
        index: dict[object, int] = {}  # storage key → position in sources; tied weights share one EMA
        self.slots: list[tuple[bool, int]] = []  # per name: (averaged?, index into sources or fixed)
        self.fixed: list[torch.Tensor] = []  # integer/bool buffers, stored as they are
        for original in state.values():
            tensor = dtensors.local(original)
            if tensor.is_floating_point():
                key = _storage_key(tensor) if tensor.numel() else id(original)
                if key not in index:
                    index[key] = len(self.sources)
                    self.sources.append(tensor)
                self.slots.append((True, index[key]))
            else:
                self.slots.append((False, len(self.fixed)))
                self.fixed.append(tensor)
        if not self.sources:
            raise InvalidValueError("the model has no floating-point parameters or buffers to average", "pass the model you train")
        self._bind_inputs(ema_device)

    def _bind_inputs(self, ema_device: torch.device | str | None) -> None:
        device = torch.device(ema_device) if ema_device is not None else None
        # The float32 view of each source that the lerp reads: the source itself when it already is
        # float32 on the EMA's device, otherwise a scratch buffer refreshed once per update for all EMAs.
        self.inputs: list[torch.Tensor] = []
        self._convert_src: list[torch.Tensor] = []
        self._convert_dst: list[torch.Tensor] = []
        for src in self.sources:
            target = device or src.device
            if src.dtype == torch.float32 and src.device == target:
                self.inputs.append(src)
                continue
            pin = target.type == "cpu" and src.is_cuda
            scratch = torch.empty(src.shape, dtype=torch.float32, device=target, pin_memory=pin)
            self.inputs.append(scratch)
            self._convert_src.append(src)
            self._convert_dst.append(scratch)
        self._wait_for_host_copy = any(d.is_pinned() for d in self._convert_dst)

    def current_inputs(self) -> list[torch.Tensor]:
        """The current float32 values of the sources, on the EMA device."""
        if self._convert_src:
            torch._foreach_copy_(self._convert_dst, self._convert_src, non_blocking=True)
            if self._wait_for_host_copy:
                torch.cuda.current_stream().synchronize()  # the host lerp must see the copied values
        return self.inputs

    def new_emas(self, count: int) -> list[list[torch.Tensor]]:
        """``count`` EMAs starting at the model's current values (float32 copies)."""
        with torch.no_grad():
            return [[x.to(torch.float32, copy=True) for x in self.current_inputs()] for _ in range(count)]

    def writes(self, option: bool | None) -> bool:
        """Whether this rank writes snapshots: a sharded model's ranks holding a shard; else ``option``, or rank 0."""
        if self.plan is not None:
            if option is not None:
                raise InvalidValueError(
                    "write= cannot be chosen for a sharded (DTensor) model: every rank holding a shard writes its file",
                    "leave write unset",
                )
            return self.plan.index is not None
        return option if option is not None else ranks.rank() == 0  # every rank tracks the EMAs, rank 0 writes

    def by_one_rank(self, act: Callable[[], object], *, writes: bool) -> None:
        """Change the folder on one rank: a sharded model's first file's rank while every rank waits, else the writer."""
        plan = self.plan
        ranks.alone(act, mine=plan.index == 0 if plan is not None else writes, together=plan is not None)

    def by_name(self) -> list[torch.Tensor]:
        """The model's tensor (local shard) behind each recorded name."""
        return [self.sources[i] if averaged else self.fixed[i] for averaged, i in self.slots]

    def source_names(self) -> list[str]:
        """The first state-dict name of each averaged tensor (tied weights: one EMA, several names)."""
        first: dict[int, str] = {}
        for name, (averaged, i) in zip(self.names, self.slots):
            if averaged:
                first.setdefault(i, name)
        return [first[i] for i in range(len(self.sources))]

    def global_shapes(self) -> list[tuple[int, ...]]:
        """Each recorded name's shape in the whole model (a sharded model's: not the local shard's)."""
        if self.plan is not None:
            return [c.shape for c in self.plan.chunks]
        return [tuple(t.shape) for t in self.by_name()]

    def layout(self) -> tuple[object, ...]:
        """What EMAs carried over to another binding must find the same: names, shapes, roles and chunks."""
        named = [(n, tuple(t.shape), a) for n, t, (a, _) in zip(self.names, self.by_name(), self.slots)]
        return named, self.plan.chunks if self.plan is not None else None, len(self.fixed)

    def state_dict(self, ema: list[torch.Tensor], *, trainable_only: bool) -> dict[str, torch.Tensor]:
        """A copy of ``ema`` as the model's state dict (a sharded model's local shards as DTensors laid out
        like its own); the stored-once tensors are the model's own, not copied (``trainable_only``: left out)."""
        recorded = {
            name: dtensors.rebuild((ema[i] if averaged else self.fixed[i]).detach().clone(), spec)
            for name, (averaged, i), spec in zip(self.names, self.slots, self.specs)
        }
        if trainable_only:
            return {n: t for n, t in recorded.items() if self.roles[n] == AVERAGED}
        frozen = self.frozen.tensors
        return {n: recorded[n] if n in recorded else frozen[n].detach() for n in self.roles}

    def copy_in(self, ema: list[torch.Tensor]) -> None:
        """``ema``'s values into the model's tensors, for good (Switch EMA)."""
        with torch.no_grad():
            for source, average in zip(self.sources, ema):
                source.copy_(average)

    @contextlib.contextmanager
    def swapped_in(self, ema: list[torch.Tensor]) -> Iterator[None]:
        """``ema``'s values in the model's tensors; the training values come back after."""
        with torch.no_grad():
            backup = [s.clone() for s in self.sources]
        self.copy_in(ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.sources, backup)


__all__ = ["WRAPPER_PREFIXES", "Binding", "frozen_set_id", "strip_wrappers"]
