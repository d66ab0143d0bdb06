"""Frozen weights stored once, copied into a complete output after the averaged tensors, bit for bit."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

from ..errors import SnapshotFileError
from ..format.container import read_into
from ..format.frozen import FrozenFile
from ..format.frozen_set import FrozenSet
from ..format.sharding import read_region
from .sinks import Sink


def copy_frozen(file: FrozenFile | FrozenSet, sinks: Sequence[Sink], chunk: int = 16 << 20) -> Iterator[tuple[str, int]]:
    """Append every tensor of ``file`` to each sink, bit for bit, in file order; yields (name, bytes) as it goes."""
    import torch

    if isinstance(file, FrozenSet):
        yield from copy_set(file, sinks, chunk)
        return

    raw = torch.empty(min(chunk, max(file.nbytes, 1)), dtype=torch.uint8)
    buffer = raw.numpy().data
    try:
        fd = os.open(file.path, os.O_RDONLY)
    except OSError as e:
        raise SnapshotFileError(file.path, f"cannot open ({e.strerror})", "check that it still exists and is readable") from e
    try:
        for entry in sorted(file.tensors.values(), key=lambda e: e.begin):
            for start in range(0, entry.nbytes, len(buffer)):
                view = buffer[: min(len(buffer), entry.nbytes - start)]
                read_into(fd, entry, view, start, path=file.path)
                for sink in sinks:
                    sink.write(raw[: len(view)])
                yield entry.name, len(view)
    finally:
        os.close(fd)


def copy_set(stored: FrozenSet, sinks: Sequence[Sink], chunk: int = 16 << 20) -> Iterator[tuple[str, int]]:
    """Append every tensor of a complete set to each sink in row-major order, in slices of about ``chunk`` bytes."""
    import torch

    for name, entry in stored.tensors.items():
        shape = entry.shape
        if not shape or entry.numel == 0:
            part = read_region(stored.chunks[name], (0,) * len(shape), shape) if entry.numel else None
            if part is not None:
                for sink in sinks:
                    sink.write(part.reshape(-1).view(torch.uint8))
            yield name, entry.nbytes
            continue
        row_bytes = entry.nbytes // shape[0]
        step = max(1, min(shape[0], chunk // max(row_bytes, 1)))
        for start in range(0, shape[0], step):
            n = min(step, shape[0] - start)
            part = read_region(stored.chunks[name], (start, *(0,) * (len(shape) - 1)), (n, *shape[1:]))
            raw = part.reshape(-1).view(torch.uint8)
            for sink in sinks:
                sink.write(raw)
            yield name, n * row_bytes
