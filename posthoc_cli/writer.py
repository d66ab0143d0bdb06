"""Snapshot writes off the training thread: staging buffers, a writer thread, back-pressure.

The training thread only copies EMA tensors into a free staging set (pinned host
memory when the EMA lives on an accelerator, filled with non-blocking copies and
an event) and queues it. A writer thread waits for that event, writes the file
atomically and hands the staging set back. There are at most ``max_pending``
staging sets, so host memory stays bounded: when all are in flight, the next
snapshot waits for a write to finish. The first write error is kept and raised
in the training thread at its next call.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .container import write_file
from .errors import PosthocError, WriterError


@dataclass
class _Job:
    path: Path
    names: list[str]
    staging: list[torch.Tensor]
    metadata: dict[str, str]
    ready: torch.cuda.Event | None


class SnapshotWriter:
    """Writes snapshot files in order, in the background or (``background=False``) at once."""

    def __init__(self, *, background: bool = True, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._background = background
        self._max_pending = max_pending
        self._free: queue.Queue[list[torch.Tensor]] = queue.Queue()
        self._allocated = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def submit(
        self, path: Path, names: list[str], tensors: list[torch.Tensor], dtypes: list[torch.dtype],
        metadata: dict[str, str],
    ) -> None:
        """Stage ``tensors`` (converted to ``dtypes``) and write them as ``path``."""
        self.raise_error()
        staging = self._acquire(tensors, dtypes)
        with torch.no_grad():
            torch._foreach_copy_(staging, tensors, non_blocking=True)
        ready = None
        if any(t.is_cuda for t in tensors):
            ready = torch.cuda.Event()
            ready.record()
        job = _Job(path, names, staging, metadata, ready)
        if not self._background:
            self._run(job)
            self.raise_error()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="posthoc-ema-writer", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _acquire(self, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """A free staging set, allocated on first need; blocks while ``max_pending`` are in flight."""
        try:
            staging = self._free.get_nowait()
        except queue.Empty:
            if self._allocated >= self._max_pending:
                staging = self._free.get()  # back-pressure: wait for a write to finish
            else:
                self._allocated += 1
                pin = torch.cuda.is_available() and any(t.is_cuda for t in tensors)
                return [torch.empty(t.shape, dtype=d, device="cpu", pin_memory=pin) for t, d in zip(tensors, dtypes)]
        if [(s.shape, s.dtype) for s in staging] != [(t.shape, d) for t, d in zip(tensors, dtypes)]:
            pin = staging[0].is_pinned() if staging else False
            staging = [torch.empty(t.shape, dtype=d, device="cpu", pin_memory=pin) for t, d in zip(tensors, dtypes)]
        return staging

    def _run(self, job: _Job) -> None:
        try:
            if self._error is None:
                if job.ready is not None:
                    job.ready.synchronize()
                write_file(job.path, zip(job.names, job.staging), job.metadata)
        except BaseException as e:  # kept and raised in the training thread
            self._error = e
        finally:
            self._free.put(job.staging)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(job)
            self._jobs.task_done()
        self._jobs.task_done()

    def raise_error(self) -> None:
        """Raise the first write error, once, in the calling (training) thread."""
        error, self._error = self._error, None
        if error is None:
            return
        if isinstance(error, PosthocError):
            raise error
        raise WriterError(f"writing a snapshot failed: {error}", "check the folder and free disk space") from error

    def flush(self) -> None:
        """Wait until every queued snapshot is on disk, then raise any write error."""
        if self._thread is not None:
            self._jobs.join()
        self.raise_error()

    def close(self) -> None:
        """Flush and stop the writer thread."""
        try:
            self.flush()
        finally:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread.join()
                self._thread = None
