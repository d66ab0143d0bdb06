"""Rewinding a snapshot folder to an earlier time: an abandoned future is set aside, never deleted.

A run resumed from a trainer checkpoint at step t continues from t. Snapshots
that the interrupted run wrote *after* t belong to a future that will not
happen: mixing them with the new run's snapshots would give synthesis two
different trajectories under one time axis. They are moved into a hidden
subfolder ``.abandoned-after-t<t>`` of the snapshot folder, which scans skip
(names starting with ``.``), so the user can still look at them or delete them.
A sharded snapshot (a set folder ``ema-s…-t…/`` of rank files) moves as one
folder, finished or not.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidValueError, OutputError, SnapshotFileError
from ..format.keys import SUFFIX
from ..format.snapshot import NotASnapshot
from ..format.snapshot_set import read_snapshot

ABANDONED_PREFIX = ".abandoned-after-t"


# A set folder's name, ``ema-s0.050-t000000000150``: its time when no rank file is readable yet (a crash mid-write).
_SET_NAME = re.compile(r"ema-s[0-9.]+-t([0-9]+)")


def _set_time(folder: Path) -> int | None:
    """The time of a sharded snapshot's set folder (from its rank files' headers), or None if it is not one."""
    names = [p.name for p in folder.iterdir() if not p.name.startswith(".")]
    if not names or not all(n.startswith("rank-") and n.endswith((SUFFIX, SUFFIX + ".tmp")) for n in names):
        return None  # a user's folder, never moved
    for name in sorted(names):
        if name.endswith(SUFFIX):
            try:
                snap = read_snapshot(folder / name)
            except (NotASnapshot, SnapshotFileError):
                continue
            return snap.t if snap.kind == "snapshot" and "shard" in snap.info else None
    match = _SET_NAME.fullmatch(folder.name)  # only unfinished rank files: the name says when
    return int(match.group(1)) if match else None


def _later_snapshots(folder: Path, t: int) -> list[Path]:
    """Every snapshot file or set folder (duplicates included) whose header says it was written after ``t``."""
    later = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            written = _set_time(path)
            if written is not None and written > t:
                later.append(path)
            continue
        if not path.name.endswith(SUFFIX) or not path.is_file():
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

    Returns that subfolder, or None when there was nothing to move. Files and
    sharded set folders are moved with ``os.replace`` inside one file system
    (atomic each); a crash midway leaves each either in place or set aside, and
    running again moves the rest. Under ``torch.distributed`` call it on exactly
    one rank, while no rank writes, and let the others wait for it at a barrier
    (sharded runs too: every rank sees the same folder).

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
