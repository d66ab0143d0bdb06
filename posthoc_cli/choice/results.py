"""The results of a sweep: one JSON line per evaluation, appended atomically to a file that outlives any crash.

The file is the sweep's only state. A rerun reads it and skips what is done;
processes on several hosts that share the folder append to the same file. Each
line is written with one ``write`` on a file opened for appending, then synced,
so lines never interleave and a finished evaluation survives a crash of the
machine. A line a crash cut short is skipped when read (and the next one starts
on a fresh line). The latest line of an evaluation wins.

Appends are also serialized by a lock file created exclusively: on a network file
system ``O_APPEND`` is only emulated by each client, so two hosts appending at
once could overwrite each other's line; an ``O_EXCL`` create is atomic there, and
opening the file after the lock is taken sees every earlier line (close-to-open).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..format.keys import SWEEPS_FOLDER
from ..format.snapshot import Snapshot
from .space import Key

_STALE_LOCK = 30.0  # seconds: an append takes microseconds, so a lock this old was left by a killed process


def default_path(folder: Path, identity: str, snapshots: Sequence[Snapshot], metric: str | None = None) -> Path:
    """``DIR/sweeps/<slug>-<digest>.jsonl``: named by the evaluation (its command, or the evaluating function)
    and the snapshot set, so a changed command or a folder with other snapshots starts a new file."""
    digest = hashlib.sha256()
    for part in (identity, metric or "", *(f"{s.path.name}:{s.t}:{s.sigma_rel!r}" for s in snapshots)):
        digest.update(part.encode() + b"\0")
    slug = "-".join(_words(identity)[:2])[:40].strip(".-") or "sweep"
    return folder / SWEEPS_FOLDER / f"{slug}-{digest.hexdigest()[:10]}.jsonl"


def _words(identity: str) -> list[str]:
    """The program and its first argument, without their folders: ``python eval.py`` for ``/venv/bin/python /x/eval.py {weights}``."""
    try:
        tokens = shlex.split(identity)
    except ValueError:  # unbalanced quotes: the shell will say so when it runs
        tokens = identity.split()
    names = [os.path.basename(t.rstrip("/")) for t in tokens if not t.startswith(("-", "{"))]
    return [w for w in (re.sub(r"[^A-Za-z0-9._]+", "_", n).strip("._") for n in names) if w]


class Results:
    """The results file of one sweep."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, row: dict[str, Any]) -> None:
        """Add one evaluation, atomically and durably."""
        line = json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._write(line)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path.with_name(self.path.name + ".lock")
        while True:
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                break
            except FileExistsError:
                try:
                    held = time.time() - os.stat(lock).st_mtime
                except FileNotFoundError:
                    continue
                if held > _STALE_LOCK:  # its holder was killed while appending: break it (one breaker wins)
                    with contextlib.suppress(OSError):
                        aside = lock.with_name(f"{lock.name}.{uuid.uuid4().hex[:8]}")
                        os.rename(lock, aside)
                        os.unlink(aside)
                    continue
                time.sleep(0.005)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)

    def _write(self, line: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line left by a crash: do not extend it
                line = "\n" + line
            data = line.encode()
            written = os.write(fd, data)
            if written != len(data):  # a full disk: the torn line is skipped when read
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)

    def rows(self) -> list[dict[str, Any]]:
        """Every complete line, in the order written."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        rows = []
        for line in data.splitlines():
            with contextlib.suppress(ValueError):
                row = json.loads(line)
                if isinstance(row, dict) and {"target", "step", "repeat", "status"} <= row.keys():
                    rows.append(row)
        return rows

    def latest(self) -> dict[Key, dict[str, Any]]:
        """The latest line of each evaluation."""
        return {(row["target"], row["step"], row["repeat"]): row for row in self.rows()}


__all__ = ["Results", "default_path"]
