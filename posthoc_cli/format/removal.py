"""Snapshots removed from a folder, crash-safe: renamed out of the way first, deleted after.

A snapshot (a file, or a sharded set's folder of rank files) is first renamed to
``.removing-<name>`` in its folder: one atomic rename, which scans skip (names
starting with ``.``), so a crash at any point leaves the snapshot either whole and
counted, or gone from every scan — never half a set that counts. The renames are
made durable (folder fsync) before anything is deleted; what a crash leaves behind
under that prefix is ours alone and :func:`finish_removals` deletes it.

>>> remove_snapshots([Path("ckpts/ema-s0.050-t000000001000.safetensors")])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REMOVING_PREFIX = ".removing-"
PRUNED_NOTE = ".pruned.json"  # what `prune --yes` did last: {"band", "max_error", "times", "removed"}; scans skip it


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _delete(path: Path) -> None:
    """Delete a renamed snapshot: a file, or a set folder and the files in it."""
    if path.is_dir() and not path.is_symlink():
        for inner in path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                inner.unlink()
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_snapshots(paths: Sequence[Path]) -> None:
    """Remove snapshot files and set folders: every one renamed out of the way (durably), then deleted."""
    moved = []
    for path in paths:
        aside = path.with_name(REMOVING_PREFIX + path.name)
        if aside.exists():  # a crash left one of this name: it was on its way out already
            _delete(aside)
        os.replace(path, aside)
        moved.append(aside)
    for folder in {p.parent for p in moved}:
        _fsync_folder(folder)
    for aside in moved:
        _delete(aside)


def finish_removals(folder: Path) -> list[Path]:
    """Delete what an interrupted :func:`remove_snapshots` left in ``folder``; returns those paths."""
    try:
        left = sorted(p for p in folder.iterdir() if p.name.startswith(REMOVING_PREFIX))
    except OSError:
        return []
    for path in left:
        _delete(path)
    return left


def write_pruned_note(folder: Path, note: dict[str, Any]) -> None:
    """Record that ``folder`` was pruned (read back by :func:`thinned_by`), written atomically."""
    tmp = folder / (PRUNED_NOTE + ".tmp")
    tmp.write_text(json.dumps(note), encoding="utf-8")
    os.replace(tmp, folder / PRUNED_NOTE)


def thinned_by(folder: Path, latest_record: dict[str, Any]) -> dict[str, Any] | None:
    """How a folder was kept small: the Recorder's ``thinning`` record (``recorder``), the last ``prune``'s note
    (``prune``), both, or None."""
    found: dict[str, Any] = {}
    record = latest_record.get("thinning")
    if isinstance(record, dict) and isinstance(record.get("max_snapshots"), int) and isinstance(record.get("keep_faithful"), list):
        found["recorder"] = {"max_snapshots": record["max_snapshots"], "keep_faithful": record["keep_faithful"]}
    try:
        note = json.loads((folder / PRUNED_NOTE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        note = None
    if isinstance(note, dict) and isinstance(note.get("band"), list) and isinstance(note.get("max_error"), (int, float)):
        found["prune"] = {k: note[k] for k in ("band", "max_error", "times", "removed") if k in note}
    return found or None


__all__ = ["PRUNED_NOTE", "REMOVING_PREFIX", "finish_removals", "remove_snapshots", "thinned_by", "write_pruned_note"]
