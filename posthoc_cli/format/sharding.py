"""Sharded snapshots on disk (docs/design.md §5): chunks, rank-file records, tiling checks, region reads.

A snapshot of a sharded model is a folder ``ema-s0.050-t000000100000/`` holding
one safetensors file per writing rank. Each file holds that rank's chunk of
every tensor it owns; its ``posthoc_ema`` record carries a ``shard`` object

    {"rank": r, "files": N, "shapes": {name: [global shape...], ...}}

(``shapes`` lists every tensor of the model, so any one file tells the whole
layout) and the header's ``DCP_SHARDING_INFO`` says where each chunk starts:

    {name: {"saved_offsets": [o0, o1, ...]}, ...}

which is the key ``torch.distributed.checkpoint.HuggingFaceStorageReader``
reads, so torch can load (and reshard) a snapshot folder itself.

This module knows the format only: it never imports torch.distributed.

>>> chunk = Chunk(header, header.tensors["w"], (4, 0))  # doctest: +SKIP
>>> chunk.box  # doctest: +SKIP
((4, 8), (0, 3))
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SnapshotFileError
from .container import Header, TensorEntry, read_into

if TYPE_CHECKING:  # torch only where tensor data is read (light commands import this module)
    import torch

SHARDING_INFO_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
SAVED_OFFSETS = "saved_offsets"
RANK_FILE = "rank-{rank:05d}.safetensors"  # the name is for people; readers trust the record


def rank_file_name(rank: int) -> str:
    """``3`` → ``rank-00003.safetensors``."""
    return RANK_FILE.format(rank=rank)


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: the file holding it, its bytes there, and where it starts globally."""

    header: Header  # the file holding it
    entry: TensorEntry  # its bytes in that file; entry.shape is the chunk's own shape
    offsets: tuple[int, ...]  # where the chunk starts in the global tensor

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def box(self) -> tuple[tuple[int, int], ...]:
        """Per dimension, the half-open range ``[start, stop)`` of global indices it covers."""
        return tuple((o, o + n) for o, n in zip(self.offsets, self.entry.shape))


@dataclass(frozen=True)
class ShardRecord:
    """The ``shard`` part of a rank file's record, with its chunks' offsets, validated against the header."""

    rank: int
    files: int
    shapes: dict[str, tuple[int, ...]]  # global shape of every tensor of the model, in state-dict order
    offsets: dict[str, tuple[int, ...]]  # per tensor in this file: where its chunk starts


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value)


def parse_shard_record(shard: object, header: Header) -> ShardRecord:
    """Check a rank file's ``shard`` object and its ``DCP_SHARDING_INFO``; ValueError says what is wrong."""
    if not isinstance(shard, dict):
        raise ValueError("shard record is not a JSON object")
    rank, files, shapes = shard.get("rank"), shard.get("files"), shard.get("shapes")
    if not (_is_int(files) and 1 <= files <= 1_000_000):  # type: ignore[operator]
        raise ValueError(f"shard files {files!r} is not a positive integer")
    if not (_is_int(rank) and 0 <= rank < files):  # type: ignore[operator]
        raise ValueError(f"shard rank {rank!r} is not in 0..{files - 1}")  # type: ignore[operator]
    if not isinstance(shapes, dict) or not all(_int_list(s) for s in shapes.values()):
        raise ValueError("shard shapes is not a map of names to shapes")
    if any(math.prod(max(d, 1) for d in s) > 2**63 - 1 for s in shapes.values()):
        raise ValueError("shard shapes holds a shape too large for any tensor")
    global_shapes = {name: tuple(s) for name, s in shapes.items()}
    raw = header.metadata.get(SHARDING_INFO_KEY)
    if raw is None:
        raise ValueError(f"no {SHARDING_INFO_KEY} metadata")
    info = json.loads(raw)
    if not isinstance(info, dict):
        raise ValueError(f"{SHARDING_INFO_KEY} is not a JSON object")
    if set(info) != set(header.tensors):
        odd = sorted(set(info) ^ set(header.tensors))[:3]
        raise ValueError(f"{SHARDING_INFO_KEY} does not list exactly the file's tensors (differs in {odd})")
    offsets: dict[str, tuple[int, ...]] = {}
    for name, entry in header.tensors.items():
        item = info[name]
        saved = item.get(SAVED_OFFSETS) if isinstance(item, dict) else None
        if not _int_list(saved):
            raise ValueError(f"tensor {name!r} has invalid {SAVED_OFFSETS} {saved!r}")
        if name not in global_shapes:
            raise ValueError(f"tensor {name!r} is not in the shard record's shapes")
        full = global_shapes[name]
        if len(saved) != len(full) or len(entry.shape) != len(full):  # type: ignore[arg-type]
            raise ValueError(f"tensor {name!r}: chunk {list(entry.shape)} at {saved} does not match global shape {list(full)}")
        if any(o + n > g for o, n, g in zip(saved, entry.shape, full)):  # type: ignore[arg-type]
            raise ValueError(f"tensor {name!r}: chunk {list(entry.shape)} at {saved} exceeds global shape {list(full)}")
        offsets[name] = tuple(saved)  # type: ignore[arg-type]
    return ShardRecord(rank, files, global_shapes, offsets)  # type: ignore[arg-type]


def tiling_problem(name: str, shape: tuple[int, ...], chunks: Sequence[Chunk]) -> str | None:
    """Why ``chunks`` do not tile a tensor of global ``shape`` exactly (None when they do).

    Volumes must add up and no two non-empty chunks may overlap: then they cover
    every element exactly once. A sweep along dimension 0 compares each chunk only
    with those whose rows it shares (for dimension-0 shards: none).
    """
    if not chunks:
        return f"tensor {name!r} has no chunk in any file"
    volume = sum(c.entry.numel for c in chunks)
    solid = sorted((c for c in chunks if c.entry.numel), key=lambda c: c.offsets)
    active: list[Chunk] = []
    for chunk in solid:
        box = chunk.box
        active = [a for a in active if a.box[0][1] > box[0][0]] if box else active
        for other in active:
            if all(lo < o_hi and o_lo < hi for (lo, hi), (o_lo, o_hi) in zip(box, other.box)):
                return (
                    f"tensor {name!r}: the chunk at {list(chunk.offsets)} in {chunk.path.name} overlaps "
                    f"the one at {list(other.offsets)} in {other.path.name}"
                )
        active.append(chunk)
    if volume != math.prod(shape):
        return f"tensor {name!r}: chunks hold {volume} elements but its shape {list(shape)} has {math.prod(shape)} (a gap)"
    return None


def saved_offsets_metadata(offsets: Mapping[str, Sequence[int]]) -> dict[str, str]:
    """The ``DCP_SHARDING_INFO`` header entry for chunks starting at ``offsets``."""
    return {SHARDING_INFO_KEY: json.dumps({name: {SAVED_OFFSETS: list(o)} for name, o in offsets.items()})}


# -- reading a region of a tensor from its chunks ----------------------------------------------------


def _intersection(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...] | None:
    """The common part of two boxes (None when empty); two 0-dim boxes meet in their one element."""
    box = tuple((max(lo, o_lo), min(hi, o_hi)) for (lo, hi), (o_lo, o_hi) in zip(a, b))
    return box if all(lo < hi for lo, hi in box) else None


def _read_box(fd: int, chunk: Chunk, box: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The global ``box`` (inside ``chunk``) as a tensor, reading only its bytes: one read per contiguous run."""
    import torch

    shape = chunk.entry.shape
    local = [(lo - o, hi - o) for (lo, hi), o in zip(box, chunk.offsets)]
    result = torch.empty(tuple(hi - lo for lo, hi in local), dtype=chunk.entry.dtype)
    flat = result.view(-1).view(torch.uint8).numpy().data
    # Trailing dimensions the box spans completely join the first partial one in one run.
    run_dim = len(shape) - 1
    while run_dim > 0 and local[run_dim] == (0, shape[run_dim]):
        run_dim -= 1
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    itemsize = chunk.entry.dtype.itemsize
    run = math.prod(hi - lo for lo, hi in local[run_dim:]) * itemsize if shape else result.numel() * itemsize
    lead = itertools.product(*(range(lo, hi) for lo, hi in local[:run_dim])) if shape else iter([()])
    for position, index in enumerate(lead):
        first = sum(i * strides[d] for d, i in enumerate(index))
        if shape:
            first += local[run_dim][0] * strides[run_dim]
        read_into(fd, chunk.entry, flat[position * run : (position + 1) * run], first * itemsize, path=chunk.path)
    return result


def read_region(chunks: Sequence[Chunk], offsets: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """The part ``[offsets, offsets + shape)`` of a tensor stored as ``chunks``, reading only the bytes it needs.

    Chunks of any chunking are intersected with the region (a run that changed
    its world size reads its new shards from the old ones). The chunks must tile
    the tensor (a complete set); the result has their dtype.

    >>> read_region(snap.chunks["fc.weight"], (4, 0), (4, 8))  # doctest: +SKIP
    """
    import torch

    if not chunks:
        raise ValueError("no chunks to read from")
    want = tuple((o, o + n) for o, n in zip(offsets, shape))
    result = torch.empty(tuple(shape), dtype=chunks[0].entry.dtype)
    for chunk in chunks:
        if chunk.entry.numel == 0:
            continue
        box = _intersection(want, chunk.box)
        if box is None:
            continue
        try:
            fd = os.open(chunk.path, os.O_RDONLY)
        except OSError as e:
            raise SnapshotFileError(chunk.path, f"cannot open ({e.strerror})", "check that it still exists and is readable") from e
        try:
            part = _read_box(fd, chunk, box)
        finally:
            os.close(fd)
        result[tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, offsets))] = part
    return result


__all__ = [
    "SAVED_OFFSETS",
    "SHARDING_INFO_KEY",
    "Chunk",
    "ShardRecord",
    "parse_shard_record",
    "rank_file_name",
    "read_region",
    "saved_offsets_metadata",
    "tiling_problem",
]
