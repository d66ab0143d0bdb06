"""Synthesis from start to end, on one process or on the ranks of a ``torchrun`` team.

:func:`plan_outputs` plans the synthesis and its outputs; :func:`synthesize_iter`
writes them, in one pass over the inputs (:mod:`.stream`). The same steps serve
both cases, a :class:`~.coordinator.Coordinator` making them collective:

- On one process the output writers are the sinks: each output is written in
  order and renamed into place when complete.
- On a team rank 0 creates the outputs' temporary files at full size, each rank
  writes its byte range of the model into them with positioned writes, and the
  last rank appends the frozen weights stored once (complete outputs carry them
  after the averaged tensors). Rank 0 renames the outputs into place only after
  every rank has reported success; if any rank fails, all raise its error and
  rank 0 removes the temporary files. The bytes are those of a one-process run
  (rank 0 decides the ``created`` timestamp of the headers and shares it).

Either way nothing is left under a final name, and no folder made for an output,
after an error or an abandoned iteration.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import ACCUMULATE, FLOAT_DTYPES, choose, storage_names
from ..ema.targets import parse_targets
from ..ema.trackers import Target
from ..errors import InvalidValueError, ParallelError, arg
from ..format.container import TensorEntry
from ..format.keys import utc_now
from .coordinator import Coordinator, OneProcess
from .frozen import copy_frozen
from .output_plan import check_outputs, output_paths, outputs_for
from .outputs import OutputWriter, make_folders, remove_folders
from .plan import Plan, frozen_part, output_entries, plan
from .sinks import MemorySink, Pieces, PieceSink, Sink
from .stream import Progress, part_offset, stream

if TYPE_CHECKING:  # planning needs no torch; a synthesis imports it when it starts
    import torch


def plan_outputs(
    coordinator: Coordinator,
    ckpt_dir: str | os.PathLike[str],
    sigma_rels: Sequence[float | str | Target],
    *,
    t: int | None = None,
    out: str | os.PathLike[str] | None = None,
    max_shard_size: int | str | None = None,
    allow_poor: bool = False,
) -> tuple[Plan, list[Path]]:
    """:func:`~.plan.plan` and the output paths, on every process, checked to agree."""
    mine: list[tuple[Plan, list[Path]]] = []

    def work() -> tuple[object, ...]:
        p = plan(ckpt_dir, sigma_rels, t=t, allow_poor=allow_poor)
        mine.append((p, output_paths(p, out, max_shard_size=max_shard_size)))
        return _fingerprint(*mine[0])

    seen = coordinator.agree(work)
    if any(f != seen[0] for f in seen):
        rank = next(r for r, f in enumerate(seen) if f != seen[0])
        raise ParallelError(
            f"rank {rank} sees other snapshots or outputs than rank 0",
            "put the snapshot folder on a file system all nodes share, and run from the same folder",
        )
    return mine[0]


def _fingerprint(p: Plan, paths: list[Path]) -> tuple[object, ...]:
    return (p.t, p.sigma_rels, [(s.path.name, s.t, s.sigma_rel) for s in p.inputs], [str(x) for x in paths])


def synthesize_iter(
    p: Plan,
    paths: list[Path],
    *,
    coordinator: Coordinator = OneProcess(),
    dtype: str | None = None,
    accumulate: str = "float32",
    force: bool = False,
    allow_nonfinite: bool = False,
    trainable_only: bool = False,
    max_shard_size: int | str | None = None,
) -> Generator[Progress, None, None]:
    """Stream every target of ``p`` into its file (or sharded folder) in one pass over the inputs, yielding progress.

    Collective: on a team every rank calls it, and yields its own progress. Outputs
    appear only when complete; on any error (or if the iteration is abandoned) no
    output file, and no folder made for one, is left behind. Frozen weights stored
    once are copied in, bit for bit and in their own dtype, unless ``trainable_only``
    (then only the averaged tensors are written). The last progress comes once the
    outputs are in place, that of all processes together; its ``seconds`` time the
    work alone, from the start of streaming.
    """
    import torch  # noqa: F401  (before the clock starts: importing it is start-up, not synthesis)

    part = coordinator.part(p)
    split = part is not None  # a team, whose ranks write parts of the outputs in place (of one rank too)
    if split and trainable_only and not all(e.is_floating_point for e in p.entries):
        # The ranks split the snapshot tensors' bytes; outputs that leave buffers out are not split yet.
        raise InvalidValueError(
            f"parallel synthesis cannot yet leave buffers out ({arg('trainable_only', True)} on a model with integer buffers)",
            "run posthoc-ema synthesize in one process (without torchrun) for this recording",
        )
    writers: list[OutputWriter] = []  # made by rank 0 (the one process, or a team's first rank)
    created: list[Path] = []
    committed = False

    def prepare() -> list[Pieces]:
        check_outputs(p, paths, force, folders=max_shard_size is not None)
        outputs = outputs_for(
            p, paths, dtype=dtype, accumulate=accumulate, max_shard_size=max_shard_size, created=utc_now(),
            trainable_only=trainable_only,
        )
        for output in outputs:
            created.extend(make_folders(output.path.parent))
            writers.append(OutputWriter(output, force=force))
        return [[(path.absolute(), start, size) for path, start, size in w.reserve()] for w in writers] if split else []

    try:
        reserved = coordinator.agree(prepare if coordinator.rank == 0 else list)[0]
        started = time.perf_counter()
        # A team's ranks write their parts in place (the last one goes on with the frozen weights, which follow).
        pieces = [PieceSink(files, part_offset(p, part[0], dtype)) for files in reserved] if part is not None else []
        sinks: Sequence[Sink] = pieces if split else writers
        copies: list[TensorEntry] = []
        done = (0, 0)
        error: BaseException | None = None
        try:
            if coordinator.rank == coordinator.size - 1:  # inside: a failure here is shared like any other
                copies = frozen_part(p, trainable_only)
            extra = sum(e.nbytes for e in copies)
            done = (0, extra)
            steps = stream(
                p, sinks, dtype=dtype, accumulate=accumulate, allow_nonfinite=allow_nonfinite,
                trainable_only=trainable_only, part=part,
            )
            with contextlib.closing(steps):  # abandoned: its writes stop before the outputs are dropped
                for progress in steps:
                    done = (progress.done, progress.total + extra)
                    yield Progress(*done, progress.tensor, time.perf_counter() - started)
            if copies:
                assert p.frozen is not None and p.frozen.file is not None
                for name, nbytes in copy_frozen(p.frozen.file, sinks):
                    done = (done[0] + nbytes, done[1])
                    yield Progress(*done, name, time.perf_counter() - started)
            for piece in pieces:
                piece.finish()
        except Exception as e:  # shared with the other ranks before it is raised (on one process: at once)
            error = e
        finally:
            for piece in pieces:
                piece.close()
        totals = coordinator.settle(error, done)
        coordinator.agree(lambda: [w.commit() for w in writers])
        committed = True
        yield Progress(sum(d for d, _ in totals), sum(t for _, t in totals), "", time.perf_counter() - started)
    finally:
        for writer in writers:
            writer.abort()  # no-op for committed outputs; removes the temp files otherwise
        if not committed:
            remove_folders(created)


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

    Targets: sigma_rels, spec strings or :mod:`posthoc_cli.ema.targets` objects, mixed
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
    p, paths = plan_outputs(OneProcess(), ckpt_dir, targets, t=t, out=out, max_shard_size=max_shard_size, allow_poor=allow_poor)
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
    entries = output_entries(p, trainable_only)
    sink = MemorySink([(e.name, out if e.dtype.is_floating_point else e.code, e.shape) for e in [*entries, *frozen]])
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
