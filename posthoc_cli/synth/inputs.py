"""The inputs of a synthesis, one slice at a time: each snapshot's bytes of the slice are one row of ``X``.

On Linux the rows are the page cache itself, mapped side by side (:mod:`.mapping`);
elsewhere, for narrow slices, and for sharded snapshots (:mod:`.chunked`) they are
read into a reused buffer. Either way the rows come in groups by where the tensor
starts within a page, so that the sums (:mod:`.stream`) are the same
however the rows were fetched.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SnapshotFileError
from ..format.container import TensorEntry, read_into
from ..format.snapshot import Snapshot
from . import mapping
from .chunked import Files, read_flat
from .plan import virtual_entries

if TYPE_CHECKING:  # readers are made when a synthesis starts; importing this module needs no torch
    import torch

_MAP_MIN_BYTES = mapping.PAGE  # narrower slices (per input) are cheaper to read than to map
_PREFETCH_BYTES = 1 << 20  # read-ahead hints only for slices this large (one syscall per input each)

Groups = list[tuple[list[int], "torch.Tensor"]]  # (input indices, their rows of X => [len(indices), count]) pairs


class InputFiles:
    """Read access to the input files; at most as many kept open as the descriptor limit allows."""

    def __init__(self, snaps: list[Snapshot]) -> None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.snaps = snaps
        self.keep_open = soft == resource.RLIM_INFINITY or len(snaps) + 64 <= soft // 2
        self._fds: list[int] = []
        try:
            for snap in snaps if self.keep_open else []:
                self._fds.append(self._open(snap))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(snap: Snapshot) -> int:
        try:
            return os.open(snap.path, os.O_RDONLY)
        except OSError as e:
            raise SnapshotFileError(snap.path, f"cannot open ({e.strerror})", "check that it still exists and is readable") from e

    def read(self, i: int, name: str, out: memoryview, start: int) -> None:
        snap = self.snaps[i]
        fd = self._fds[i] if self.keep_open else self._open(snap)
        try:
            read_into(fd, snap.tensors[name], out, start, path=snap.path)
        finally:
            if not self.keep_open:
                os.close(fd)

    def source(self, i: int, name: str, start: int, length: int) -> tuple[int, int]:
        """``(fd, file offset)`` of a range that is checked to exist now (a mapping past the end would crash)."""
        snap, fd = self.snaps[i], self._fds[i]
        offset = snap.tensors[name].begin + start
        if os.fstat(fd).st_size < offset + length:
            raise SnapshotFileError(snap.path, f"ended while reading tensor {name!r}", "the file was truncated; replace it")
        return fd, offset

    def prefetch(self, i: int, name: str, start: int, length: int) -> None:
        """Ask the kernel to start reading a range now, so a cold disk works while we compute."""
        if self.keep_open and hasattr(os, "posix_fadvise"):
            entry = self.snaps[i].tensors[name]
            os.posix_fadvise(self._fds[i], entry.begin + start, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


@dataclass(frozen=True)
class Slice:
    """``count`` elements of one tensor from ``start`` on, in every input; ``averaged`` unless it is an integer buffer."""

    entry: TensorEntry
    start: int  # first element
    count: int  # elements
    averaged: bool

    @property
    def offset(self) -> int:
        """Bytes from the tensor's start."""
        return self.start * self.entry.dtype.itemsize

    @property
    def width(self) -> int:
        """Bytes per input."""
        return self.count * self.entry.dtype.itemsize


class Reader:
    """The inputs' rows of one slice: mapped side by side (no copy) where possible, else read into a buffer."""

    def __init__(self, files: InputFiles, slices: list[Slice], n: int, buffer_bytes: int) -> None:
        import torch

        self.files = files
        self.buffer_bytes = buffer_bytes  # the least a read buffer holds, so it is rarely made again
        self._buffer = torch.empty(0, dtype=torch.uint8)
        widest = max((s.width for s in slices if s.averaged), default=0)
        self._rows: mapping.MappedRows | None = None
        if mapping.supported() and files.keep_open and widest >= _MAP_MIN_BYTES:
            with contextlib.suppress(OSError):  # no address space (ulimit -v): read instead
                self._rows = mapping.MappedRows(n, widest)

    def groups(self, s: Slice, inputs: list[int]) -> Groups:
        """``(input indices, X => [len(indices), count])`` pairs covering ``inputs``."""
        if len(inputs) * s.width >= _PREFETCH_BYTES:
            for i in inputs:  # all files at once: a cold disk gets a deep queue instead of one read at a time
                self.files.prefetch(i, s.entry.name, s.offset, s.width)
        parts = self._parts(s, inputs)
        if self._rows is not None and s.averaged and s.width >= _MAP_MIN_BYTES:
            try:
                mapped = self._mapped(s, parts)
            except OSError:  # e.g. a file system that cannot map files: read from now on
                self._rows.close()
                self._rows = None
            else:
                if mapped is not None:
                    return mapped
        x = self.read(s, [i for members in parts for i in members])
        return [(members, rows) for members, rows in zip(parts, x.split([len(m) for m in parts]))]

    def _parts(self, s: Slice, inputs: list[int]) -> list[list[int]]:
        """``inputs`` grouped by where the tensor starts within a page, in that order.

        Mapped rows share one stride, so inputs whose data sits at other positions in
        a page (headers of other lengths) are multiplied group by group. The groups
        depend only on the files, and read slices are summed group by group too, so
        the sums do not depend on where slices end or on how they were fetched.
        """
        def phase(i: int) -> int:
            return self.files.snaps[i].tensors[s.entry.name].begin % mapping.PAGE

        return [list(run) for _, run in itertools.groupby(sorted(inputs, key=phase), key=phase)]

    def _mapped(self, s: Slice, parts: list[list[int]]) -> Groups | None:
        assert self._rows is not None
        sources = {i: self.files.source(i, s.entry.name, s.offset, s.width) for members in parts for i in members}
        if any(offset % s.entry.dtype.itemsize for _, offset in sources.values()):
            return None  # an unaligned tensor cannot be viewed in place
        groups: Groups = []
        first = 0  # slots are filled group after group
        for members in parts:
            x = self._rows.view(first, [sources[i] for i in members], s.width)
            groups.append((members, x.view(s.entry.dtype)))
            first += len(members)
        return groups

    def read(self, s: Slice, inputs: list[int]) -> torch.Tensor:
        """The rows of ``inputs`` read (copied) into the reused buffer."""
        import torch

        if s.count == 0:
            return torch.empty((len(inputs), 0), dtype=s.entry.dtype)  # an empty tensor: no bytes to view
        need = len(inputs) * s.width
        if self._buffer.numel() < need:
            self._buffer = torch.empty(max(need, self.buffer_bytes), dtype=torch.uint8)
        view = self._buffer.numpy().data  # bytes: numpy has no bfloat16
        for r, i in enumerate(inputs):
            self.files.read(i, s.entry.name, view[r * s.width : (r + 1) * s.width], s.offset)
        return self._buffer[:need].view(len(inputs), s.width).view(s.entry.dtype)

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


class ChunkReader:
    """The inputs' rows of one slice, gathered from their chunks (some input is a sharded set).

    Rows are grouped as :meth:`Reader._parts` groups them, by where the tensor
    would start within a page in the single file our writer makes of the same
    layout, so a sharded recording sums in the same order as single files.
    """

    def __init__(self, snaps: list[Snapshot], buffer_bytes: int) -> None:
        import torch

        self.snaps = snaps
        self.buffer_bytes = buffer_bytes
        self._phases = [{e.name: e.begin % mapping.PAGE for e in _phase_entries(s)} for s in snaps]
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._files = Files()

    def groups(self, s: Slice, inputs: list[int]) -> Groups:
        order = sorted(inputs, key=lambda i: self._phases[i][s.entry.name])
        parts = [list(run) for _, run in itertools.groupby(order, key=lambda i: self._phases[i][s.entry.name])]
        x = self.read(s, [i for members in parts for i in members])
        return [(members, rows) for members, rows in zip(parts, x.split([len(m) for m in parts]))]

    def read(self, s: Slice, inputs: list[int]) -> torch.Tensor:
        import torch

        need = len(inputs) * s.width
        if self._buffer.numel() < need:
            self._buffer = torch.empty(max(need, self.buffer_bytes), dtype=torch.uint8)
        x = self._buffer[:need].view(len(inputs), s.width).view(s.entry.dtype)
        for r, i in enumerate(inputs):
            read_flat(self.snaps[i].chunks[s.entry.name], s.entry.shape, s.start, x[r], self._files)
        return x

    def close(self) -> None:
        self._files.close()


def _phase_entries(snap: Snapshot) -> list[TensorEntry]:
    return virtual_entries(snap) if snap.sharded else list(snap.tensors.values())
