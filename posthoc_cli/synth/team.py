"""Parallel synthesis on torch.distributed: ranks split the output, read only what their part needs.

Under ``torchrun --nproc-per-node N -m posthoc_cli synthesize …`` every rank plans
the same synthesis from the headers, then takes one contiguous byte range of
the model (tensors one after another, cut at element boundaries): it reads
those bytes of every input and writes the matching bytes of every output, with
positioned writes into temporary files that rank 0 created at full size. So
the ranks write disjoint parts of the same files, and the bytes are those of a
one-process run (rank 0 decides the ``created`` timestamp of the headers and
shares it). Frozen weights stored once (:mod:`.frozen`), which complete outputs
carry after the averaged tensors, are copied in whole by the last rank. Rank 0 renames the outputs into place only after every rank has
reported success; if any rank fails, all raise its error and rank 0 removes
the temporary files, so nothing is left under a final name.

Coordination is a handful of collectives on a gloo group (CPU objects; a new
gloo group is made when the default backend is another, e.g. NCCL). Across
nodes the snapshot folder and the output must be on a shared file system.
The one-process path never imports this module.

>>> with Team.join() as team:  # doctest: +SKIP
...     paths = team.synthesize("ckpts", [0.15], out="ema.safetensors")
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Generator, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES
from ..errors import InvalidValueError, ParallelError, PosthocError, arg
from ..format.atomic import output_error
from ..format.container import tensor_bytes
from ..format.keys import utc_now
from .frozen import copy_frozen
from .merge import (
    Plan,
    Progress,
    check_outputs,
    frozen_part,
    make_folders,
    output_paths,
    outputs_for,
    part_ranges,
    plan,
    remove_folders,
    stream,
)
from .outputs import OutputWriter

T = TypeVar("T")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting its variables)."""
    return all(key in os.environ for key in _ENV)


def _describe(error: BaseException) -> tuple[int, str]:
    """The exit code and one-line message a rank reports for its error."""
    if isinstance(error, PosthocError):
        return error.exit_code, error.message  # both spellings: rank 0's CLI prints the flags
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return 1, f"{where}{error.strerror or error} — check the path and its permissions"
    return 1, f"{type(error).__name__}: {error}"


class Team:
    """The ranks of one parallel synthesis, over a gloo process group."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, owns_default: bool = False) -> None:
        if group is None:
            group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._owns_default = owns_default
        self._broken = False  # a peer died: the group cannot be torn down collectively

    @classmethod
    def join(cls, timeout: timedelta | None = None) -> Team:
        """Join the process group the launcher describes (initialised here unless it already is)."""
        if dist.is_initialized():
            return cls()
        try:
            dist.init_process_group("gloo", timeout=timeout)
        except Exception as e:  # rendezvous failed: unreachable MASTER_ADDR, a port in use, a timeout
            raise ParallelError(
                f"cannot join the ranks of the parallel synthesis ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})",
                "check torchrun's --rdzv-endpoint / MASTER_ADDR and MASTER_PORT",
            ) from e
        return cls(owns_default=True)

    def close(self) -> None:
        # Tearing down a group whose peer is gone waits on (or aborts in) gloo's C++: leave it to the exit.
        if self._owns_default and dist.is_initialized() and not self._broken:
            dist.destroy_process_group()
            self._owns_default = False

    def __enter__(self) -> Team:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- agreement ---------------------------------------------------------------------------------

    def _gather(self, item: object) -> list[Any]:
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, item, group=self.group)
        except Exception as e:  # a peer died: gloo reports a closed connection or a timeout
            self._broken = True
            raise ParallelError(
                f"another rank of the parallel synthesis stopped without reporting why ({type(e).__name__})",
                "see that rank's log (torchrun names the failed rank); nothing was written",
                lost_peer=True,
            ) from e
        return out

    def settle(self, error: BaseException | None, value: T | None = None) -> list[T]:
        """Share every rank's outcome; raise the first rank's error on all ranks, else return all values."""
        gathered = self._gather((None if error is None else _describe(error), None if error is not None else value))
        failed = [(rank, report) for rank, (report, _) in enumerate(gathered) if report is not None]
        if failed:
            rank, (code, message) = failed[0]
            if error is not None and rank == self.rank:
                raise error
            raise ParallelError(f"rank {rank}: {message}", exit_code=code) from error
        return [v for _, v in gathered]

    def agree(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every rank; every rank gets all results, or raises the first rank's error."""
        try:
            value = fn()
        except Exception as e:
            return self.settle(e)
        return self.settle(None, value)

    # -- synthesis ---------------------------------------------------------------------------------

    def plan_outputs(
        self,
        ckpt_dir: str | os.PathLike[str],
        sigma_rels: Sequence[float],
        *,
        t: int | None = None,
        out: str | os.PathLike[str] | None = None,
        max_shard_size: int | str | None = None,
        allow_poor: bool = False,
    ) -> tuple[Plan, list[Path]]:
        """:func:`~posthoc_cli.merge.plan` and the output paths on every rank, checked to agree."""

        mine: list[tuple[Plan, list[Path]]] = []

        def work() -> tuple[object, ...]:
            p = plan(ckpt_dir, sigma_rels, t=t, allow_poor=allow_poor)
            mine.append((p, output_paths(p, out, max_shard_size=max_shard_size)))
            return _fingerprint(*mine[0])

        seen = self.agree(work)
        if any(f != seen[0] for f in seen):
            rank = next(r for r, f in enumerate(seen) if f != seen[0])
            raise ParallelError(
                f"rank {rank} sees other snapshots or outputs than rank 0",
                "put the snapshot folder on a file system all nodes share, and run from the same folder",
            )
        return mine[0]

    def part(self, p: Plan) -> tuple[int, int]:
        """This rank's byte range of the model (all ranks' ranges tile it)."""
        total = sum(e.nbytes for e in p.entries)
        return self.rank * total // self.size, (self.rank + 1) * total // self.size

    def synthesize_iter(
        self,
        p: Plan,
        paths: list[Path],
        *,
        dtype: str | None = None,
        accumulate: str = "float32",
        force: bool = False,
        allow_nonfinite: bool = False,
        max_shard_size: int | str | None = None,
        trainable_only: bool = False,
    ) -> Generator[Progress, None, None]:
        """This rank's part of :func:`~posthoc_cli.merge.synthesize_iter`; collective (all ranks call it).

        Yields this rank's progress, then once the progress of all ranks together, its
        ``seconds`` from the start of streaming to the outputs in place.
        """
        # The ranks split the snapshot tensors' bytes; the last rank then appends the frozen weights stored
        # once (complete outputs), whole. Outputs that leave buffers out (--trainable-only with integer
        # buffers) are not split yet. Every rank decides alike from the plan.
        if trainable_only and not all(e.is_floating_point for e in p.entries):
            raise InvalidValueError(
                f"parallel synthesis cannot yet leave buffers out ({arg('trainable_only', True)} on a model with integer buffers)",
                "run posthoc-ema synthesize in one process (without torchrun) for this recording",
            )
        frozen = frozen_part(p, trainable_only)
        writers: list[OutputWriter] = []
        created: list[Path] = []
        committed = False

        def prepare() -> list[list[tuple[Path, int, int]]]:
            check_outputs(p, paths, force, folders=max_shard_size is not None)
            outputs = outputs_for(
                p, paths, dtype=dtype, accumulate=accumulate, max_shard_size=max_shard_size, created=utc_now(),
                trainable_only=trainable_only,
            )
            for output in outputs:
                created.extend(make_folders(output.path.parent))
                writers.append(OutputWriter(output, force=force))
            return [[(path.absolute(), start, size) for path, start, size in w.reserve()] for w in writers]

        try:
            pieces = self.agree(prepare if self.rank == 0 else lambda: [])[0]
            started = time.perf_counter()
            part = self.part(p)
            error: BaseException | None = None
            done = (0, 0)
            sinks: list[_PieceSink] = []
            try:
                sinks = [_PieceSink(target, _out_offset(p, part, dtype)) for target in pieces]
                copies = frozen if self.rank == self.size - 1 else []
                extra = sum(e.nbytes for e in copies)
                for progress in stream(
                    p, sinks, dtype=dtype, accumulate=accumulate, allow_nonfinite=allow_nonfinite, part=part
                ):
                    done = (progress.done, progress.total + extra)
                    yield Progress(*done, progress.tensor, time.perf_counter() - started)
                if copies:
                    assert p.frozen is not None and p.frozen.file is not None
                    tails = [_PieceSink(target, _out_offset(p, None, dtype)) for target in pieces]
                    sinks += tails
                    for name, nbytes in copy_frozen(p.frozen.file, tails):
                        done = (done[0] + nbytes, done[1])
                        yield Progress(*done, name, time.perf_counter() - started)
                for sink in sinks:
                    sink.finish()
            except Exception as e:
                error = e
            finally:
                for sink in sinks:
                    sink.close()
            totals = self.settle(error, done)
            self.agree(lambda: [w.commit() for w in writers])
            committed = True
            yield Progress(sum(d for d, _ in totals), sum(t for _, t in totals), "", time.perf_counter() - started)
        finally:
            for writer in writers:
                writer.abort()  # no-op once committed
            if not committed:
                remove_folders(created)

    def synthesize(
        self,
        ckpt_dir: str | os.PathLike[str],
        sigma_rels: float | Sequence[float],
        *,
        t: int | None = None,
        out: str | os.PathLike[str] | None = None,
        dtype: str | None = None,
        accumulate: str = "float32",
        force: bool = False,
        allow_nonfinite: bool = False,
        allow_poor: bool = False,
        max_shard_size: int | str | None = None,
    ) -> list[Path]:
        """:func:`posthoc_cli.synthesize`, the work split over the ranks; collective (all ranks call it)."""
        targets = [sigma_rels] if isinstance(sigma_rels, (int, float)) else list(sigma_rels)
        p, paths = self.plan_outputs(
            ckpt_dir, targets, t=t, out=out, max_shard_size=max_shard_size, allow_poor=allow_poor
        )
        steps = self.synthesize_iter(
            p, paths, dtype=dtype, accumulate=accumulate, force=force, allow_nonfinite=allow_nonfinite,
            max_shard_size=max_shard_size,
        )
        for _ in steps:
            pass
        return paths


def _fingerprint(p: Plan, paths: list[Path]) -> tuple[object, ...]:
    return (p.t, p.sigma_rels, [(s.path.name, s.t, s.sigma_rel) for s in p.inputs], [str(x) for x in paths])


def _out_offset(p: Plan, part: tuple[int, int] | None, dtype: str | None) -> int:
    """Where this part's first output byte lies in a target's data (all files one after another).

    ``part=None``: where the snapshot tensors end (the frozen weights follow).
    """
    out_dtype = SAFETENSORS_DTYPES[FLOAT_DTYPES[dtype or p.input_dtype]]
    first = next(part_ranges(p.entries, part), None) if part is not None else None
    if first is None and part is not None:
        return 0
    offset = 0
    for entry in p.entries:
        size = out_dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
        if first is not None and entry.name == first[0].name:
            return offset + first[1] * size
        offset += entry.numel * size
    return offset


class _PieceSink:
    """Positioned writes of one target's data, from ``position`` on, into the files rank 0 created."""

    def __init__(self, pieces: list[tuple[Path, int, int]], position: int) -> None:
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
