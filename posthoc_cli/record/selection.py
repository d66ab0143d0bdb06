"""What the Recorder averages (docs/design.md §8): a role for every state-dict name.

Each tensor of the model gets one of three roles:

- ``averaged``: an EMA is kept and written in every snapshot (parameters that
  require grad, floating-point buffers such as BatchNorm statistics);
- ``as-is``: integer and bool buffers (``num_batches_tracked``), written in
  every snapshot as they are (docs/design.md §2);
- ``stored once``: frozen parameters, and whatever the patterns leave out,
  written once per folder (:mod:`.frozen`), never averaged.

A stored-once tensor must stay constant, so a parameter that requires grad is
never stored once, and tied weights (one tensor under two names) share a role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from ..errors import InvalidValueError, few

AVERAGED = "averaged"
AS_IS = "as-is"
STORED_ONCE = "stored once"


def _patterns(label: str, value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else tuple(value)  # one pattern passed bare is still one pattern
    if not all(isinstance(p, str) and p for p in items):
        raise InvalidValueError(f"{label}={value!r} is not a list of glob patterns", f'pass e.g. {label}=["text_encoder.*"]')
    return items


@dataclass(frozen=True)
class Filter:
    """The Recorder's options that choose what is averaged.

    >>> Filter.make(exclude="text_encoder.*").exclude
    ('text_encoder.*',)
    """

    average_frozen: bool = False
    include: tuple[str, ...] | None = None  # None: every name
    exclude: tuple[str, ...] = ()

    @classmethod
    def make(
        cls,
        *,
        average_frozen: bool = False,
        include: str | Iterable[str] | None = None,
        exclude: str | Iterable[str] | None = None,
    ) -> Filter:
        if not isinstance(average_frozen, bool):
            raise InvalidValueError(f"average_frozen={average_frozen!r} is not a bool", "pass True or False")
        return cls(average_frozen, _patterns("include", include), _patterns("exclude", exclude) or ())

    def describe(self) -> str:
        """``average_frozen=False, include=None, exclude=['text_encoder.*']``: the options as a user types them."""
        include = None if self.include is None else list(self.include)
        return f"average_frozen={self.average_frozen}, include={include!r}, exclude={list(self.exclude)!r}"

    def as_json(self) -> dict[str, object]:
        return {
            "average_frozen": self.average_frozen,
            "include": None if self.include is None else list(self.include),
            "exclude": list(self.exclude),
        }

    def selects(self, name: str) -> bool:
        """Whether the patterns keep ``name`` (before looking at requires_grad and dtypes)."""
        included = self.include is None or any(fnmatchcase(name, p) for p in self.include)
        return included and not any(fnmatchcase(name, p) for p in self.exclude)


def role_of(tensor: torch.Tensor, kept: bool, average_frozen: bool) -> str:
    """The role of one state-dict entry (a Parameter or a buffer, as ``state_dict(keep_vars=True)`` gives it)."""
    if not kept:
        return STORED_ONCE
    if not tensor.is_floating_point():
        return AS_IS
    if isinstance(tensor, nn.Parameter) and not tensor.requires_grad and not average_frozen:
        return STORED_ONCE
    return AVERAGED


def select(state: Mapping[str, torch.Tensor], f: Filter) -> dict[str, str]:
    """The role of every name of ``state`` (names without wrapper prefixes, tensors from
    ``state_dict(keep_vars=True)``), in the model's order.

    >>> select(nn.Linear(2, 2).state_dict(keep_vars=True), Filter.make(exclude="bias"))
    {'weight': 'averaged', 'bias': 'stored once'}
    """
    names = list(state)
    for label, patterns in (("include", f.include or ()), ("exclude", f.exclude)):
        for pattern in patterns:
            if not any(fnmatchcase(n, pattern) for n in names):
                raise InvalidValueError(
                    f"{label} pattern {pattern!r} matches no tensor of the model",
                    f"patterns are globs over state_dict() names without 'module.'/'_orig_mod.', e.g. {few(names)}",
                )
    roles = {n: role_of(t, f.selects(n), f.average_frozen) for n, t in state.items()}
    training = [n for n, t in state.items() if roles[n] == STORED_ONCE and t.requires_grad]
    if training:
        raise InvalidValueError(
            f"{few(training)} require grad but the patterns leave them out: stored once, they would keep their initial values",
            "freeze them (requires_grad_(False)) before creating the Recorder, or change include=/exclude=",
        )
    by_tensor: dict[int, list[str]] = {}  # tied weights: one Parameter under several names
    for n, t in state.items():
        by_tensor.setdefault(id(t), []).append(n)
    for tied in by_tensor.values():
        if len({roles[n] for n in tied}) > 1:
            raise InvalidValueError(
                f"{few(tied)} are one tied tensor, but the patterns select only some of these names",
                "select all of them or none with include=/exclude=",
            )
    if AVERAGED not in roles.values():
        hint = (
            "create the Recorder after unfreezing what you train, or pass average_frozen=True"
            if f.include is None and not f.exclude
            else "check include=/exclude= (or pass average_frozen=True)"
        )
        raise InvalidValueError(f"nothing to average: no floating-point tensor selected with {f.describe()}", hint)
    return roles


def describe_difference(recorded: Mapping[str, str], ours: Mapping[str, str]) -> str | None:
    """The first tensor whose role differs between a recording and a new Recorder (None: none does)."""
    changed = [n for n in ours if n in recorded and recorded[n] != ours[n]]
    if not changed:
        return None
    first = changed[0]
    more = f" (and {len(changed) - 1} more tensors)" if len(changed) > 1 else ""
    return f"{first!r} was {recorded[first]} there but would be {ours[first]} here{more}"


__all__ = ["AS_IS", "AVERAGED", "STORED_ONCE", "Filter", "describe_difference", "role_of", "select"]
