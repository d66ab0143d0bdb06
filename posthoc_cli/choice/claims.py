"""Claims: which process evaluates which candidate, so that processes sharing a folder split the work.

A claim is a small file created exclusively (``O_EXCL``, atomic on local and
network file systems alike), holding its owner's host, process id and a random
token. Its owner touches it while the evaluation runs (:meth:`Claims.touch_held`,
from a heartbeat thread) and removes it when done, both only while the file still
holds its token: a claim taken over is never touched or removed by the process it
was taken from. A claim is taken over when its owner is gone: on the same host
(the same hostname and process-id namespace) when no process with its id exists;
from another host when it was not touched for ``timeout`` seconds (a host that
died). Advisory locks would say this better on one machine, but they are not
reliable across NFS clients.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any


def _pid_namespace() -> int | None:
    """The process-id namespace of this process (containers on one host each have their own)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


HOST = socket.gethostname()
PID_NAMESPACE = _pid_namespace()


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
        self._held: dict[object, str] = {}  # key -> the token in its claim file
        self._lock = threading.Lock()

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
            token = uuid.uuid4().hex
            with os.fdopen(fd, "w") as f:
                json.dump({"host": HOST, "pid_namespace": PID_NAMESPACE, "pid": os.getpid(), "token": token,
                           "key": repr(key), "since": time.time()}, f)
            with self._lock:
                self._held[key] = token
            return True
        return False

    def touch_held(self) -> None:
        """A sign of life on every claim this process holds (those taken over meanwhile excepted)."""
        with self._lock:
            held = list(self._held.items())
        for key, token in held:
            path = self.path(key)
            if _owner(path).get("token") == token:
                with contextlib.suppress(OSError):
                    os.utime(path)

    def release(self, key: object) -> None:
        """Remove this process's claim on ``key``, unless another process has taken it over."""
        with self._lock:
            token = self._held.pop(key, None)
        path = self.path(key)
        if token is not None and _owner(path).get("token") == token:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _take_over(self, path: Path) -> bool:
        """Move a stale claim out of the way (True: try again); False when its owner is alive."""
        try:
            before = os.stat(path)
        except FileNotFoundError:
            return True  # released meanwhile
        if not self._stale(before.st_mtime, _owner(path)):
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

    def _stale(self, mtime: float, owner: dict[str, Any]) -> bool:
        pid = owner.get("pid")
        if owner.get("host") == HOST and owner.get("pid_namespace") == PID_NAMESPACE and isinstance(pid, int):
            return pid != os.getpid() and not alive(pid)  # here the process table decides, however long it runs
        return time.time() - mtime > self.timeout


def _owner(path: Path) -> dict[str, Any]:
    """What a claim file says of its owner ({} while it is being written, or once it is gone)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


__all__ = ["HOST", "Claims", "alive"]
