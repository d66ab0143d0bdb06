"""Snapshot writes off the training thread: staging buffers, copy and write threads, back-pressure.

A snapshot must capture the EMAs at time t while training goes on. What the
training thread does at ``snapshot()`` is only to queue the work:

- host tensors that change under training (the model's integer buffers) are
  copied at once — they are small (on an accelerator: cloned there first);
- accelerator tensors are copied into pinned host memory with non-blocking
  copies on a side stream, and an event marks when they are done;
- host EMA tensors, the bulk, are copied into staging memory by a copy
  thread. The EMAs only change in the next update, so the Recorder waits on
  :meth:`Job.wait_released` there — by then the copy, which ran while
  the training step computed, is normally long finished. On an accelerator
  the next update waits for the copy on the device, never on the host.

A second thread then writes the files atomically and returns the staging sets.
There are at most ``max_pending`` staging sets, so host memory is bounded: when
all are in flight, the next snapshot waits for a write to finish. The first
write error is kept and raised in the training thread at its next call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import PosthocError, WriterError
from ..format.atomic import write_file


@dataclass
class Job:
    path: Path
    names: list[str]
    staging: list[torch.Tensor]
    metadata: dict[str, str]
    deferred: list[tuple[int, torch.Tensor]]  # (slot, source) copied by the writer thread
    ready: torch.cuda.Event | None  # accelerator copies done
    released: threading.Event = field(default_factory=threading.Event)  # host sources may change again
    failed: bool = False  # set by the writer when this file could not be written

    def wait_released(self) -> None:
        """Block until the sources may change: the host waits for the writer's copy, the device for its own."""
        self.released.wait()
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)  # ordered on the device, no host sync


class SnapshotWriter:
    """Writes snapshot files in order, in the background or (``background=False``) at once.

    ``max_pending`` is the number of staging sets (one per file in flight).
    """

    def __init__(self, *, background: bool = True, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._background = background
        self._max_pending = max_pending
        self._free: queue.Queue[list[torch.Tensor]] = queue.Queue()
        self._allocated = 0
        # Two stages, each its own thread: copies release the EMAs, writes follow, so a slow
        # disk never holds up the copy (and so the training thread) of a later snapshot.
        self._copies: queue.Queue[tuple[list[Job], Callable[[], None] | None] | None] = queue.Queue()
        self._writes: queue.Queue[tuple[list[Job], Callable[[], None] | None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._side_stream: torch.cuda.Stream | None = None

    def stage(
        self,
        path: Path,
        names: list[str],
        tensors: list[torch.Tensor],
        dtypes: list[torch.dtype],
        metadata: dict[str, str],
        *,
        stable: list[bool],
    ) -> Job:
        """Prepare ``tensors`` (as ``dtypes``) to be written as ``path``; :meth:`submit` queues it.

        ``stable[i]`` says tensor i does not change until the caller has called
        ``wait_released()`` on the job (an EMA, before its next update), so its
        copy can happen on the writer thread. Other host tensors are copied now.
        """
        self.raise_error()
        staging = self._acquire(tensors, dtypes)
        deferred, ready = [], None
        with torch.no_grad():
            for i, (src, dst) in enumerate(zip(tensors, staging)):
                if src.is_cuda:
                    ready = ready or self._cuda_event_after_copies(tensors, staging, stable)
                elif stable[i] and self._background:
                    deferred.append((i, src))
                else:
                    dst.copy_(src)
        job = Job(path, names, staging, metadata, deferred, ready)
        if not deferred:
            job.released.set()  # nothing for the host to copy (device copies are ordered by `ready`)
        return job

    def submit(self, jobs: list[Job], then: Callable[[], None] | None = None) -> None:
        """Write ``jobs`` (the files of one snapshot time): every copy first, then the files.

        ``then`` runs on the writer thread once all of them are on disk (not after a failure).
        """
        if not self._background:
            self._copy(jobs)
            self._write(jobs, then)
            self.raise_error()
            return
        if not self._threads:
            self._threads = [
                threading.Thread(target=loop, name=f"posthoc-ema-{name}", daemon=True)
                for name, loop in (("copy", self._copy_loop), ("write", self._write_loop))
            ]
            for thread in self._threads:
                thread.start()
        self._copies.put((jobs, then))

    def _cuda_event_after_copies(
        self, tensors: list[torch.Tensor], staging: list[torch.Tensor], stable: list[bool]
    ) -> torch.cuda.Event:
        """Copy every CUDA tensor to pinned memory on a side stream; the event marks the end.

        Tensors that training changes (integer buffers) are cloned on the main stream first, so the
        next step cannot overwrite them before the side stream reads them.
        """
        tensors = [t if keep or not t.is_cuda else t.clone() for t, keep in zip(tensors, stable)]
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._side_stream.wait_stream(main)  # the copies see the finished EMA update
        with torch.cuda.stream(self._side_stream):
            for src, dst in zip(tensors, staging):
                if src.is_cuda:
                    dst.copy_(src, non_blocking=True)
                    src.record_stream(self._side_stream)
            event = torch.cuda.Event()
            event.record()
        return event

    def _acquire(self, tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """A free staging set, allocated on first need; blocks while ``max_pending`` are in flight."""
        try:
            staging = self._free.get_nowait()
        except queue.Empty:
            if self._allocated < self._max_pending:
                self._allocated += 1
                staging = []
            else:
                staging = self._free.get()  # back-pressure: wait for a write to finish
        if [(s.shape, s.dtype) for s in staging] != [(t.shape, d) for t, d in zip(tensors, dtypes)]:
            pin = torch.cuda.is_available() and any(t.is_cuda for t in tensors)
            staging = [torch.empty(t.shape, dtype=d, device="cpu", pin_memory=pin) for t, d in zip(tensors, dtypes)]
        return staging

    def _fail(self, job: Job, error: BaseException) -> None:
        job.failed = True
        self._error = self._error or error  # kept and raised in the training thread

    def _copy(self, jobs: list[Job]) -> None:
        for job in jobs:
            try:
                if job.deferred:
                    with torch.no_grad():
                        torch._foreach_copy_([job.staging[i] for i, _ in job.deferred], [s for _, s in job.deferred])
            except BaseException as e:
                self._fail(job, e)
            finally:
                job.deferred = []
                job.released.set()

    def _write(self, jobs: list[Job], then: Callable[[], None] | None) -> None:
        for job in jobs:  # every file is attempted: one failure does not cost the others
            try:
                if not job.failed:
                    if job.ready is not None:
                        job.ready.synchronize()
                    write_file(job.path, zip(job.names, job.staging), job.metadata)
            except BaseException as e:
                self._fail(job, e)
            finally:
                self._free.put(job.staging)
                job.staging = []
        if then is not None and not any(job.failed for job in jobs):
            try:
                then()
            except BaseException as e:
                self._error = self._error or e

    def _copy_loop(self) -> None:
        while (item := self._copies.get()) is not None:
            self._copy(item[0])
            self._writes.put(item)
            self._copies.task_done()
        self._writes.put(None)
        self._copies.task_done()

    def _write_loop(self) -> None:
        while (item := self._writes.get()) is not None:
            self._write(*item)
            self._writes.task_done()
        self._writes.task_done()

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
        if self._threads:
            self._copies.join()
            self._writes.join()
        self.raise_error()

    def close(self) -> None:
        """Flush and stop the writer threads."""
        try:
            self.flush()
        finally:
            if self._threads:
                self._copies.put(None)
                for thread in self._threads:
                    thread.join()
                self._threads = []
