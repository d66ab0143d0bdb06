"""The Recorder's scalar options, checked before anything is made: each refusal names the option and a fix."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..dtypes import storage_names
from ..ema.profiles import check_sigma_rel
from ..errors import InvalidValueError


def checked_options(
    sigma_rels: Sequence[float],
    *,
    snapshot_every: int,
    update_every: int,
    time_unit: str,
    snapshot_dtype: torch.dtype,
    max_pending: int,
) -> tuple[float, ...]:
    """Refuse an option the Recorder cannot use; the sigma_rels, checked, as a tuple.

    >>> checked_options([0.05, 0.1], snapshot_every=1000, update_every=1, time_unit="step",
    ...                 snapshot_dtype=torch.float32, max_pending=1)
    (0.05, 0.1)
    """
    checked = tuple(check_sigma_rel(s) for s in sigma_rels)
    if not checked or len(set(checked)) != len(checked):
        raise InvalidValueError(f"sigma_rels {checked} must be distinct and non-empty", "e.g. sigma_rels=(0.05, 0.10)")
    for label, value in (("snapshot_every", snapshot_every), ("update_every", update_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidValueError(f"{label}={value!r} is not a positive integer", f"pass e.g. {label}=1000")
    if not (isinstance(time_unit, str) and time_unit.isprintable() and time_unit):
        raise InvalidValueError(f"time_unit {time_unit!r} is not a printable name", 'use e.g. "step", "sample" or "token"')
    if snapshot_dtype not in storage_names():
        raise InvalidValueError(
            f"snapshot_dtype {snapshot_dtype} is not supported", "use torch.float32, torch.float16 or torch.bfloat16"
        )
    if not isinstance(max_pending, int) or max_pending < 1:
        raise InvalidValueError(f"max_pending={max_pending!r} is not a positive integer", "pass e.g. max_pending=1")
    return checked


__all__ = ["checked_options"]
