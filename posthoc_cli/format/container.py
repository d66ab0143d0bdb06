"""The safetensors container: validated headers and positioned reads (the atomic writer is :mod:`.atomic`).

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of
JSON (padded with spaces), then the tensor bytes. We read and write it ourselves
rather than through ``safetensors.torch`` for three reasons: a header must be
validated before anything trusts it (files may be hostile), synthesis reads one
tensor slice at a time into buffers it reuses, and outputs are written tensor by
tensor without ever holding a whole file in memory.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING

from ..dtypes import SAFETENSORS_DTYPES, torch_dtype
from ..errors import SnapshotFileError

if TYPE_CHECKING:  # annotations only: torch is imported by the functions that handle tensor data
    import torch

# The reference implementation refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
# Element counts must fit torch's int64 sizes, also for empty tensors whose other dims are absurd.
_MAX_NUMEL = 2**63 - 1


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a file; ``begin``/``end`` are absolute file offsets."""

    name: str
    code: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch); :attr:`itemsize` and :attr:`is_floating_point` do not."""
        return torch_dtype(self.code)

    @property
    def itemsize(self) -> int:
        return SAFETENSORS_DTYPES[self.code].itemsize

    @property
    def is_floating_point(self) -> bool:
        return SAFETENSORS_DTYPES[self.code].is_floating_point

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: every tensor lies inside the file, no overlaps, no gaps."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key in header JSON")
    return dict(pairs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, raw: object, data_start: int) -> TensorEntry:
    """One tensor's header entry, checked for type, dtype and size."""
    if not name or not isinstance(raw, dict):
        raise ValueError(f"tensor entry {name!r} is not an object")
    code, shape, offsets = raw.get("dtype"), raw.get("shape"), raw.get("data_offsets")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has unknown dtype {code!r}")
    if (
        not isinstance(shape, list)
        or not all(_is_int(d) and d >= 0 for d in shape)
        or math.prod(max(d, 1) for d in shape) > _MAX_NUMEL
    ):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * SAFETENSORS_DTYPES[code].itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise ValueError(
            f"tensor {name!r} spans bytes {begin}..{end} but shape {shape} of {code} needs {expected}"
        )
    return TensorEntry(name, code, tuple(shape), data_start + begin, data_start + end)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate a safetensors header without reading any tensor data.

    >>> header = read_header("ckpts/ema-s0.050-t000000001000.safetensors")  # doctest: +SKIP
    >>> header.tensors["weight"].shape  # doctest: +SKIP
    (16, 8)
    """
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO planted under a snapshot's name must not hang the scan (no effect on files).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            stat = os.fstat(f.fileno())
            if not S_ISREG(stat.st_mode):
                raise SnapshotFileError(path, "is not a regular file", "remove it from the folder")
            file_size = stat.st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SnapshotFileError(path, "too short to be a safetensors file", "delete or replace it")
            n = int.from_bytes(prefix, "little")
            if n > min(file_size - 8, MAX_HEADER_BYTES):
                raise SnapshotFileError(
                    path,
                    f"header length {n} exceeds the file ({file_size} bytes): truncated or not safetensors",
                    "delete or replace it",
                )
            raw = f.read(n)
    except OSError as e:
        raise SnapshotFileError(path, f"cannot read ({e.strerror})", "check the path and its permissions") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
        if not isinstance(header, dict):
            raise ValueError("header JSON is not an object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ValueError("__metadata__ is not a map of strings to strings")
        data_start = 8 + n
        entries = {name: _parse_entry(name, raw_entry, data_start) for name, raw_entry in header.items()}
        for text in (*entries, *metadata, *metadata.values()):
            text.encode("utf-8")  # a lone surrogate ("\ud800") is no text: the reference reader refuses it too
        # The data section must be tiled exactly: sorted by offset, each tensor starts where the last ended.
        cursor = data_start
        for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
            if entry.begin != cursor:
                what = "overlaps another" if entry.begin < cursor else "leaves a gap before it"
                raise ValueError(f"tensor {entry.name!r} {what}")
            cursor = entry.end
        if cursor != file_size:
            raise ValueError(f"tensor data ends at byte {cursor} but the file has {file_size} bytes")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SnapshotFileError(path, f"invalid safetensors header: {e}", "delete or replace the file") from e
    return Header(path, entries, metadata, file_size)


def read_into(fd: int, entry: TensorEntry, out: memoryview, start: int = 0, *, path: Path) -> None:
    """Fill ``out`` with bytes ``start..start+len(out)`` of a tensor, with positioned reads."""
    offset, view = entry.begin + start, out.cast("B")
    while view:
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as e:
            raise SnapshotFileError(path, f"cannot read tensor {entry.name!r} ({e.strerror})", "check the disk and the file") from e
        if got == 0:
            raise SnapshotFileError(path, f"ended while reading tensor {entry.name!r}", "the file was truncated; replace it")
        view, offset = view[got:], offset + got


def read_tensor(fd: int, entry: TensorEntry, *, path: Path) -> torch.Tensor:
    """One whole tensor, read into fresh memory."""
    import torch

    data = torch.empty(entry.nbytes, dtype=torch.uint8)
    read_into(fd, entry, data.numpy().data, path=path)
    return data.view(entry.dtype).reshape(entry.shape)


def load_tensors(header: Header) -> dict[str, torch.Tensor]:
    """All tensors of a validated file, in header order."""
    try:
        fd = os.open(header.path, os.O_RDONLY)
    except OSError as e:
        raise SnapshotFileError(header.path, f"cannot open ({e.strerror})", "check its permissions") from e
    try:
        return {name: read_tensor(fd, entry, path=header.path) for name, entry in header.tensors.items()}
    finally:
        os.close(fd)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    import torch

    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
