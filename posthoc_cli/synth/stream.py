"""Streaming synthesis: a weighted sum of snapshot files, one tensor slice at a time.

For each slice of each tensor the inputs' bytes form the rows of one matrix
``X`` (``[inputs, n]``) and every target comes out of ``Wᵀ X`` (``[targets, n]``),
summed input by input in a fixed order (:func:`_product`), so each input byte is
read once however many targets there are, and a target's bits depend on its
inputs alone. The rows come from :mod:`.inputs` (mapped or read). A helper
thread fetches slice k+1 while slice k is multiplied, and another writes the
products of slice k-1 to the sinks. Memory is a few buffers of
:data:`SLICE_BYTES`: it grows with neither the model nor the number of snapshots.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import dtypes
from ..dtypes import ACCUMULATE, FLOAT_DTYPES
from ..errors import NonFiniteError, arg
from ..format.container import TensorEntry
from .inputs import ChunkReader, Groups, InputFiles, Reader, Slice
from .plan import Plan, output_entries
from .sinks import Sink

if TYPE_CHECKING:  # the functions that move tensor data import torch themselves, when a synthesis starts
    import torch

SLICE_BYTES = 24 << 20  # input bytes (all inputs together) per slice; two slices are in use at a time


@dataclass(frozen=True)
class Progress:
    """Bytes of input read so far, out of the total, and the seconds of synthesis work so far."""

    done: int
    total: int
    tensor: str
    seconds: float = 0.0  # of synthesis work (set by synthesize_iter): start-up (importing torch) and planning not counted


def part_ranges(entries: list[TensorEntry], part: tuple[int, int] | None) -> Iterator[tuple[TensorEntry, int, int]]:
    """``(entry, first element, end element)`` of the tensors within a byte range of the model.

    ``part`` counts bytes of one input, tensors one after another in file order; its
    ends are rounded up to whole elements, so parts that tile the model give ranges
    that tile every tensor (an empty tensor goes to the part holding its position).
    """
    base = 0
    for entry in entries:
        if part is None:
            yield entry, 0, entry.numel
        else:
            lo, hi = part
            start, stop = _element_at(entry, lo - base), _element_at(entry, hi - base)
            if stop > start or (entry.numel == 0 and lo <= base < hi):
                yield entry, start, stop
        base += entry.nbytes


def part_offset(p: Plan, lo: int, dtype: str | None) -> int:
    """Where the output bytes of the part that starts at input byte ``lo`` begin in a target's data.

    The data of all the output's files one after another, as :func:`stream` writes
    them (``dtype``: the output's; integer buffers keep their own). A part that
    starts at the end begins where the snapshot tensors end: the frozen weights follow.
    """
    out_size = dtypes.SAFETENSORS_DTYPES[FLOAT_DTYPES[dtype or p.input_dtype]].itemsize
    offset = base = 0
    for entry in p.entries:
        size = out_size if entry.dtype.is_floating_point else entry.dtype.itemsize
        offset += _element_at(entry, lo - base) * size
        base += entry.nbytes
    return offset


def _element_at(entry: TensorEntry, at: int) -> int:
    """The first element of ``entry`` that starts at or after byte ``at`` of it (clamped to the tensor)."""
    return min(max(-(-at // entry.dtype.itemsize), 0), entry.numel)


def _slices(
    entries: list[TensorEntry], n_inputs: int, n_targets: int, part: tuple[int, int] | None = None
) -> Iterator[Slice]:
    for entry, first, end in part_ranges(entries, part):
        averaged = entry.dtype.is_floating_point
        rows = max(n_inputs, n_targets) if averaged else 1  # bounds the inputs' rows and the products alike
        step = max(1, SLICE_BYTES // (rows * entry.dtype.itemsize))
        for start in range(first, end, step):
            yield Slice(entry, start, min(step, end - start), averaged)
        if entry.numel == 0:
            yield Slice(entry, 0, 0, averaged)


class _Writer:
    """Hands finished slices to one background thread that writes them to every sink.

    The disk (or the page-cache copy) of slice k then overlaps the product of
    slice k+1. Results live in a small ring of buffers, reused once written.
    After the first failed write nothing more is written, and that first error
    is the one raised in the computing thread.
    """

    def __init__(self, sinks: Sequence[Sink], capacity: int) -> None:
        import torch

        self.sinks = sinks
        self._ring = [torch.empty(capacity, dtype=torch.uint8) for _ in range(3)]
        self._busy: list[Future[None] | None] = [None] * len(self._ring)
        self._next = 0
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="posthoc-ema-write")

    def buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A free buffer to fill (waits for its previous write; raises the first failed write's error)."""
        k, previous = self._next, self._busy[self._next]
        if previous is not None:
            self._busy[k] = None
            previous.exception()  # waits
        if self._error is not None:
            raise self._error
        nbytes = math.prod(shape) * dtype.itemsize
        return self._ring[k][:nbytes].view(dtype).view(shape)

    def submit(self, rows: torch.Tensor) -> None:
        """Write row j of ``rows`` (from :meth:`buffer`) to sink j; one row goes to every sink."""
        self._busy[self._next] = self._pool.submit(self._write, rows)
        self._next = (self._next + 1) % len(self._ring)

    def _write(self, rows: torch.Tensor) -> None:
        if self._error is not None:
            return
        try:
            for j, sink in enumerate(self.sinks):
                sink.write(rows[j if len(rows) > 1 else 0])
        except BaseException as e:
            self._error = e

    def close(self) -> None:
        """Wait for every write, then raise the first error if one failed."""
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error


def stream(
    p: Plan,
    sinks: Sequence[Sink],
    *,
    dtype: str | None = None,
    accumulate: str = "float32",
    allow_nonfinite: bool = False,
    trainable_only: bool = False,
    part: tuple[int, int] | None = None,
) -> Generator[Progress, None, None]:
    """Write ``Σ w_i x_i`` of every target into its sink, tensor by tensor, yielding progress.

    ``part`` (bytes of the model, see :func:`part_ranges`) limits the work to one
    range of the tensors, for parallel synthesis: the sinks get that range only.
    """
    import torch

    out_dtype = dtypes.torch_dtype(FLOAT_DTYPES[dtype or p.input_dtype])
    entries = output_entries(p, trainable_only)
    acc = dtypes.torch_dtype(ACCUMULATE[accumulate])
    n, m = len(p.inputs), len(sinks)
    w_t = torch.from_numpy(np.ascontiguousarray(p.fit.weights.T)).to(acc)  # => [targets, inputs]
    latest = p.inputs.index(p.fixed_from) if p.fixed_from in p.inputs else None
    everything, fixed = list(range(n)), [latest if latest is not None else n]

    slices = list(_slices(entries, n, m, part))
    total = sum(s.width * (n if s.averaged else 1) for s in slices)
    done = 0
    rows = len(w_t)
    capacity = max((s.count * (rows * out_dtype.itemsize if s.averaged else s.entry.dtype.itemsize) for s in slices), default=0)
    widest = max((s.count for s in slices if s.averaged), default=0)
    scratch = torch.empty(2 * rows * widest if out_dtype != acc else rows * widest, dtype=acc)  # reused by every _product
    # Three threads: one maps (or reads) slice k+1 while this one multiplies slice k and a third writes
    # slice k-1. The products run on this thread alone: a thread team for them would only contend for
    # the cores (measured ~50x slower under load).
    with contextlib.ExitStack() as cleanup:  # undone in reverse order, on success and on any error
        snaps = p.inputs if latest is not None else [*p.inputs, p.fixed_from]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        cleanup.callback(torch.set_num_threads, threads)
        readers: list[Reader] | list[ChunkReader]
        if p.chunked:
            readers = [ChunkReader(snaps, SLICE_BYTES) for _ in range(2)]
        else:
            files = InputFiles(snaps)
            cleanup.callback(files.close)
            readers = [Reader(files, slices, n, SLICE_BYTES) for _ in range(2)]  # slice k uses readers[k % 2]
        for reader in readers:
            cleanup.callback(reader.close)
        writer = _Writer(sinks, capacity)
        cleanup.callback(_quietly, writer.close)  # on an error: let the writes stop before the sinks are dropped
        ahead = ThreadPoolExecutor(1, thread_name_prefix="posthoc-ema-read")
        # No mapping may be under way when the readers close.
        cleanup.callback(ahead.shutdown, wait=True, cancel_futures=True)

        def fetch(k: int) -> Future[Groups]:
            s = slices[k]
            return ahead.submit(readers[k % 2].groups, s, everything if s.averaged else fixed)

        futures = {0: fetch(0)} if slices else {}
        for k, s in enumerate(slices):
            if k + 1 < len(slices):
                futures[k + 1] = fetch(k + 1)  # the other reader: slice k-1 is done with it
            groups = futures.pop(k).result()
            if s.averaged:
                y = writer.buffer((rows, s.count), out_dtype)  # => [rows, count]: row j goes to sink j
                _product(w_t, groups, y, scratch)
                if not allow_nonfinite and not _all_finite(y):
                    raise _nonfinite(p, s, readers[k % 2], out_dtype)
            else:
                y = writer.buffer((1, s.count), s.entry.dtype)
                y.copy_(groups[0][1])
            del groups  # views of the mapping: none may outlive this slice
            writer.submit(y)
            done += (n if s.averaged else 1) * s.width
            yield Progress(done, total, s.entry.name)
        writer.close()


def _quietly(close: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        close()


def _product(w_t: torch.Tensor, groups: Groups, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """``out = Wᵀ X``, each element summed over the inputs in their fixed order.

    ``y = w₀x₀``, then ``y += wᵢxᵢ`` input by input, every product and every sum
    rounded on its own in the accumulation dtype. A matrix product would sum in
    an order its kernel picks (by CPU, by shape: the number of targets, where a
    slice ends), so a target's bits would depend on what else shares the pass,
    on the rank split and on the machine. Here they depend on the inputs alone.
    ``scratch`` (accumulation dtype, reused from slice to slice) holds the terms,
    and the sums too when the output has another dtype.
    """
    import torch

    rows: dict[int, torch.Tensor] = {}  # input index -> its row, whatever group it came in
    for members, x in groups:
        if x.dtype.itemsize > w_t.dtype.itemsize:
            x = x.to(w_t.dtype)  # wider inputs are rounded first; narrower ones widen exactly in mul
        rows.update(zip(members, x.split(1)))
    size = out.numel()
    term = scratch[:size].view(out.shape)
    y = out if out.dtype == w_t.dtype else scratch[size : 2 * size].view(out.shape)
    for k, i in enumerate(sorted(rows)):
        torch.mul(w_t[:, i : i + 1], rows[i], out=term if k else y)
        if k:
            y.add_(term)
    if y is not out:
        out.copy_(y)  # rounds to the output dtype


def _all_finite(y: torch.Tensor) -> bool:
    import torch

    # A NaN or Inf anywhere makes the sum non-finite; a plain sum is far cheaper than isfinite().all().
    # Only when the sum overflows on finite values do we need the exact test.
    return math.isfinite(float(y.sum())) or bool(torch.isfinite(y).all())


def _nonfinite(p: Plan, s: Slice, reader: Reader | ChunkReader, out_dtype: torch.dtype) -> NonFiniteError:
    import torch

    bad = [snap.path for i, snap in enumerate(p.inputs) if not bool(torch.isfinite(reader.read(s, [i])).all())]
    if bad:
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        return NonFiniteError(
            f"tensor {s.entry.name!r} in {bad[0]} holds NaN or Inf{more}",
            f"move that snapshot out of the folder, or pass {arg('allow_nonfinite', True)} to write the result anyway",
        )
    return NonFiniteError(
        f"tensor {s.entry.name!r} overflows {str(out_dtype).removeprefix('torch.')} after averaging",
        f"use {arg('dtype', 'float32')}, or pass {arg('allow_nonfinite', True)} to write it anyway",
    )
