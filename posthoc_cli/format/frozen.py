"""Frozen weights stored once per folder: the file's record, read without torch.

A Recorder that averages only what trains writes the tensors it does not
average once, into ``frozen.safetensors`` beside the snapshots: a safetensors
file whose ``posthoc_ema`` record has ``kind: "frozen"``, an ``id``, the model's
``state_dict`` names in order, and the ``filter`` options. Every snapshot of
that recording names the ``id`` in its own record (``"frozen": id``), so
synthesis finds the file by its header, never by its name, and refuses
snapshots of two recordings mixed in one folder. A sharded model's frozen
weights are a set of rank files instead (:mod:`.frozen_set`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SnapshotFileError
from .container import Header, TensorEntry
from .keys import METADATA_KEY, library_info, utc_now

KIND = "frozen"
FILE_NAME = "frozen.safetensors"
WHERE = "frozen.safetensors (a sharded model: every rank file of frozen/)"
SNAPSHOT_KEY = "frozen"  # the key in a snapshot's record that holds the id of its frozen file


@dataclass(frozen=True)
class FrozenFile:
    """A validated frozen file: its header and record."""

    header: Header
    id: str
    state_dict: tuple[str, ...]  # every name of the recorded model, in its order
    filter: dict[str, Any]
    info: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return self.header.tensors

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def is_frozen(header: Header) -> bool:
    """Whether a header's ``posthoc_ema`` record says ``kind: "frozen"``."""
    try:
        info = json.loads(header.metadata.get(METADATA_KEY, "null"))
    except (ValueError, RecursionError):
        return False
    return isinstance(info, dict) and info.get("kind") == KIND


def read_frozen(header: Header) -> FrozenFile:
    """Validate the record of a frozen file; :class:`SnapshotFileError` says what is wrong."""
    try:
        info = json.loads(header.metadata[METADATA_KEY])
        if info.get("format") != 1 or type(info.get("format")) is not int:
            raise ValueError(f"unsupported format {info.get('format')!r} (this version reads format 1)")
        ident, names, selection = info.get("id"), info.get("state_dict"), info.get("filter", {})
        if not (isinstance(ident, str) and ident.isalnum() and 0 < len(ident) <= 64):
            raise ValueError(f"id {ident!r} is not a short alphanumeric string")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
            raise ValueError("state_dict is not a list of distinct names")
        known = set(names)
        stray = [n for n in header.tensors if n not in known]
        if stray:
            raise ValueError(f"tensor {stray[0]!r} is not in its state_dict list")
        if not isinstance(selection, dict):
            raise ValueError("filter is not an object")
    except (ValueError, RecursionError, AttributeError) as e:
        raise SnapshotFileError(header.path, f"invalid frozen-weights file: {e}", "replace it with the one the Recorder wrote") from e
    return FrozenFile(header, ident, tuple(names), selection, info)


def info_record(ident: str, state_dict: Sequence[str], selection: dict[str, Any]) -> dict[str, Any]:
    """The ``posthoc_ema`` record of a frozen file (a rank file of a set adds ``shard``)."""
    return {
        "format": 1,
        "kind": KIND,
        "id": ident,
        "state_dict": list(state_dict),
        "filter": selection,
        "library": library_info(),
        "created": utc_now(),
    }


def tag(metadata: dict[str, str], ident: str | None, key: str = SNAPSHOT_KEY) -> dict[str, str]:
    """A file's metadata with ``key: ident`` added to its record (a snapshot: the id of its frozen file)."""
    if ident is None:
        return metadata
    info = json.loads(metadata[METADATA_KEY])
    info[key] = ident
    return {**metadata, METADATA_KEY: json.dumps(info, allow_nan=False)}


def options(selection: Mapping[str, Any]) -> str:
    """``average_frozen=False, include=None, exclude=['x.*']``, as the options were passed (from any file)."""
    return ", ".join(f"{key}={value!r}" for key, value in selection.items()) or "no options recorded"
