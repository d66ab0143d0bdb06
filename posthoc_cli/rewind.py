"""Rewinding a snapshot folder to an earlier time: an abandoned future is set aside, never deleted.

A run resumed from a trainer checkpoint at step t continues from t. Snapshots
that the interrupted run wrote *after* t belong to a future that will not
happen: mixing them with the new run's snapshots would give synthesis two
different trajectories under one time axis. They are moved into a hidden
subfolder ``.abandoned-after-t<t>`` of the snapshot folder, which scans skip
(names starting with ``.``), so the user can still look at them or delete them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidValueError, OutputError, SnapshotFileError
from .snapshots import SUFFIX, NotASnapshot, read_snapshot

ABANDONED_PREFIX = ".abandoned-after-t"


def _later_snapshots(folder: Path, t: int) -> list[Path]:
    """Every snapshot file (duplicates included) whose header says it was written after ``t``."""
    later = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(SUFFIX) or not path.is_file():
            continue
        try:
            snap = read_snapshot(path)
        except (NotASnapshot, SnapshotFileError):
            continue  # foreign or broken files are the scan's business, not part of a future
        if snap.kind == "snapshot" and snap.t > t:
            later.append(path)
    return later


def _fresh_folder(folder: Path, t: int) -> Path:
    """``.abandoned-after-t000000000150``, or ``…-2``, ``…-3`` when an earlier rewind to t left one."""
    base = folder / f"{ABANDONED_PREFIX}{t:012d}"
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


def set_aside_after(ckpt_dir: str | os.PathLike[str], t: int) -> Path | None:
    """Move the snapshots of ``ckpt_dir`` written after time ``t`` into a subfolder that scans ignore.

    Returns that subfolder, or None when there was nothing to move. Files are
    moved with ``os.replace`` inside one file system (atomic per file); a crash
    midway leaves each file either in place or set aside, and running again
    moves the rest. Under ``torch.distributed`` call it on one rank only (the
    writing one) and let the others wait for it.

    >>> set_aside_after("ckpts", 1500)  # doctest: +SKIP
    PosixPath('ckpts/.abandoned-after-t000000001500')
    """
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise InvalidValueError(f"t={t!r} is not a non-negative integer", "pass the training time to rewind to")
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    later = _later_snapshots(folder, t)
    if not later:
        return None
    try:
        aside = _fresh_folder(folder, t)
        for path in later:
            os.replace(path, aside / path.name)
        for synced in (aside, folder):  # the renames survive a power loss
            fd = os.open(synced, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        raise OutputError(
            f"cannot move the snapshots written after t={t} out of {folder} ({e.strerror})",
            "check the folder's permissions, or move them yourself",
        ) from e
    return aside


__all__ = ["ABANDONED_PREFIX", "set_aside_after"]
