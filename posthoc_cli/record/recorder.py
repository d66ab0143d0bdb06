"""The Recorder: power-function EMAs of a model inside the training loop, written as snapshots.

The public face of recording; it composes the parts: :mod:`.binding` (the model's
tensors), :mod:`.averages` (the EMAs and their update: one fused lerp per EMA, no
device read, no synchronisation), :mod:`.resume` (continuing a folder or a trainer's
checkpoint), :mod:`.snapshot_files` and :mod:`.writer` (the snapshots), and
:mod:`.ranks` (torch.distributed), :mod:`.thinning` (``max_snapshots``).

The Recorder follows the model's live tensors: made before ``model.to(...)``,
``to_empty``, ``load_state_dict(assign=True)`` or ``fully_shard``, it starts over
on the new tensors at its next call (or carries its EMAs over once it has
averaged), and raises :class:`ModelChangedError` when it cannot (:mod:`.live`).

What is averaged (:mod:`.selection`): the parameters that require grad now,
and floating-point buffers. Frozen parameters are stored once per folder
(``frozen.safetensors``, :mod:`.frozen`), not in every snapshot.
``average_frozen=True`` averages everything; ``include=`` / ``exclude=`` are
glob patterns over state-dict names (a pattern that matches nothing is an
error). A frozen parameter that requires grad later is an error at the
next snapshot.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ..ema.profiles import sigma_rel_to_gamma
from ..errors import InvalidValueError, OutputError
from ..format.catalogue import scan
from . import resume
from .averages import Averages
from .binding import Binding, frozen_set_id
from .options import checked_options
from .rewind import set_aside_after
from .selection import Filter
from .snapshot_files import SnapshotFiles
from .thinning import Thinning
from .writer import SnapshotWriter


class Recorder:
    """Track power-function EMAs of ``model`` and write them as snapshots.

    Call :meth:`update` after every optimizer step. Every ``snapshot_every`` steps
    each EMA is written to ``ckpt_dir`` as ``ema-s<sigma_rel>-t<t>.safetensors``.
    Snapshot writes happen on a background thread (``async_write=False`` writes in
    the calling thread); :meth:`close` or leaving the ``with`` block waits for them.
    At most ``max_pending`` snapshot times are in flight (host memory: that many
    copies of the EMAs); a further snapshot waits for the oldest to be written.

    A Recorder opened on a folder that already holds its snapshots resumes: each
    EMA continues from its latest snapshot and :attr:`t` from the earliest of those
    times, so a training loop restarted from its own checkpoint at :attr:`t`
    reproduces the uninterrupted run exactly (float32 snapshots; float16 and
    bfloat16 ones continue from the stored, rounded EMA). Other sigma_rels, another model's
    tensors or another snapshot dtype are refused.

    Under ``torch.distributed`` only rank 0 writes (``write=`` overrides); every
    rank keeps the EMAs, so any of them can evaluate with :meth:`swapped`. A model
    with DTensor parameters (FSDP2, tensor parallel, HSDP) is recorded shard by
    shard: each rank averages its local shards, without communication, and writes
    its file of a sharded snapshot folder (see :mod:`.dtensors` and :mod:`posthoc_cli.format.sharding`).

    ``max_snapshots=N`` keeps at most N snapshots per sigma_rel on disk, removing the one least needed
    by the sigma_rels in ``keep_faithful``, never the newest (:mod:`.thinning`). On live tensors and
    what is averaged, see the module's notes.

    >>> with Recorder(model, "ckpts", sigma_rels=(0.05, 0.10), snapshot_every=1000) as rec:  # doctest: +SKIP
    ...     for step in range(rec.t, total_steps):
    ...         train_step(model)
    ...         rec.update()
    """

    def __init__(
        self,
        model: nn.Module,
        ckpt_dir: str | os.PathLike[str] = "ckpts",
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        *,
        update_every: int = 1,
        snapshot_dtype: torch.dtype = torch.float32,
        ema_device: torch.device | str | None = None,
        time_unit: str = "step",
        async_write: bool = True,
        max_pending: int = 1,
        write: bool | None = None,
        average_frozen: bool = False,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_snapshots: int | None = None,
        keep_faithful: tuple[float, float] = (0.03, 0.20),
    ) -> None:
        sigma_rels = checked_options(
            sigma_rels, snapshot_every=snapshot_every, update_every=update_every, time_unit=time_unit,
            snapshot_dtype=snapshot_dtype, max_pending=max_pending,
        )
        self.model = model
        self.ckpt_dir = Path(ckpt_dir)
        self.sigma_rels = sigma_rels
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
        self.snapshot_every = snapshot_every
        self.update_every = update_every
        self.snapshot_dtype = snapshot_dtype
        self.time_unit = time_unit
        # One staging set per file in flight: max_pending snapshot times of every EMA.
        self._writer = SnapshotWriter(background=async_write, max_pending=max_pending * len(sigma_rels))
        self._files = SnapshotFiles(self._writer, self.ckpt_dir, time_unit, snapshot_dtype)
        self._files.thinning = None if max_snapshots is None else Thinning(max_snapshots, keep_faithful)
        selection = Filter.make(average_frozen=average_frozen, include=include, exclude=exclude)
        # A sharded model's frozen set is named now (one broadcast), so it is written later without talking.
        self._bind = functools.partial(Binding, model, self.ckpt_dir, selection, frozen_set_id(model, selection), ema_device)
        self._write_option = write
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create snapshot folder {self.ckpt_dir} ({e.strerror})", "pass another ckpt_dir") from e
        self._start(initial=True)
        # A script that never calls close() still gets its queued snapshots written at exit.
        weakref.finalize(self, SnapshotWriter.close, self._writer)

    # -- set-up -----------------------------------------------------------------------------------

    def _use(self, averages: Averages) -> None:
        self._avg = averages  # and shortcuts: the watch every update checks, the model's tensors, the EMAs
        self._watch, self._sources, self._emas = averages.binding.watch, averages.binding.sources, averages.emas
        self.roles, self.names = averages.binding.roles, averages.binding.names  # averaged, as-is, stored once

    def _start(self, initial: bool = False) -> None:
        """Bind the model's tensors, make the EMAs, and continue the folder's snapshots (again after a rebind)."""
        self._use(Averages(self._bind(), self.sigma_rels, self.gammas))
        self.writes = self._avg.binding.writes(self._write_option)
        catalogue = scan(self.ckpt_dir)
        resume.continue_folder(catalogue, self._avg, self._files)
        if initial:  # at construction, while no rank writes
            doomed = resume.stale_sets(catalogue, self.sigma_rels, self._avg.t)
            self._avg.binding.by_one_rank(lambda: resume.remove_sets(doomed, self.ckpt_dir), writes=self.writes)
        self._bound_updates = list(self._avg.updates)  # what a rebind before the next update may start over from

    def _follow_model(self, *, stored_once: bool = True) -> None:
        """Rebind when the model's tensors were replaced (moved, cast, loaded with assign=True, sharded).

        Before the first update since the Recorder was made (or resumed) it starts over on the
        live tensors; later the EMAs follow the same tensors moved or cast (:meth:`.Averages.move_to`).
        ``stored_once=False`` (an update) leaves the frozen tensors to the next snapshot.
        """
        if not self._watch.replaced() and not (stored_once and self._avg.binding.watch_once.replaced()):
            return
        self.flush()  # pending snapshots hold the old staging buffers and slots
        if self._avg.updates == self._bound_updates:
            self._start()  # (FSDP2 re-pads its local shards at the first forward: this is the usual path)
            return
        self._avg.move_to(self._bind())
        self._use(self._avg)
        self._bound_updates = [-1] * len(self.sigma_rels)  # EMAs carried over: never start over now

    # -- the training loop ------------------------------------------------------------------------

    @property
    def t(self) -> int:
        """The time of the latest update (after a resume: where the training loop should continue)."""
        return self._avg.t

    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights into every EMA; call after each optimizer step.

        ``step`` is the training time after that step (default: one more than the
        last). Times may skip: the update uses the exact gap, so calling only every
        k-th step gives the same profile as calling every step, without correction.
        """
        self._writer.raise_error()
        self._follow_model(stored_once=False)
        last = self._avg.t
        try:
            t = last + 1 if step is None else operator.index(step)  # ints, numpy and 0-dim integer tensors
        except TypeError:
            raise InvalidValueError(f"step {step!r} is not an integer", "pass the training time as an int") from None
        if t <= last:
            raise InvalidValueError(
                f"step {t!r} does not advance time (last update was at t={last})",
                "pass the training time after this optimizer step; it must increase",
            )
        crossed_snapshot = t // self.snapshot_every > last // self.snapshot_every
        if crossed_snapshot:
            self._follow_model()  # the stored-once tensors too: this update writes them
        self._avg.t = t
        self._avg.advance(t, self.update_every if not crossed_snapshot else 1, self._files.staging)
        if crossed_snapshot:
            self._files.write(t, self._avg, writes=self.writes)

    def snapshot(self) -> None:
        """Write every EMA now, at the current time (e.g. at the end of training)."""
        self._writer.raise_error()
        self._follow_model()
        if self._avg.t == 0:
            raise InvalidValueError("nothing to snapshot yet", "call update() after an optimizer step first")
        self._avg.advance(self._avg.t, 1, self._files.staging)
        self._files.write(self._avg.t, self._avg, writes=self.writes)

    def flush(self) -> None:
        """Wait until every snapshot written so far is on disk."""
        self._writer.flush()

    def close(self) -> None:
        """Wait for pending writes and stop the writer thread; raises a write error if one happened."""
        self._writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the body's exception matters more than a write error
            self.close()

    # -- using an EMA -----------------------------------------------------------------------------

    def ema_state_dict(self, sigma_rel: float, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """A copy of one tracked EMA as a state dict (float32 averages, other buffers as they are).

        For a sharded model each rank gets its local shards, as DTensors laid out like
        the model's parameters (no communication), so ``model.load_state_dict`` takes it.
        Frozen tensors (stored once, not averaged) are included as the model's own
        tensors, not copied; ``trainable_only=True`` leaves them out.
        """
        k = self._avg.index(sigma_rel)
        self._follow_model()
        return self._avg.binding.state_dict(self._emas[k], trainable_only=trainable_only)

    @contextlib.contextmanager
    def swapped(self, sigma_rel: float) -> Iterator[nn.Module]:
        """Evaluate with one tracked EMA: its weights go into the model, the training weights come back after.

        >>> with rec.swapped(0.10) as ema_model:  # doctest: +SKIP
        ...     val_loss = evaluate(ema_model)
        """
        k = self._avg.index(sigma_rel)
        self._follow_model()
        with self._avg.binding.swapped_in(self._emas[k]):
            yield self.model

    def copy_to_model(self, sigma_rel: float) -> None:
        """Switch EMA: one tracked EMA into the model's training weights (e.g. at epoch ends); the EMAs go on."""
        k = self._avg.index(sigma_rel)
        self._follow_model()
        if self._avg.t:  # with update_every > 1 an EMA can lag the model: bring it to now first, as snapshot() does
            self._avg.advance(self._avg.t, 1, self._files.staging)
        self._avg.binding.copy_in(self._emas[k])

    # -- checkpointing inside a trainer's own checkpoint ------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: each EMA (float32, copied to the CPU), its time and update count.

        Put it in the training checkpoint and give it to :meth:`load_state_dict`
        when resuming from that checkpoint: the EMAs continue exactly as they were,
        also between snapshot times. It costs one float32 copy of the averaged
        tensors per sigma_rel. Only plain types and tensors (``torch.load(weights_only=True)`` reads it).

        >>> torch.save({"model": model.state_dict(), "ema": rec.state_dict()}, "ckpt.pt")  # doctest: +SKIP
        """
        self._writer.raise_error()
        return resume.saved_state(self._avg, time_unit=self.time_unit)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the EMAs, their times and update counts become exactly those.

        Snapshots in the folder written after the state's time belong to an
        abandoned run: the writing rank moves them into a subfolder that scans
        ignore (:func:`posthoc_cli.record.rewind.set_aside_after`). A sharded model's
        state is this rank's local shards: every rank saves and loads its own,
        and every rank must call this (it waits at two barriers). A snapshot due at the
        state's time but missing from the folder (the run stopped before it was
        written) is written now.

        >>> rec.load_state_dict(torch.load("ckpt.pt", weights_only=True)["ema"])  # doctest: +SKIP
        """
        saved = resume.checked_state(state, self._avg, time_unit=self.time_unit)
        self._writer.flush()  # no queued write may land after the rewind below
        self._files.release()
        self._avg.adopt(*saved)
        t = self._avg.t
        # Every rank of a sharded model sees one folder: no rank writes or scans while the future moves.
        self._avg.binding.by_one_rank(lambda: set_aside_after(self.ckpt_dir, t), writes=self.writes)
        self._files.forget_after(t)
        if t and t % self.snapshot_every == 0:
            self._files.write(t, self._avg, writes=self.writes)


__all__ = ["Recorder"]
