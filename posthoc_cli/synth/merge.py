"""Streaming synthesis: a weighted sum of snapshot files, one tensor slice at a time.

For each slice of each tensor the inputs' bytes form the rows of one matrix
``X`` (``[inputs, n]``) and every target comes out of ``Wᵀ X`` (``[targets, n]``),
summed input by input in a fixed order (:func:`_product`), so each input byte is
read once however many targets there are, and a target's bits depend on its
inputs alone. On Linux the rows are the page cache itself, mapped side by side
(:mod:`.mapping`); elsewhere they are read into a reused buffer. A helper
thread maps (or reads) slice k+1 while slice k is multiplied, and another writes
the products of slice k-1. Memory is a few buffers of :data:`SLICE_BYTES`: it
grows with neither the model nor the number of snapshots.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import resource
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .. import dtypes
from ..dtypes import ACCUMULATE, FLOAT_DTYPES, choose, storage_names, unit_roundoff
from ..ema.classical import sigma_rel_to_beta
from ..ema.profiles import sigma_rel_to_gamma
from ..ema.quality import NOISE_BOUND, POOR, reproduced
from ..ema.solve import Fit
from ..ema.targets import (
    check_initial,
    closest_power,
    fit_targets,
    parse_targets,
    target_name,
)
from ..ema.trackers import Power, Target
from ..errors import (
    CatalogueError,
    InvalidValueError,
    NonFiniteError,
    OutputError,
    PoorTargetError,
    SnapshotFileError,
    arg,
    spelled,
)
from ..format.atomic import output_error
from ..format.catalogue import Catalogue, layout_problems, no_snapshots, scan
from ..format.container import TensorEntry, read_into
from ..format.frozen import tag
from ..format.frozen_set import FrozenRef
from ..format.keys import SUFFIX, library_info, utc_now
from ..format.snapshot import Snapshot, encode_metadata, synthesized_name
from . import mapping
from .chunked import Files, read_flat
from .frozen import copy_frozen
from .outputs import (
    Output,
    OutputWriter,
    check_folder,
    hf_folder,
    parse_size,
    single_file,
)

# Planning (scan, fit, output paths) needs no torch, so light commands can use this module; the
# functions that move tensor data import torch themselves, when a synthesis starts.
if TYPE_CHECKING:
    import torch

SLICE_BYTES = 24 << 20  # input bytes (all inputs together) per slice; two slices are in use at a time
_MAP_MIN_BYTES = mapping.PAGE  # narrower slices (per input) are cheaper to read than to map
_PREFETCH_BYTES = 1 << 20  # read-ahead hints only for slices this large (one syscall per input each)
_EXAMPLE_TARGETS = spelled("sigma_rels=0.15 or sigma_rels='beta=0.9999'", "--sigma-rel 0.15 or --beta 0.9999")
# NOISE_BOUND: relative rounding error we accept in a synthesized tensor before warning (see Plan.warnings).


@dataclass(frozen=True)
class Plan:
    """What a synthesis will do: which snapshots, with which weights, for which targets."""

    folder: Path
    t: int
    targets: tuple[Target, ...]
    inputs: list[Snapshot]  # the snapshots with a non-zero weight, by (t, sigma_rel)
    fit: Fit  # weights => [inputs, targets]
    fixed_from: Snapshot  # the latest input: integer buffers are copied from it
    skipped_files: int  # files in the folder that are not snapshots
    frozen: FrozenRef | None = None  # the frozen weights stored once that complete the inputs' state dict
    incomplete: int = 0  # sharded snapshots a crash left unfinished: never used
    t_reason: str | None = None  # why the default time is earlier than the newest snapshot (None when it is not)

    @property
    def sigma_rels(self) -> tuple[float | None, ...]:
        """Each target's sigma_rel (None for targets that are not power-function EMAs)."""
        return tuple(target.sigma_rel for target in self.targets)

    @property
    def entries(self) -> list[TensorEntry]:
        """The tensors of the output, in file order (global shapes; for a sharded set, offsets
        as in the single file our writer would make, so that inputs are grouped alike)."""
        if not self.fixed_from.sharded:
            return sorted(self.fixed_from.tensors.values(), key=lambda e: e.begin)
        return _virtual_entries(self.fixed_from)

    @property
    def chunked(self) -> bool:
        """Whether some input is a sharded set: then every input is read chunk by chunk."""
        return any(s.sharded for s in [*self.inputs, self.fixed_from])

    @property
    def input_dtype(self) -> str:
        return self.fixed_from.dtype

    def warnings(self) -> list[str]:
        """Targets whose weights amplify the snapshots' storage rounding beyond :data:`NOISE_BOUND`."""
        unit = unit_roundoff(self.input_dtype)
        notes = []
        for target, amp in zip(self.targets, self.fit.sum_abs_weights):
            noise = float(amp) * unit
            if noise > max(NOISE_BOUND, 2 * unit):
                notes.append(
                    f"{target_name(target)}: Σ|w| = {amp:.3g} amplifies {self.input_dtype} rounding to ~{noise:.1e} "
                    f"relative error (bound {NOISE_BOUND:g}); record this length or a shorter one, or store float32"
                )
        return notes


def plan(
    ckpt_dir: str | os.PathLike[str],
    sigma_rels: Sequence[float | str | Target],
    *,
    t: int | None = None,
    allow_poor: bool = False,
) -> Plan:
    """Solve for the weights of each target at time ``t`` (default: the latest time at which every
    recorded sigma_rel has a snapshot, see :attr:`Catalogue.complete_t`).

    Targets are sigma_rels, spec strings (``"beta=0.9999"``, ``"diffusers:decay=0.999"``, …)
    or :mod:`posthoc_cli.targets` objects, mixed freely. A target whose profile error
    exceeds :data:`~posthoc_cli.quality.POOR` is refused (:class:`PoorTargetError`, naming
    the lengths the snapshots do reproduce) unless ``allow_poor``.

    >>> p = plan("ckpts", [0.15])  # doctest: +SKIP
    >>> p.fit.profile_error  # doctest: +SKIP
    array([0.0021])
    """
    targets = tuple(parse_targets(sigma_rels))
    if not targets:
        raise InvalidValueError("no target given", f"pass at least one, e.g. {_EXAMPLE_TARGETS}")
    catalogue = scan(ckpt_dir)
    catalogue.raise_if_broken()
    if not catalogue.series:
        raise no_snapshots(catalogue.folder, "record some with posthoc_cli.Recorder, or pass the folder it wrote")
    snaps = catalogue.snapshots
    first, latest = snaps[0].t, catalogue.latest_t
    t_reason = None
    if t is None:
        t, t_reason = catalogue.complete_t, _default_t_reason(catalogue)
    if not first <= t <= latest:
        raise InvalidValueError(
            f"{arg('t', t)} is outside the recorded range t={first}..{latest}", f"pick a time in {first}..{latest}"
        )
    recorded = sorted(catalogue.series)
    if len(recorded) == 1 and any(target.sigma_rel != recorded[0] for target in targets):
        raise CatalogueError(
            f"only sigma_rel {recorded[0]} was recorded in {catalogue.folder}: other lengths cannot be synthesized from one",
            "record at least two sigma_rels (e.g. 0.05 and 0.10) to choose the EMA length afterwards",
        )
    usable = [s for s in snaps if s.t <= t]
    problems = layout_problems(usable)
    if problems:
        raise CatalogueError(problems[0], "remove the snapshots of the other model or run from one folder per model")
    for target in targets:
        check_initial(target, t)
    result = fit_targets([s.t for s in usable], [s.sigma_rel for s in usable], targets, t)
    if not allow_poor:
        _refuse_poor(targets, result.profile_error, usable, t, catalogue.complete_t)
    keep = np.flatnonzero(np.any(result.weights != 0, axis=1))  # zero rows need not be read at all
    weights = result.weights[keep]
    return Plan(
        folder=catalogue.folder,
        t=t,
        targets=targets,
        inputs=[usable[i] for i in keep],
        fit=Fit(weights, result.profile_error, result.sum_abs_weights),
        fixed_from=usable[-1],
        skipped_files=len(catalogue.ignored),
        frozen=catalogue.frozen_for(usable),
        incomplete=len(catalogue.incomplete),
        t_reason=t_reason,
    )


def _default_t_reason(catalogue: Catalogue) -> str | None:
    """Why the default time is not the newest snapshot's: some series lack a snapshot there."""
    t, latest = catalogue.complete_t, catalogue.latest_t
    if t == latest:
        return None
    ahead = ", ".join(f"{s:g}" for s, group in sorted(catalogue.series.items()) if group[-1].t == latest)
    return (
        f"t={t} is the latest time at which every sigma_rel has a complete snapshot; at t={latest} only "
        f"sigma_rel {ahead} has one (a run stopped while writing?), and a fit there would rest on it alone"
    )


def _refuse_poor(targets: Sequence[Target], errors: np.ndarray, usable: list[Snapshot], t: int, complete_t: int) -> None:
    """Raise :class:`PoorTargetError` for the first target above :data:`POOR`, saying what the snapshots do reproduce.

    ``complete_t``: the latest time every series reached, suggested when ``t`` is later."""
    poor = [(target, float(e)) for target, e in zip(targets, errors) if e > POOR]
    if not poor:
        return
    target, error = poor[0]
    more = f" (and {len(poor) - 1} more poor target{'s' if len(poor) > 2 else ''})" if len(poor) > 1 else ""
    span = reproduced([s.t for s in usable], [s.sigma_rel for s in usable], t)
    if span is None:
        can = f"these snapshots reproduce no sigma_rel within {POOR:g} at t={t}"
    else:
        lo, hi = span
        betas = f" (≈ beta {_beta(lo, t)}..{_beta(hi, t)})" if t > 0 else ""
        can = f"these snapshots reproduce sigma_rel {lo:g}..{hi:g}{betas} within {POOR:g} at t={t}"
    last = usable[-1].t  # the end of a profile after the last snapshot is recorded by none
    if last < t:
        where = f"use {arg('t', last)}"
    elif complete_t < t:  # some series stop before t: the fit rests on the others
        where = f"pick a target in that range, or use {arg('t', complete_t)} (every sigma_rel has a snapshot there)"
    else:
        where = "pick a target in that range"
    raise PoorTargetError(
        f"{target_name(target)}: profile error {error:.2g} is above {POOR:g}{more}; {can}",
        f"{where}, or pass {arg('allow_poor', True)} to write it anyway",
    )


def _beta(sigma_rel: float, t: int) -> str:
    """The beta of about the same length, with two significant digits of 1 - beta (0.983, 0.99967)."""
    beta = sigma_rel_to_beta(sigma_rel, t)
    return f"{beta:.{max(1, 1 - math.floor(math.log10(1 - beta)))}f}"


def _virtual_entries(snap: Snapshot) -> list[TensorEntry]:
    """Tensor entries of a snapshot's global layout, placed one after another from offset 0."""
    entries, offset = [], 0
    for name, (code, shape) in snap.layout.items():
        nbytes = math.prod(shape) * dtypes.SAFETENSORS_DTYPES[code].itemsize
        entries.append(TensorEntry(name, code, shape, offset, offset + nbytes))
        offset += nbytes
    return entries


@dataclass(frozen=True)
class Progress:
    """Bytes of input read so far, out of the total, and the seconds of synthesis work so far."""

    done: int
    total: int
    tensor: str
    seconds: float = 0.0  # of synthesis work (set by synthesize_iter): start-up (importing torch) and planning not counted


class _Sink(Protocol):
    def write(self, data: torch.Tensor) -> None: ...


class _MemorySink:
    """Collects an output in memory, for :func:`load_synthesized`: one tensor each, filled in order."""

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


class _Inputs:
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
class _Slice:
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
            size = entry.dtype.itemsize
            start = min(max(-(-(lo - base) // size), 0), entry.numel)
            stop = min(max(-(-(hi - base) // size), 0), entry.numel)
            if stop > start or (entry.numel == 0 and lo <= base < hi):
                yield entry, start, stop
        base += entry.nbytes


def _slices(
    entries: list[TensorEntry], n_inputs: int, n_targets: int, part: tuple[int, int] | None = None
) -> Iterator[_Slice]:
    for entry, first, end in part_ranges(entries, part):
        averaged = entry.dtype.is_floating_point
        rows = max(n_inputs, n_targets) if averaged else 1  # bounds the inputs' rows and the products alike
        step = max(1, SLICE_BYTES // (rows * entry.dtype.itemsize))
        for start in range(first, end, step):
            yield _Slice(entry, start, min(step, end - start), averaged)
        if entry.numel == 0:
            yield _Slice(entry, 0, 0, averaged)


class _Reader:
    """The inputs' rows of one slice: mapped side by side (no copy) where possible, else read into a buffer."""

    def __init__(self, files: _Inputs, slices: list[_Slice], n: int) -> None:
        import torch

        self.files = files
        self._buffer = torch.empty(0, dtype=torch.uint8)
        widest = max((s.width for s in slices if s.averaged), default=0)
        self._rows: mapping.MappedRows | None = None
        if mapping.supported() and files.keep_open and widest >= _MAP_MIN_BYTES:
            with contextlib.suppress(OSError):  # no address space (ulimit -v): read instead
                self._rows = mapping.MappedRows(n, widest)

    def groups(self, s: _Slice, inputs: list[int]) -> list[tuple[list[int], torch.Tensor]]:
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

    def _parts(self, s: _Slice, inputs: list[int]) -> list[list[int]]:
        """``inputs`` grouped by where the tensor starts within a page, in that order.

        Mapped rows share one stride, so inputs whose data sits at other positions in
        a page (headers of other lengths) are multiplied group by group. The groups
        depend only on the files, and read slices are summed group by group too, so
        the sums do not depend on where slices end or on how they were fetched.
        """
        def phase(i: int) -> int:
            return self.files.snaps[i].tensors[s.entry.name].begin % mapping.PAGE

        return [list(run) for _, run in itertools.groupby(sorted(inputs, key=phase), key=phase)]

    def _mapped(self, s: _Slice, parts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]] | None:
        assert self._rows is not None
        sources = {i: self.files.source(i, s.entry.name, s.offset, s.width) for members in parts for i in members}
        if any(offset % s.entry.dtype.itemsize for _, offset in sources.values()):
            return None  # an unaligned tensor cannot be viewed in place
        groups: list[tuple[list[int], torch.Tensor]] = []
        first = 0  # slots are filled group after group
        for members in parts:
            x = self._rows.view(first, [sources[i] for i in members], s.width)
            groups.append((members, x.view(s.entry.dtype)))
            first += len(members)
        return groups

    def read(self, s: _Slice, inputs: list[int]) -> torch.Tensor:
        """The rows of ``inputs`` read (copied) into the reused buffer."""
        import torch

        if s.count == 0:
            return torch.empty((len(inputs), 0), dtype=s.entry.dtype)  # an empty tensor: no bytes to view
        need = len(inputs) * s.width
        if self._buffer.numel() < need:
            self._buffer = torch.empty(max(need, SLICE_BYTES), dtype=torch.uint8)
        view = self._buffer.numpy().data  # bytes: numpy has no bfloat16
        for r, i in enumerate(inputs):
            self.files.read(i, s.entry.name, view[r * s.width : (r + 1) * s.width], s.offset)
        return self._buffer[:need].view(len(inputs), s.width).view(s.entry.dtype)

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()


class _ChunkReader:
    """The inputs' rows of one slice, gathered from their chunks (some input is a sharded set).

    Rows are grouped as :meth:`_Reader._parts` groups them, by where the tensor
    would start within a page in the single file our writer makes of the same
    layout, so a sharded recording sums in the same order as single files.
    """

    def __init__(self, snaps: list[Snapshot]) -> None:
        import torch

        self.snaps = snaps
        self._phases = [{e.name: e.begin % mapping.PAGE for e in _phase_entries(s)} for s in snaps]
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self._files = Files()

    def groups(self, s: _Slice, inputs: list[int]) -> list[tuple[list[int], torch.Tensor]]:
        order = sorted(inputs, key=lambda i: self._phases[i][s.entry.name])
        parts = [list(run) for _, run in itertools.groupby(order, key=lambda i: self._phases[i][s.entry.name])]
        x = self.read(s, [i for members in parts for i in members])
        return [(members, rows) for members, rows in zip(parts, x.split([len(m) for m in parts]))]

    def read(self, s: _Slice, inputs: list[int]) -> torch.Tensor:
        import torch

        need = len(inputs) * s.width
        if self._buffer.numel() < need:
            self._buffer = torch.empty(max(need, SLICE_BYTES), dtype=torch.uint8)
        x = self._buffer[:need].view(len(inputs), s.width).view(s.entry.dtype)
        for r, i in enumerate(inputs):
            read_flat(self.snaps[i].chunks[s.entry.name], s.entry.shape, s.start, x[r], self._files)
        return x

    def close(self) -> None:
        self._files.close()


def _phase_entries(snap: Snapshot) -> list[TensorEntry]:
    return _virtual_entries(snap) if snap.sharded else list(snap.tensors.values())


class _Writer:
    """Hands finished slices to one background thread that writes them to every sink.

    The disk (or the page-cache copy) of slice k then overlaps the product of
    slice k+1. Results live in a small ring of buffers, reused once written.
    After the first failed write nothing more is written, and that first error
    is the one raised in the computing thread.
    """

    def __init__(self, sinks: Sequence[_Sink], capacity: int) -> None:
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
    sinks: Sequence[_Sink],
    *,
    dtype: str | None = None,
    accumulate: str = "float32",
    allow_nonfinite: bool = False,
    trainable_only: bool = False,
    part: tuple[int, int] | None = None,
) -> Iterator[Progress]:
    """Write ``Σ w_i x_i`` of every target into its sink, tensor by tensor, yielding progress.

    ``part`` (bytes of the model, see :func:`part_ranges`) limits the work to one
    range of the tensors, for parallel synthesis: the sinks get that range only.
    """
    import torch

    out_dtype = dtypes.torch_dtype(FLOAT_DTYPES[dtype or p.input_dtype])
    entries = _output_entries(p, trainable_only)
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
        readers: list[_Reader] | list[_ChunkReader]
        if p.chunked:
            readers = [_ChunkReader(snaps), _ChunkReader(snaps)]
        else:
            files = _Inputs(snaps)
            cleanup.callback(files.close)
            readers = [_Reader(files, slices, n), _Reader(files, slices, n)]  # slice k uses readers[k % 2]
        for reader in readers:
            cleanup.callback(reader.close)
        writer = _Writer(sinks, capacity)
        cleanup.callback(_quietly, writer.close)  # on an error: let the writes stop before the sinks are dropped
        ahead = ThreadPoolExecutor(1, thread_name_prefix="posthoc-ema-read")
        # No mapping may be under way when the readers close.
        cleanup.callback(ahead.shutdown, wait=True, cancel_futures=True)

        def fetch(k: int) -> Future[list[tuple[list[int], torch.Tensor]]]:
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


def _output_entries(p: Plan, trainable_only: bool) -> list[TensorEntry]:
    """The snapshot tensors an output holds: all, or the averaged (floating-point) ones alone."""
    return [e for e in p.entries if e.is_floating_point] if trainable_only else p.entries


def frozen_part(p: Plan, trainable_only: bool) -> list[TensorEntry]:
    """The stored-once tensors a complete output copies in (after the snapshot tensors), in file order."""
    if trainable_only or p.frozen is None:
        return []
    return sorted(p.frozen.require().tensors.values(), key=lambda e: e.begin)


def _quietly(close: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        close()


def _product(w_t: torch.Tensor, groups: list[tuple[list[int], torch.Tensor]], out: torch.Tensor, scratch: torch.Tensor) -> None:
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


def _nonfinite(p: Plan, s: _Slice, reader: _Reader | _ChunkReader, out_dtype: torch.dtype) -> NonFiniteError:
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


def _metadata(p: Plan, j: int, out_dtype: str, accumulate: str, created: str) -> dict[str, str]:
    target = p.targets[j]
    # sigma_rel/gamma: the target's own for a power target; for any other, those of the power EMA
    # closest to it in profile (so every reader sees a valid record); `target` says what it is.
    sigma_rel = target.sigma_rel if target.sigma_rel is not None else closest_power(target, p.t)[0]
    return encode_metadata(
        {
            "format": 1,
            "kind": "synthesized",
            "sigma_rel": sigma_rel,
            "gamma": sigma_rel_to_gamma(sigma_rel),
            "target": target.describe(),
            "initial_weight": target.initial_weight(p.t),
            "t": p.t,
            "time_unit": p.fixed_from.time_unit,
            "updates": 0,
            "dtype": out_dtype,
            "library": library_info(),
            "created": created,
            "inputs": [{"file": s.path.name, "sigma_rel": s.sigma_rel, "t": s.t} for s in p.inputs],
            "weights": [float(w) for w in p.fit.weights[:, j]],
            "profile_error": float(p.fit.profile_error[j]),
            "sum_abs_weights": float(p.fit.sum_abs_weights[j]),
            "accumulate": accumulate,
        }
    )


def output_name(target: Target, t: int) -> str:
    """Default file name: ``ema-s0.150-t100000.safetensors`` for a power target,
    ``ema-<spec>-t<t>.safetensors`` for others (``ema-beta0.9999-t100000.safetensors``)."""
    if isinstance(target, Power):
        return synthesized_name(target.sigma_rel, t)
    return f"ema-{target.label()}-t{t}{SUFFIX}"


def output_paths(
    p: Plan, out: str | os.PathLike[str] | None, *, max_shard_size: int | str | None = None
) -> list[Path]:
    """One target: ``out`` is the file, unless it is a folder or ends with a slash. Several: ``out``
    is a folder. Default: the current folder.

    With ``max_shard_size`` every output is a Hugging Face folder: ``out`` itself for
    one target, else a subfolder of ``out`` (default: the current folder) per target.
    """
    names = [output_name(target, p.t) for target in p.targets]
    if len(names) != len(set(names)):
        raise InvalidValueError("the same target is asked for twice", f"give each {spelled('target', '--sigma-rel, --beta or --ema')} once")
    if max_shard_size is not None:
        parse_size(max_shard_size)
        if len(names) == 1 and out is not None:
            return [Path(out)]
        folder = Path(out) if out is not None else Path.cwd()
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder} is a file, but several targets need a folder", f"pass a folder as {arg('out')}")
        return [folder / name.removesuffix(SUFFIX) for name in names]
    folder_named = out is not None and str(out).endswith(("/", os.sep))  # Path() would drop the slash
    if len(p.targets) == 1 and out is not None and not Path(out).is_dir() and not folder_named:
        return [Path(out)]
    folder = Path(out) if out is not None else Path.cwd()
    if folder.suffix == SUFFIX and not folder.is_dir():
        raise OutputError(f"{folder} looks like a file name, but several targets need a folder", f"pass a folder as {arg('out')}")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, but several targets need a folder", f"pass a folder as {arg('out')}")
    return [folder / name for name in names]


def check_outputs(p: Plan, paths: list[Path], force: bool, *, folders: bool = False) -> None:
    """Refuse outputs that are inputs, or exist (without ``force``), before any work starts."""
    from ..format.frozen_set import FrozenSet  # (imports torch: synthesis only)

    inputs = {s.path.resolve() for s in [*p.inputs, p.fixed_from]}
    if p.frozen is not None and p.frozen.file is not None:
        stored = p.frozen.file
        inputs |= {f.path.resolve() for f in stored.files} if isinstance(stored, FrozenSet) else {stored.path.resolve()}
    for path in paths:
        if path.resolve() in inputs or (folders and any(path.resolve() in i.parents for i in inputs)):
            raise OutputError(f"{path} is one of the input snapshots", "write the output somewhere else")
        if folders:
            check_folder(path, force)
            continue
        if path.is_dir():
            raise OutputError(f"{path} is a folder", f"pass a file path as {arg('out')}, or remove that folder")
        if path.exists() and not force:
            raise OutputError(f"{path} already exists", f"use {arg('force', True)} to overwrite it, or choose another {arg('out')}")


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; return those created, deepest first, for clean-up."""
    missing = [f for f in (folder, *folder.parents) if not f.exists()]
    try:
        for f in reversed(missing):
            try:
                f.mkdir()
            except FileExistsError:
                pass
            except OSError as e:
                raise output_error(f, e) from e
    except BaseException:  # an error or Ctrl-C half-way: the folders made so far go again (empty ones only)
        for f in missing:
            with contextlib.suppress(OSError):
                f.rmdir()
        raise
    return missing


def outputs_for(
    p: Plan,
    paths: list[Path],
    *,
    dtype: str | None = None,
    accumulate: str = "float32",
    max_shard_size: int | str | None = None,
    created: str | None = None,
    trainable_only: bool = False,
) -> list[Output]:
    """What each target's output holds: tensors (the frozen ones stored once last, unless
    ``trainable_only``), header metadata, and shards when ``max_shard_size``."""
    out_name = dtype or p.input_dtype
    layout = [
        (e.name, FLOAT_DTYPES[out_name] if e.is_floating_point else e.code, e.shape)
        for e in _output_entries(p, trainable_only)
    ] + [(e.name, e.code, e.shape) for e in frozen_part(p, trainable_only)]
    created = created or utc_now()
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    outputs = []
    for j, path in enumerate(paths):
        metadata = tag(_metadata(p, j, out_name, accumulate, created), "trainable" if trainable_only else None, "contents")
        outputs.append(single_file(path, layout, metadata) if limit is None else hf_folder(path, layout, metadata, limit))
    return outputs


def synthesize_iter(
    p: Plan,
    paths: list[Path],
    *,
    dtype: str | None = None,
    accumulate: str = "float32",
    force: bool = False,
    allow_nonfinite: bool = False,
    trainable_only: bool = False,
    max_shard_size: int | str | None = None,
) -> Generator[Progress, None, None]:
    """Stream every target of ``p`` into its file (or sharded folder) in one pass over the inputs, yielding progress.

    Outputs appear only when complete; on any error (or if the iteration is
    abandoned) no output file, and no folder made for one, is left behind.
    Frozen weights stored once are copied in, bit for bit and in their own dtype,
    unless ``trainable_only`` (then only the averaged tensors are written). The last
    progress comes once the outputs are in place; its ``seconds`` time the work alone.
    """
    import torch  # noqa: F401  (before the clock starts: importing it is start-up, not synthesis)

    check_outputs(p, paths, force, folders=max_shard_size is not None)
    outputs = outputs_for(
        p, paths, dtype=dtype, accumulate=accumulate, max_shard_size=max_shard_size, trainable_only=trainable_only
    )
    frozen = frozen_part(p, trainable_only)
    writers: list[OutputWriter] = []
    created: list[Path] = []
    done = False
    try:
        for output in outputs:
            created += make_folders(output.path.parent)
            writers.append(OutputWriter(output, force=force))
        extra = sum(e.nbytes for e in frozen)
        started = time.perf_counter()
        last = Progress(0, 0, "")
        for last in stream(p, writers, dtype=dtype, accumulate=accumulate, allow_nonfinite=allow_nonfinite, trainable_only=trainable_only):
            yield Progress(last.done, last.total + extra, last.tensor, time.perf_counter() - started)
        done_bytes, total = last.done, last.total + extra
        if frozen:
            assert p.frozen is not None and p.frozen.file is not None
            for name, nbytes in copy_frozen(p.frozen.file, writers):
                done_bytes += nbytes
                yield Progress(done_bytes, total, name, time.perf_counter() - started)
        for writer in writers:
            writer.commit()
        done = True
        yield Progress(done_bytes, total, "", time.perf_counter() - started)
    finally:
        for writer in writers:
            writer.abort()  # no-op for committed outputs; removes the temp files otherwise
        if not done:
            remove_folders(created)


def remove_folders(created: list[Path]) -> None:
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _check_dtype(dtype: str | None, accumulate: str) -> None:
    if dtype is not None:
        choose("dtype", dtype, FLOAT_DTYPES)
    choose("accumulate", accumulate, ACCUMULATE)


def synthesize(
    ckpt_dir: str | os.PathLike[str],
    sigma_rels: float | str | Target | Sequence[float | str | Target],
    *,
    t: int | None = None,
    out: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str = "float32",
    force: bool = False,
    allow_nonfinite: bool = False,
    allow_poor: bool = False,
    trainable_only: bool = False,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Synthesize the EMA of each target at time ``t`` and write it as a safetensors file.

    Targets: sigma_rels, spec strings or :mod:`posthoc_cli.targets` objects, mixed
    (``[0.15, "beta=0.9999", "window=1000"]``). One target: ``out`` is the file;
    several: ``out`` is a folder (default: the current folder, files named
    ``ema-s<sigma_rel>-t<t>.safetensors``, or ``ema-<spec>-t<t>.safetensors``). The
    files are complete state dicts (frozen weights stored once copied in);
    ``trainable_only=True`` writes only the averaged tensors (e.g. a LoRA adapter),
    under the model's names. With ``max_shard_size`` (``"5GB"``, ``"500MB"`` or
    bytes) each output is a Hugging Face folder of shards plus
    ``model.safetensors.index.json``: ``out`` itself for one target, one subfolder
    (named like the file, without its suffix) each for several.

    The default ``t`` is the latest time at which every recorded sigma_rel has a
    snapshot. A target the snapshots reproduce poorly (profile error above 0.05)
    raises :class:`~posthoc_cli.errors.PoorTargetError` before anything is written,
    unless ``allow_poor=True``.

    >>> synthesize("ckpts", 0.15, out="ema-0.15.safetensors")  # doctest: +SKIP
    [PosixPath('ema-0.15.safetensors')]
    >>> synthesize("ckpts", 0.15, out="ema-0.15", max_shard_size="5GB")  # doctest: +SKIP
    [PosixPath('ema-0.15')]
    """
    targets = parse_targets(sigma_rels)
    name = _dtype_name(dtype)
    _check_dtype(name, accumulate)
    p = plan(ckpt_dir, targets, t=t, allow_poor=allow_poor)
    paths = output_paths(p, out, max_shard_size=max_shard_size)
    steps = synthesize_iter(
        p, paths, dtype=name, accumulate=accumulate, force=force, allow_nonfinite=allow_nonfinite,
        trainable_only=trainable_only, max_shard_size=max_shard_size,
    )
    for _ in steps:
        pass
    return paths


def load_synthesized(
    ckpt_dir: str | os.PathLike[str],
    sigma_rel: float | str | Target,
    *,
    t: int | None = None,
    dtype: str | torch.dtype | None = None,
    accumulate: str = "float32",
    trainable_only: bool = False,
    allow_poor: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, torch.Tensor]:
    """The synthesized EMA of one target (a sigma_rel, a spec string or a target) as a state
    dict in memory, ready for ``model.load_state_dict``.

    Complete (frozen weights stored once included, in the model's order) unless
    ``trainable_only=True``: then only the averaged tensors. Defaults and refusals as
    :func:`synthesize` (``allow_poor=True`` returns a poor target anyway, ``allow_nonfinite=True``
    one holding NaN or Inf).

    >>> model.load_state_dict(load_synthesized("ckpts", 0.15))  # doctest: +SKIP
    """
    name = _dtype_name(dtype)
    _check_dtype(name, accumulate)
    p = plan(ckpt_dir, [sigma_rel], t=t, allow_poor=allow_poor)
    out = FLOAT_DTYPES[name or p.input_dtype]
    frozen = frozen_part(p, trainable_only)
    entries = _output_entries(p, trainable_only)
    sink = _MemorySink([(e.name, out if e.dtype.is_floating_point else e.code, e.shape) for e in [*entries, *frozen]])
    for _ in stream(p, [sink], dtype=name, accumulate=accumulate, trainable_only=trainable_only, allow_nonfinite=allow_nonfinite):
        pass
    if frozen:
        assert p.frozen is not None and p.frozen.file is not None
        for _ in copy_frozen(p.frozen.file, [sink]):
            pass
        order = {n: i for i, n in enumerate(p.frozen.file.state_dict)}
        return dict(sorted(sink.tensors.items(), key=lambda item: order.get(item[0], len(order))))
    return sink.tensors


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in storage_names():
            raise InvalidValueError(f"dtype {dtype} is not supported", f"use one of {', '.join(FLOAT_DTYPES)}")
        return storage_names()[dtype]
    return dtype
