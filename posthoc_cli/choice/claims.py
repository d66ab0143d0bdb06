"""Claims: which process evaluates which candidate, so that processes sharing a folder split the work.

A claim is a small file created exclusively (``O_EXCL``, atomic on local and
network file systems alike), holding its owner's host and process id. Its owner
touches it while the evaluation runs. A claim is taken over when its owner is
gone: on the same host, no process with that id exists; anywhere, it was not
touched for ``timeout`` seconds (a host that died). Advisory locks would say
this better on one machine, but they are not reliable across NFS clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

HOST = socket.gethostname()


def alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


class Claims:
    """The claims of one sweep, one file per evaluation in ``folder``."""

    def __init__(self, folder: Path, timeout: float) -> None:
        self.folder = folder
        self.timeout = timeout

    def path(self, key: object) -> Path:
        return self.folder / (hashlib.sha256(repr(key).encode()).hexdigest()[:24] + ".claim")

    def take(self, key: object) -> bool:
        """Claim ``key`` for this process: True when it is ours now, False when a live owner holds it."""
        path = self.path(key)
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(4):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._take_over(path):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": HOST, "pid": os.getpid(), "key": repr(key), "since": time.time()}, f)
            return True
        return False

    def touch(self, key: object) -> None:
        with contextlib.suppress(OSError):
            os.utime(self.path(key))

    def release(self, key: object) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def _take_over(self, path: Path) -> bool:
        """Move a stale claim out of the way (True: try again); False when its owner is alive."""
        try:
            before = os.stat(path)
            owner = json.loads(path.read_text(encoding="utf-8") or "null")
        except FileNotFoundError:
            return True  # released meanwhile
        except (OSError, ValueError):
            owner = None  # being written this instant, or damaged: judged by its age alone
        if not self._stale(before.st_mtime, owner):
            return False
        # Renamed, not removed: of several processes taking over, one alone moves it. If what moved is
        # no longer the claim judged stale (another process replaced it meanwhile), it goes back.
        grave = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.stale")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return True
        moved = os.stat(grave)
        if (moved.st_ino, moved.st_dev) != (before.st_ino, before.st_dev):
            with contextlib.suppress(OSError):
                os.link(grave, path)  # fails only if yet another claim is there: that one stands
            grave.unlink(missing_ok=True)
            return False
        grave.unlink(missing_ok=True)
        return True

    def _stale(self, mtime: float, owner: object) -> bool:
        if time.time() - mtime > self.timeout:
            return True
        if isinstance(owner, dict) and owner.get("host") == HOST and isinstance(owner.get("pid"), int):
            return owner["pid"] != os.getpid() and not alive(owner["pid"])
        return False


__all__ = ["HOST", "Claims", "alive"]
