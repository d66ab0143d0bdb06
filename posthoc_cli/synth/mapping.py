"""The same byte range of many files, mapped side by side as the rows of one matrix.

Synthesis multiplies a ``[targets, inputs]`` weight matrix with ``X``, whose rows
are one slice of one tensor in each input snapshot. Reading those slices into a
buffer copies every input byte once more than needed (measured: the copy costs
as much as reading the page cache itself). Instead we reserve one address range
with a slot per input and map each file's slice into its slot with ``MAP_FIXED``:
the slots sit at a constant stride, so ``X`` is an ordinary strided tensor over
the page cache and the product reads every byte exactly once, with no copy.

Linux only (``MAP_FIXED`` and ``MAP_POPULATE`` are not exposed by :mod:`mmap`, so
we call libc through :mod:`ctypes`); elsewhere :func:`supported` is false and
synthesis reads with ``pread`` instead. A mapping only ever covers bytes that
exist in the file (checked with ``fstat`` just before): a file truncated by
another process *during* the product would still raise SIGBUS, as with any
memory-mapped reader, which is why snapshots are written atomically.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: importing this module (inputs.py does) must not import torch
    import torch

PAGE = mmap.PAGESIZE
# MAP_FIXED is 0x10 on Linux for these architectures (asm-generic); others read with pread.
_MAP_FIXED = 0x10
_ARCHES = {"x86_64", "aarch64", "riscv64", "ppc64le", "s390x"}
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0
_RESERVE = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
_MAP_FILE = mmap.MAP_SHARED | _MAP_FIXED | getattr(mmap, "MAP_POPULATE", 0)


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.machine() not in _ARCHES or not hasattr(mmap, "MAP_POPULATE"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def supported() -> bool:
    """Whether this platform can map file slices side by side (else read them with ``pread``)."""
    return _LIBC is not None and os.environ.get("POSTHOC_EMA_MMAP", "1") != "0"


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _unmap(region: ctypes.Array[ctypes.c_char]) -> None:
    if not getattr(region, "leak", False):
        _LIBC.munmap(ctypes.addressof(region), ctypes.sizeof(region))  # type: ignore[union-attr]


class MappedRows:
    """An address range of ``slots`` equal slots, each able to map ``slot_bytes`` of some file.

    >>> with MappedRows(slots=2, slot_bytes=1 << 20) as rows:  # doctest: +SKIP
    ...     x = rows.view(0, [(fd_a, 4096), (fd_b, 8192)], 1024)  # => [2, 1024] uint8
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        if _LIBC is None:
            raise OSError("mapping file slices side by side is not supported here; check supported() first")
        # One spare page per slot: a slice starts anywhere within its first page.
        self.stride = _round_up(slot_bytes) + PAGE
        self.slots = max(slots, 1)
        size = self.stride * self.slots
        base = _LIBC.mmap(None, size, _PROT_NONE, _RESERVE, -1, 0)
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "cannot reserve address space for mapping")
        # The range is unmapped when the last tensor viewing it is gone (torch keeps the buffer
        # object alive), so a view kept by a traceback never reads unmapped memory.
        region_type: Any = type("Region", (ctypes.c_char * size,), {"__del__": _unmap})
        self._region: ctypes.Array[ctypes.c_char] | None = region_type.from_address(base)
        self.base: int = base
        # A tensor over the whole range; only the parts of it mapped from files are ever read.
        import torch

        self._all: torch.Tensor | None = torch.frombuffer(self._region, dtype=torch.uint8)

    def view(self, first_slot: int, sources: Sequence[tuple[int, int]], nbytes: int) -> torch.Tensor:
        """Map ``nbytes`` at each ``(fd, offset)`` into consecutive slots; the rows of the result.

        Every offset must lie at the same position within a page (the rows share
        one stride). A slot's bytes change when it is mapped again: a view is for
        the current slice only.
        """
        if self._all is None:
            raise ValueError("the mapping is closed")
        phase = sources[0][1] % PAGE
        length = _round_up(phase + nbytes)
        if length > self.stride or first_slot + len(sources) > self.slots:
            raise ValueError("slice larger than the reserved slots")
        for k, (fd, offset) in enumerate(sources):
            if offset % PAGE != phase:
                raise ValueError("rows must start at the same position within a page")
            want = self.base + (first_slot + k) * self.stride
            got = _LIBC.mmap(want, length, mmap.PROT_READ, _MAP_FILE, fd, offset - phase)  # type: ignore[union-attr]
            if got != want:
                error = ctypes.get_errno()
                self._restore(want)
                raise OSError(error, "cannot map the file")
        start = first_slot * self.stride + phase
        return self._all.as_strided((len(sources), nbytes), (self.stride, 1), start)

    def _restore(self, slot: int) -> None:
        # A failed MAP_FIXED may already have unmapped the slot; reserve it again at once, before
        # anything else can be placed in the hole. If even that fails, never unmap the range:
        # part of it might then belong to someone else.
        got = _LIBC.mmap(slot, self.stride, _PROT_NONE, _RESERVE | _MAP_FIXED, -1, 0)  # type: ignore[union-attr]
        if got != slot and self._region is not None:
            self._region.leak = True  # type: ignore[attr-defined]

    def close(self) -> None:
        """Drop this object's hold on the range (unmapped once no view of it is left)."""
        self._all = self._region = None

    def __enter__(self) -> MappedRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
