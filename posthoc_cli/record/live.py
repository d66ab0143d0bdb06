"""Whether the tensors a Recorder averages are still the model's: a cheap check, once per update.

``model.to(torch.float64)``, ``model.to("cuda")`` and ``to_empty`` give parameters
new storage (``param.data = ...``) and put new buffers in the modules;
``load_state_dict(..., assign=True)`` and ``fully_shard`` register new
parameter objects. A Recorder still holding the old tensors would average
values that never move again. The check reads, for every state-dict entry, the
tensor the module registers *now* and compares the address of its data (for
a DTensor: of its local shard, which FSDP2 may replace inside the same DTensor)
with the one recorded at binding time: C-level passes (``map`` over the slots,
no Python call per tensor), about 100 ns per tensor, no device access.

>>> watch = Watch.of(model, names)  # doctest: +SKIP
>>> model.to(torch.float64); watch.replaced()  # doctest: +SKIP
True
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .dtensors import is_dtensor


def _local_ptr(tensor: torch.Tensor) -> int:
    return (tensor._local_tensor if is_dtensor(tensor) else tensor).data_ptr()  # type: ignore[attr-defined]


_local_shard = operator.attrgetter("_local_tensor")  # AttributeError once the slot no longer holds a DTensor


@dataclass
class Watch:
    """The module slots (``_parameters``/``_buffers`` dicts and keys) behind state-dict names, and their data addresses.

    The slots that held a DTensor at binding are kept apart: their local shard is
    read by a C-level getter, so a sharded model's check makes no Python call per
    tensor (``_local_ptr`` per tensor was about half of a small model's update).
    """

    owners: list[dict[str, Any]]
    keys: list[str]
    pointers: list[int]
    pointer: Callable[[torch.Tensor], int]  # for the plain slots
    shard_owners: list[dict[str, Any]] = field(default_factory=list)
    shard_keys: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str], sharded: bool) -> Watch:
        """Watch the parameters and buffers behind ``names`` (raw state-dict names; others are not watched)."""
        watch = cls([], [], [], _local_ptr if sharded else torch.Tensor.data_ptr)
        for name in names:
            path, _, key = name.rpartition(".")
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue  # an entry a state-dict hook made up: nothing registered to watch
            for slots in (module._parameters, module._buffers):
                if slots.get(key) is not None:
                    dtensor = is_dtensor(slots[key])
                    (watch.shard_owners if dtensor else watch.owners).append(slots)
                    (watch.shard_keys if dtensor else watch.keys).append(key)
                    break
        watch.pointers = watch._now()
        return watch

    def _now(self) -> list[int]:
        # A sharded model's plain slots (buffers) may become DTensors: self.pointer (_local_ptr) reads those.
        plain = list(map(self.pointer, map(dict.__getitem__, self.owners, self.keys)))
        if not self.shard_keys:
            return plain
        shards = map(_local_shard, map(dict.__getitem__, self.shard_owners, self.shard_keys))
        return plain + list(map(torch.Tensor.data_ptr, shards))

    def replaced(self) -> bool:
        """Whether any watched slot now holds other data (or was removed, or became or stopped being a DTensor)."""
        try:
            return self._now() != self.pointers
        except (KeyError, TypeError, RuntimeError, AttributeError):  # removed, None, no storage, no longer a DTensor
            return True


__all__ = ["Watch"]
