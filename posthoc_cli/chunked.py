"""Flat ranges of a tensor read from its chunks, for synthesis of sharded snapshots.

Synthesis walks every tensor as a flat (C-order) range of elements, slice by
slice, whatever the inputs' chunkings: one slice may cross chunks of a sharded
set, and inputs recorded with different world sizes are chunked differently.
A flat range is a few boxes (a partial row, full rows, a partial row, down the
dimensions); each box is read from the chunks it meets with
:func:`~posthoc_cli.sharding.read_region`, which reads only the bytes it needs.
Synthesis is elementwise, so summing these rows gives exactly what the same
values in single files give.

>>> flat_boxes((4, 3), 2, 8)
[((0, 2), (1, 1)), ((1, 0), (1, 3)), ((2, 0), (1, 2))]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .sharding import Chunk, read_region

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


def read_flat(chunks: Sequence[Chunk], shape: Sequence[int], start: int, out: torch.Tensor) -> None:
    """Fill ``out`` (1-D, of the chunks' dtype) with elements ``start..start+len(out)`` of the tensor."""
    position = start
    for offsets, box in flat_boxes(shape, start, start + out.numel()):
        n = math.prod(box)
        out[position - start : position - start + n] = read_region(chunks, offsets, box).reshape(-1)
        position += n
