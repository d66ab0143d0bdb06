"""Where synthesized bytes go besides an :class:`~.outputs.OutputWriter`: a rank's part of the
reserved output files, or tensors in memory.

A sink takes tensor data in output order through ``write``; the data of one
target, written by one rank, is a contiguous run of its output's bytes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .. import dtypes
from ..format.atomic import output_error
from ..format.container import tensor_bytes

if TYPE_CHECKING:  # sinks are made when a synthesis starts; importing this module needs no torch
    import torch

Pieces = list[tuple[Path, int, int]]  # (temporary file, data offset, bytes) per file of one output


class Sink(Protocol):
    def write(self, data: torch.Tensor) -> None: ...


class PieceSink:
    """Positioned writes of one target's data, from ``position`` on, into the files rank 0 reserved.

    The ranks of a parallel synthesis each write their own byte range of the same
    temporary files (:meth:`.outputs.OutputWriter.reserve`); rank 0 commits them.
    """

    def __init__(self, pieces: Pieces, position: int) -> None:
        self.pieces = pieces
        self.position = position
        self._fds: dict[int, int] = {}

    def _fd(self, k: int) -> int:
        if k not in self._fds:
            path = self.pieces[k][0]
            try:
                self._fds[k] = os.open(path, os.O_WRONLY)
            except OSError as e:
                raise output_error(path, e) from e
        return self._fds[k]

    def write(self, data: torch.Tensor) -> None:
        raw = tensor_bytes(data)
        while raw.nbytes:
            k, base = 0, 0
            while base + self.pieces[k][2] <= self.position:
                base += self.pieces[k][2]
                k += 1
            path, start, size = self.pieces[k]
            take = min(base + size - self.position, raw.nbytes)
            fd, offset, chunk = self._fd(k), start + self.position - base, raw[:take]
            try:
                while chunk.nbytes:
                    written = os.pwrite(fd, chunk, offset)
                    chunk, offset = chunk[written:], offset + written
            except OSError as e:
                raise output_error(path, e) from e
            self.position += take
            raw = raw[take:]

    def finish(self) -> None:
        """Make this rank's writes durable (rank 0 renames only after every rank has)."""
        for k, fd in self._fds.items():
            try:
                os.fsync(fd)
            except OSError as e:
                raise output_error(self.pieces[k][0], e) from e

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}


class MemorySink:
    """Collects an output in memory, for :func:`~.synthesis.load_synthesized`: one tensor each, filled in order."""

    def __init__(self, layout: list[tuple[str, str, tuple[int, ...]]]) -> None:
        import torch

        self.tensors = {name: torch.empty(shape, dtype=dtypes.torch_dtype(code)) for name, code, shape in layout}
        self._pending = iter(self.tensors.values())
        self._current, self._cursor = torch.empty(0, dtype=torch.uint8), 0

    def write(self, data: torch.Tensor) -> None:
        import torch

        raw = data.reshape(-1).view(torch.uint8) if data.numel() else data.new_empty(0, dtype=torch.uint8)
        while raw.numel():
            if self._cursor == self._current.numel():
                self._current, self._cursor = next(self._pending).reshape(-1).view(torch.uint8), 0
            take = min(raw.numel(), self._current.numel() - self._cursor)
            self._current[self._cursor : self._cursor + take] = raw[:take]
            self._cursor, raw = self._cursor + take, raw[take:]
