"""Flat ranges of a tensor read from its chunks, for synthesis of sharded snapshots.

Synthesis walks every tensor as a flat (C-order) range of elements, slice by
slice, whatever the inputs' chunkings: one slice may cross chunks of a sharded
set, and inputs recorded with different world sizes are chunked differently.
A flat range is a few boxes (a partial row, full rows, a partial row, down the
dimensions); each box is read from the chunks it meets with
:func:`~posthoc_cli.format.sharding.read_region`, which reads only the bytes it needs.
Synthesis is elementwise, so summing these rows gives exactly what the same
values in single files give.

>>> flat_boxes((4, 3), 2, 8)
[((0, 2), (1, 1)), ((1, 0), (1, 3)), ((2, 0), (1, 2))]
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SnapshotFileError
from ..format.container import read_into
from ..format.sharding import Chunk, read_region

if TYPE_CHECKING:  # torch only where tensor data is read (light commands import this module)
    import torch

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """Boxes whose flattened contents, one after another, are elements ``start..stop`` of ``shape``."""
    shape = tuple(shape)
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    r0, c0 = divmod(start, inner)
    r1, c1 = divmod(stop, inner)
    rest = shape[1:]

    def within(row: int, lo: int, hi: int) -> list[Box]:
        return [((row, *o), (1, *s)) for o, s in flat_boxes(rest, lo, hi)]

    if r0 == r1:
        return within(r0, c0, c1)
    boxes: list[Box] = []
    if c0:
        boxes += within(r0, c0, inner)
        r0 += 1
    if r1 > r0:
        boxes.append(((r0, *(0,) * len(rest)), (r1 - r0, *rest)))
    if c1:
        boxes += within(r1, 0, c1)
    return boxes


class Files:
    """Open read descriptors of chunk files, reused from slice to slice (a bounded number at a time).

    >>> files = Files(); fd = files.fd(Path("rank-00000.safetensors")); files.close()  # doctest: +SKIP
    """

    LIMIT = 256  # far below the usual descriptor limit of 1024, whatever the world size

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            if len(self._fds) >= self.LIMIT:
                self.close()
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SnapshotFileError(path, f"cannot open ({e.strerror})", "check that it still exists and is readable") from e
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def read_flat(chunks: Sequence[Chunk], shape: Sequence[int], start: int, out: torch.Tensor, files: Files | None = None) -> None:
    """Fill ``out`` (1-D, contiguous, of the chunks' dtype) with elements ``start..start+len(out)`` of the tensor.

    Chunks of whole rows (FSDP2's dim-0 shards, single files) hold contiguous flat
    ranges: those are read straight into ``out``. Other chunkings go box by box.
    """
    import torch

    shape = tuple(shape)
    stop = start + out.numel()
    solid = [c for c in chunks if c.entry.numel]
    if files is not None and shape and out.numel() and all(c.entry.shape[1:] == shape[1:] for c in solid):
        inner, size = math.prod(shape[1:]), out.element_size()
        raw = out.view(torch.uint8).numpy().data  # bytes: numpy has no bfloat16
        for chunk in solid:
            lo = chunk.offsets[0] * inner
            first, last = max(lo, start), min(lo + chunk.entry.numel, stop)
            if first < last:
                view = raw[(first - start) * size : (last - start) * size]
                read_into(files.fd(chunk.path), chunk.entry, view, (first - lo) * size, path=chunk.path)
        return
    position = start
    for offsets, box in flat_boxes(shape, start, stop):
        n = math.prod(box)
        out[position - start : position - start + n] = read_region(chunks, offsets, box).reshape(-1)
        position += n
