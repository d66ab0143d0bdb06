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
import os
from collections.abc import Sequence
from pathlib import Path

REMOVING_PREFIX = ".removing-"


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


__all__ = ["REMOVING_PREFIX", "finish_removals", "remove_snapshots"]
