"""Temporary files: claimed under a lock while a run writes them, removed once the run that left them is gone.

Every output is written as a temporary file (or hidden folder) beside its final
name and renamed into place when complete (:mod:`.atomic`). The writer holds an
advisory lock on it, so another run can tell a live writer's file from one a
killed run left behind, and removes only the latter, and only when it is
provably ours.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so concurrent writers of one file go unnoticed there
    fcntl = None  # type: ignore[assignment]

from ..errors import OutputError
from .container import MAX_HEADER_BYTES

LOCKS = fcntl is not None  # where there are none, concurrent writers of one file go unnoticed


def claim(tmp: Path, path: Path) -> BinaryIO:
    """Create ``tmp`` for writing, exclusively and locked, so that two runs writing ``path``
    at once cannot take over each other's temp file.

    A leftover ``tmp`` that no process holds locked is from a run that died: removed.
    One still locked belongs to a live run: :class:`OutputError`. Creating with "x"
    never follows a symlink planted under the temp name.
    """
    for _ in range(8):
        try:
            file = open(tmp, "xb")
        except FileExistsError:
            remove_if_stale(tmp, path)
            continue
        # Another run may have locked (and removed) our file before we locked it: then retry.
        try:
            if lock(file.fileno()) and os.fstat(file.fileno()).st_nlink:
                return file
        except BaseException:
            file.close()
            raise
        file.close()
    raise busy(tmp, path)


def remove_if_stale(tmp: Path, path: Path) -> None:
    # Opened read-write: NFS grants an exclusive lock only on a file open for writing.
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return
    except OSError as e:
        try:
            regular = S_ISREG(os.lstat(tmp).st_mode)
        except FileNotFoundError:
            return
        if regular:  # a file we may not open may be another user's live run: never remove it blindly
            raise OutputError(
                f"{path}: cannot check its temporary file {tmp.name} ({e.strerror})",
                f"remove {tmp} if no run is writing it",
            ) from e
        os.unlink(tmp)  # a symlink or a special file: no run's temp file (a folder fails here, cleanly)
        return
    try:
        if not lock(fd):
            raise busy(tmp, path)
        if names(tmp, fd):  # still the file we locked
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    finally:
        os.close(fd)


def remove_leftovers(folder: Path) -> None:
    """Remove what runs killed outright (SIGKILL, a lost node) left in ``folder``: ``*.safetensors.tmp``
    files and hidden ``.NAME.*.tmp`` folders that no process holds locked and that are provably ours
    (:func:`_is_ours`: a user's own ``x.safetensors.tmp`` is never touched). Each run removes its own
    (and a rerun the one it would write), but not those of outputs named otherwise, which piled up.
    Where locks do not work nothing is removed: a live run's file could not be told from a dead one's."""
    if fcntl is None:
        return
    try:
        leftovers = [p for p in folder.iterdir() if p.name.endswith(".safetensors.tmp") or _TEMP_FOLDER.fullmatch(p.name)]
    except OSError:
        return
    for path in leftovers:
        with contextlib.suppress(OSError):
            _remove_if_unheld(path)


_TEMP_FOLDER = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # outputs._temp_folder's names


def _remove_if_unheld(path: Path) -> None:
    folder = path.name.startswith(".")
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if folder else os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live run, or no locks on this file system: leave it
            return
        if not names(path, fd) or not _is_ours(path, fd, folder):
            return
        if folder:
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    finally:
        os.close(fd)


_OUTPUT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?(\.tmp)?")  # what a temp folder holds


def _is_ours(path: Path, fd: int, folder: bool) -> bool:
    """Whether a leftover is what our writers make: a file whose header carries our metadata, or a
    non-empty folder of output shards (each with that header) and their index, nothing else. A
    folder just made by a live run is empty until that run holds it (:func:`hold`), so never ours."""
    if not folder:
        return _our_header(fd)
    entries = list(path.iterdir())
    if not entries:
        return False
    for entry in entries:
        if entry.is_symlink() or not entry.is_file() or not _OUTPUT_FILE.fullmatch(entry.name):
            return False
        if ".index.json" not in entry.name:
            inner = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                if not _our_header(inner):
                    return False
            finally:
                os.close(inner)
    return True


def _our_header(fd: int) -> bool:
    """Whether the file open as ``fd`` starts with a safetensors header holding posthoc-ema's metadata."""
    head = os.pread(fd, 8, 0)
    if len(head) != 8:
        return False
    n = int.from_bytes(head, "little")
    return 0 < n <= MAX_HEADER_BYTES and b'"posthoc_ema"' in os.pread(fd, n, 8)


def hold(folder: Path) -> int:
    """Lock ``folder`` for as long as the returned descriptor is open: :func:`remove_leftovers` skips it.

    Another run's :func:`remove_leftovers` may hold the lock for a moment while it looks at the (still
    empty) folder: wait for it rather than go on unlocked."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if fcntl is None:
        return fd
    for _ in range(500):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:  # no locks on this file system: remove_leftovers removes nothing there either
            return fd
    os.close(fd)
    raise OutputError(f"cannot lock the temporary folder {folder}", "check that no other process holds it, then retry")


def names(path: Path, fd: int) -> bool:
    """Whether ``path`` (not following a link) is the file open as ``fd``."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    ours = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (ours.st_dev, ours.st_ino)


def lock(fd: int) -> bool:
    """Take the advisory lock of ``fd``'s file; False when another open file holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        # A file system without locks: written unprotected, as most tools do.
    return True


def busy(tmp: Path, path: Path) -> OutputError:
    return OutputError(
        f"{path} is being written by another run (its temporary file {tmp.name} is in use)",
        "wait for that run to finish, or choose another output",
    )
