"""The Recorder: power-function EMAs of a model inside the training loop, written as snapshots.

Per EMA and per step the work is one fused multi-tensor lerp over tensor lists
built once (Eq. 127 with the exact step length Δ), with beta computed in Python
from integers, so an update never reads a device tensor and never synchronises.
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ..dtypes import storage_names
from ..ema.profiles import check_sigma_rel, sigma_rel_to_gamma, update_beta
from ..errors import InvalidValueError, ModelChangedError, OutputError, ResumeError
from ..format.catalogue import Catalogue, scan
from ..format.frozen import tag
from ..format.sharding import ShardRecord, rank_file_name, read_region
from ..format.snapshot import Snapshot, set_name, snapshot_metadata, snapshot_name
from . import dtensors
from .frozen import FrozenWeights
from .live import Watch
from .rewind import set_aside_after
from .selection import AVERAGED, STORED_ONCE, Filter, select
from .writer import Job, SnapshotWriter

# Wrappers that prefix state_dict names: DistributedDataParallel / DataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_STATE_FORMAT = 1  # version of Recorder.state_dict()


def _storage_key(t: torch.Tensor) -> tuple[object, ...]:
    """Identifies the memory a tensor covers, so tied weights (one tensor, two names) share one EMA."""
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def strip_wrappers(name: str) -> str:
    """``_orig_mod.module.fc.weight`` → ``fc.weight``."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


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
    its file of a sharded snapshot folder (see :mod:`.dtensors` and :mod:`.sharding`).

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
    ) -> None:
        sigma_rels = tuple(check_sigma_rel(s) for s in sigma_rels)
        if not sigma_rels or len(set(sigma_rels)) != len(sigma_rels):
            raise InvalidValueError(f"sigma_rels {sigma_rels} must be distinct and non-empty", "e.g. sigma_rels=(0.05, 0.10)")
        for label, value in (("snapshot_every", snapshot_every), ("update_every", update_every)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidValueError(f"{label}={value!r} is not a positive integer", f"pass e.g. {label}=1000")
        if not (isinstance(time_unit, str) and time_unit.isprintable() and time_unit):
            raise InvalidValueError(f"time_unit {time_unit!r} is not a printable name", 'use e.g. "step", "sample" or "token"')
        if snapshot_dtype not in storage_names():
            raise InvalidValueError(
                f"snapshot_dtype {snapshot_dtype} is not supported", "use torch.float32, torch.float16 or torch.bfloat16"
            )
        self.model = model
        self.ckpt_dir = Path(ckpt_dir)
        self.sigma_rels = sigma_rels
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in sigma_rels)
        self.snapshot_every = snapshot_every
        self.update_every = update_every
        self.snapshot_dtype = snapshot_dtype
        self.time_unit = time_unit
        if not isinstance(max_pending, int) or max_pending < 1:
            raise InvalidValueError(f"max_pending={max_pending!r} is not a positive integer", "pass e.g. max_pending=1")
        # One staging set per file in flight: max_pending snapshot times of every EMA.
        self._writer = SnapshotWriter(background=async_write, max_pending=max_pending * len(sigma_rels))
        self._ema_device = ema_device
        self._filter = Filter.make(average_frozen=average_frozen, include=include, exclude=exclude)
        self._write_option = write
        self._staging: list[Job] = []  # snapshots whose EMA copies may still be in progress
        self._frozen_set_id = _agreed_id(model, self._filter)  # a sharded model's frozen set: named now, written without talking
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create snapshot folder {self.ckpt_dir} ({e.strerror})", "pass another ckpt_dir") from e
        self._start(initial=True)
        # A script that never calls close() still gets its queued snapshots written at exit.
        weakref.finalize(self, SnapshotWriter.close, self._writer)

    # -- set-up -----------------------------------------------------------------------------------

    def _start(self, initial: bool = False) -> None:
        """Bind the model's tensors, make the EMAs, and continue the folder's snapshots (again after a rebind)."""
        self._collect_tensors(self._ema_device)
        self._t = 0  # time of the latest update() call
        self._t_ema = [0] * len(self.sigma_rels)  # time of each EMA's latest update
        self._updates = [0] * len(self.sigma_rels)
        # (ema index, t) → the job writing it (None: on disk before we started); a failed job is retried.
        self._written: dict[tuple[int, int], Job | None] = {}
        if self._plan is not None:
            if self._write_option is not None:
                raise InvalidValueError(
                    "write= cannot be chosen for a sharded (DTensor) model: every rank holding a shard writes its file",
                    "leave write unset",
                )
            self.writes = self._plan.index is not None
        else:  # every rank tracks the EMAs (so each can evaluate with them), rank 0 writes.
            self.writes = self._write_option if self._write_option is not None else _rank() == 0
        self._resume(scan(self.ckpt_dir))
        if initial:
            self._clear_stale()
        self._bound_updates = list(self._updates)  # what a rebind before the next update may start over from

    def _collect_tensors(self, ema_device: torch.device | str | None) -> None:
        """Build, once, the flat lists that every update works on."""
        state = self.model.state_dict(keep_vars=True)
        dtensors.refuse_unsupported(self.model, state)
        names = [strip_wrappers(n) for n in state]
        if len(set(names)) != len(names):
            raise InvalidValueError("tensor names collide after removing wrapper prefixes", "record the unwrapped model")
        sharded = any(dtensors.is_dtensor(t) for t in state.values())
        # What is averaged (selection.py); the rest is stored once per folder (frozen.py), not in every snapshot.
        named = dict(zip(names, state.values()))
        self.roles = select(named, self._filter)
        # Every update checks the tensors it averages or stores; the stored-once ones (often most of a
        # fine-tuned model) are checked where they are used: snapshots, state dicts, swaps.
        once_keys = {k for k, n in zip(state, names) if self.roles[n] == STORED_ONCE}
        self._watch = Watch.of(self.model, [k for k in state if k not in once_keys], sharded=sharded)
        self._watch_once = Watch.of(self.model, [k for k in state if k in once_keys], sharded=sharded)
        once = {n: t for n, t in named.items() if self.roles[n] == STORED_ONCE}
        if once and sharded and (self._frozen_set_id is None or dtensors.shard_plan(once) is None):
            raise InvalidValueError(
                f"{len(once)} frozen tensors of a sharded (DTensor) model would be stored once, which sharded recording "
                "supports only when the model is sharded before the Recorder is made and some stored-once tensor is a DTensor",
                "make the Recorder after fully_shard / parallelize_module, or pass average_frozen=True to average them with the rest",
            )
        self._frozen = FrozenWeights(self.ckpt_dir, once, names, self._filter.as_json(), self._frozen_set_id if sharded else None)
        state = {k: t for (k, t), n in zip(state.items(), names) if self.roles[n] != STORED_ONCE}
        self.names = [n for n in names if self.roles[n] != STORED_ONCE]
        self._plan = dtensors.shard_plan(state)
        self._specs = [dtensors.spec(t) for t in state.values()]  # per name: how to rebuild a DTensor (or None)
        self._sources: list[torch.Tensor] = []  # unique floating-point tensors of the model (local shards)
        index: dict[object, int] = {}  # storage key → position in _sources; tied weights share one EMA
        self._slots: list[tuple[bool, int]] = []  # per name: (averaged?, index into _sources or _fixed)
        self._fixed: list[torch.Tensor] = []  # integer/bool buffers, stored as they are
        for original in state.values():
            tensor = dtensors.local(original)
            if tensor.is_floating_point():
                key = _storage_key(tensor) if tensor.numel() else id(original)
                if key not in index:
                    index[key] = len(self._sources)
                    self._sources.append(tensor)
                self._slots.append((True, index[key]))
            else:
                self._slots.append((False, len(self._fixed)))
                self._fixed.append(tensor)
        if not self._sources:
            raise InvalidValueError("the model has no floating-point parameters or buffers to average", "pass the model you train")
        self._bind_inputs(ema_device)
        with torch.no_grad():
            self._emas = [[x.to(torch.float32, copy=True) for x in self._current_inputs()] for _ in self.sigma_rels]

    def _bind_inputs(self, ema_device: torch.device | str | None) -> None:
        device = torch.device(ema_device) if ema_device is not None else None
        # The float32 view of each source that the lerp reads: the source itself when it already is
        # float32 on the EMA's device, otherwise a scratch buffer refreshed once per update for all EMAs.
        self._inputs: list[torch.Tensor] = []
        self._convert_src: list[torch.Tensor] = []
        self._convert_dst: list[torch.Tensor] = []
        for src in self._sources:
            target = device or src.device
            if src.dtype == torch.float32 and src.device == target:
                self._inputs.append(src)
                continue
            pin = target.type == "cpu" and src.is_cuda
            scratch = torch.empty(src.shape, dtype=torch.float32, device=target, pin_memory=pin)
            self._inputs.append(scratch)
            self._convert_src.append(src)
            self._convert_dst.append(scratch)
        self._wait_for_host_copy = any(d.is_pinned() for d in self._convert_dst)

    def _follow_model(self, *, stored_once: bool = True) -> None:
        """Rebind when the model's tensors were replaced (moved, cast, loaded with assign=True, sharded).

        Before the first update since the Recorder was made (or resumed) it simply starts
        over on the live tensors. Later, EMAs follow a move or cast of the same tensors
        (they stay float32, on the new device unless ``ema_device`` is set); any other
        change is refused, since the averages so far belong to other tensors.
        ``stored_once=False`` (an update) leaves the frozen tensors to the next snapshot.
        """
        if not self._watch.replaced() and not (stored_once and self._watch_once.replaced()):
            return
        self.flush()  # pending snapshots hold the old staging buffers and slots
        if self._updates == self._bound_updates:
            self._start()  # (FSDP2 re-pads its local shards at the first forward: this is the usual path)
            return
        before = [(n, tuple(t.shape), a) for n, t, (a, _) in zip(self.names, self._sources_by_name(), self._slots)]
        chunks_before = self._plan.chunks if self._plan is not None else None
        emas, fixed_count, frozen = self._emas, len(self._fixed), self._frozen
        self._collect_tensors(self._ema_device)
        self._frozen.carry_over(frozen)
        after = [(n, tuple(t.shape), a) for n, t, (a, _) in zip(self.names, self._sources_by_name(), self._slots)]
        chunks_after = self._plan.chunks if self._plan is not None else None
        if before != after or chunks_before != chunks_after or len(self._fixed) != fixed_count:
            raise ModelChangedError(
                f"the model's tensors were replaced by tensors of another layout or sharding after the Recorder "
                f"had averaged {max(self._updates)} updates (e.g. fully_shard or load_state_dict(assign=True) with other shapes; "
                "FSDP2 also leaves the root's parameters unsharded after a forward pass without backward)",
                "create the Recorder after the model is moved, sharded and loaded (it resumes from its folder); "
                "with FSDP2 call model.reshard() before update() after a forward pass without backward",
            )
        with torch.no_grad():
            self._emas = [[old.to(new.device) for old, new in zip(ema, self._emas[0])] for ema in emas]
        self._bound_updates = [-1] * len(self.sigma_rels)  # EMAs carried over: never start over now

    def _sources_by_name(self) -> list[torch.Tensor]:
        return [self._sources[i] if averaged else self._fixed[i] for averaged, i in self._slots]

    def _current_inputs(self) -> list[torch.Tensor]:
        """The current float32 values of the sources, on the EMA device."""
        if self._convert_src:
            torch._foreach_copy_(self._convert_dst, self._convert_src, non_blocking=True)
            if self._wait_for_host_copy:
                torch.cuda.current_stream().synchronize()  # the host lerp must see the copied values
        return self._inputs

    def _resume(self, catalogue: Catalogue) -> None:
        """Continue the snapshots already in the folder, or refuse with what differs."""
        self._stale = [skipped.path for skipped in catalogue.incomplete]  # unfinished sets: rewritten, never read
        if not catalogue.series and not catalogue.broken:
            return
        catalogue.raise_if_broken()
        if catalogue.series:
            self._frozen.resume(catalogue, self.roles)  # another choice of what to average is another model
        where = self.ckpt_dir
        recorded = sorted(catalogue.series)
        # A crash between the files of the very first snapshot leaves some sigma_rels without any:
        # those EMAs start again from t=0 (and so does the run), costing one snapshot interval at most.
        first_only = len({s.t for s in catalogue.snapshots}) == 1 and all(len(g) == 1 for g in catalogue.series.values())
        if recorded != sorted(self.sigma_rels) and not (first_only and set(recorded) < set(self.sigma_rels)):
            raise ResumeError(
                f"{where} holds snapshots of sigma_rels {recorded}, not {sorted(self.sigma_rels)}",
                f"pass sigma_rels={tuple(recorded)} to continue them, or use a new folder",
            )
        storage = storage_names()[self.snapshot_dtype]
        for k, sigma_rel in enumerate(self.sigma_rels):
            if sigma_rel not in catalogue.series:
                continue  # not written yet (see above): starts at t=0
            latest = catalogue.series[sigma_rel][-1]
            if latest.dtype != storage:
                raise ResumeError(
                    f"{latest.path} was recorded in {latest.dtype}, not {storage}",
                    f"pass snapshot_dtype=torch.{latest.dtype} to continue it, or use a new folder",
                )
            if latest.time_unit != self.time_unit:
                raise ResumeError(
                    f"{latest.path} counts time in {latest.time_unit!r}, not {self.time_unit!r}",
                    f"pass time_unit={latest.time_unit!r}, or use a new folder",
                )
            self._load(k, latest)
            self._t_ema[k] = latest.t
            self._updates[k] = latest.updates
            self._written.update(((k, s.t), None) for s in catalogue.series[sigma_rel])
        self._t = min(self._t_ema)

    def _load(self, k: int, snap: Snapshot) -> None:
        """EMA ``k`` from a snapshot: each rank reads its own chunk of each tensor (any stored chunking)."""
        stored = {n: shape for n, (_, shape) in snap.layout.items()}
        ours = dict(zip(self.names, self._global_shapes()))
        if stored != ours:
            diff = sorted(set(stored.items()) ^ set(ours.items()))[:3]
            raise ResumeError(
                f"{snap.path} was recorded from another model (tensors differ: {diff})",
                "record this model in a new folder",
            )
        boxes = self._plan.chunks if self._plan is not None else None
        with torch.no_grad():
            for j, ((averaged, i), name) in enumerate(zip(self._slots, self.names)):
                if not averaged:
                    continue
                ema = self._emas[k][i]
                offsets = boxes[j].offsets if boxes is not None else (0,) * ema.dim()
                ema.copy_(read_region(snap.chunks[name], offsets, tuple(ema.shape)))

    def _global_shapes(self) -> list[tuple[int, ...]]:
        if self._plan is not None:
            return [c.shape for c in self._plan.chunks]
        return [tuple(t.shape) for t in self._sources_by_name()]

    def _clear_stale(self) -> None:
        """Remove the unfinished sets of our sigma_rels after the resume time, so their rewrite starts clean.

        A sharded model's first writer removes them between two barriers (at construction,
        while no rank writes): a stale rank file of a larger world would otherwise make the
        rewritten set contradictory. A replicated model's writer removes them alone.
        """
        ours = {set_name(s, 0).rsplit("-t", 1)[0] for s in self.sigma_rels}
        doomed = []
        for folder in self._stale:
            prefix, _, t = folder.name.rpartition("-t")
            if prefix in ours and t.isdigit() and int(t) > self._t:
                doomed.append(folder)
        if self._plan is not None:
            torch.distributed.barrier()  # every rank has scanned
        if (self._plan.index == 0) if self._plan is not None else (self.writes and bool(doomed)):
            for folder in doomed:
                for path in folder.iterdir():
                    if path.name.startswith("rank-") and path.name.endswith((".safetensors", ".safetensors.tmp")):
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
                with contextlib.suppress(OSError):
                    folder.rmdir()
        if self._plan is not None:
            torch.distributed.barrier()  # removed before any rank writes

    # -- the training loop ------------------------------------------------------------------------

    @property
    def t(self) -> int:
        """The time of the latest update (after a resume: where the training loop should continue)."""
        return self._t

    def update(self, step: int | None = None) -> None:
        """Fold the model's current weights into every EMA; call after each optimizer step.

        ``step`` is the training time after that step (default: one more than the
        last). Times may skip: the update uses the exact gap, so calling only every
        k-th step gives the same profile as calling every step, without correction.
        """
        self._writer.raise_error()
        self._follow_model(stored_once=False)
        try:
            t = self._t + 1 if step is None else operator.index(step)  # ints, numpy and 0-dim integer tensors
        except TypeError:
            raise InvalidValueError(f"step {step!r} is not an integer", "pass the training time as an int") from None
        if t <= self._t:
            raise InvalidValueError(
                f"step {t!r} does not advance time (last update was at t={self._t})",
                "pass the training time after this optimizer step; it must increase",
            )
        crossed_snapshot = t // self.snapshot_every > self._t // self.snapshot_every
        if crossed_snapshot:
            self._follow_model()  # the stored-once tensors too: this update writes them
        self._t = t
        self._update_emas(t, self.update_every if not crossed_snapshot else 1)
        if crossed_snapshot:
            self._write(t)

    def _update_emas(self, t: int, every: int = 1) -> None:
        """Bring each EMA to time ``t`` if it is at least ``every`` behind (a snapshot forces it)."""
        # No torch.no_grad() here: the inputs are detached aliases (dtensors.local), so autograd records
        # nothing, and the decorator cost ~20 µs per update, 7 % of a small adapter's two lerps.
        inputs = None
        for k, ema in enumerate(self._emas):
            if t - self._t_ema[k] < every:
                continue  # not due, or resumed ahead of the others with this step already inside it
            if inputs is None:
                inputs = self._current_inputs()
                while self._staging:  # a snapshot may still be copying these EMAs
                    self._staging.pop().wait_released()
            torch._foreach_lerp_(ema, inputs, 1.0 - update_beta(t, self._t_ema[k], self.gammas[k]))
            self._t_ema[k] = t
            self._updates[k] += 1

    def snapshot(self) -> None:
        """Write every EMA now, at the current time (e.g. at the end of training)."""
        self._writer.raise_error()
        self._follow_model()
        if self._t == 0:
            raise InvalidValueError("nothing to snapshot yet", "call update() after an optimizer step first")
        self._update_emas(self._t)
        self._write(self._t)

    def _write(self, t: int) -> None:
        # First: written once (a sharded model: by every rank owning frozen chunks); later: unchanged?
        frozen_id = self._frozen.before_snapshot(write=self.writes or self._plan is not None)
        if not self.writes:
            return
        storage = storage_names()[self.snapshot_dtype]
        plan = self._plan
        # What this rank stores: every tensor (a replicated model), or its chunks (sharded: see dtensors.py).
        keep = [True] * len(self.names) if plan is None else [c.writes for c in plan.chunks]
        names = [n for n, kept in zip(self.names, keep) if kept]
        stable = [averaged for (averaged, _), kept in zip(self._slots, keep) if kept]  # EMAs wait for their copy
        jobs = []
        for k, sigma_rel in enumerate(self.sigma_rels):
            done = (k, t) in self._written and not getattr(self._written[(k, t)], "failed", False)
            if done or self._t_ema[k] != t:
                continue
            tensors, dtypes = [], []
            for (averaged, i), kept in zip(self._slots, keep):
                if kept:
                    tensors.append(self._emas[k][i] if averaged else self._fixed[i])
                    dtypes.append(self.snapshot_dtype if averaged else self._fixed[i].dtype)
            shard = None
            if plan is None:
                path = self.ckpt_dir / snapshot_name(sigma_rel, t)
            else:
                assert plan.index is not None
                shapes = dict(zip(self.names, (c.shape for c in plan.chunks)))
                offsets = {n: c.offsets for n, c, kept in zip(self.names, plan.chunks, keep) if kept}
                shard = ShardRecord(plan.index, plan.files, shapes, offsets)
                folder = self.ckpt_dir / set_name(sigma_rel, t)
                try:
                    folder.mkdir(exist_ok=True)
                except OSError as e:
                    raise OutputError(f"cannot create snapshot folder {folder} ({e.strerror})", "check the folder and its permissions") from e
                path = folder / rank_file_name(plan.index)
            metadata = tag(snapshot_metadata(
                sigma_rel=sigma_rel, gamma=self.gammas[k], t=t, time_unit=self.time_unit,
                updates=self._updates[k], dtype=storage, shard=shard,
            ), frozen_id)
            jobs.append(self._writer.stage(path, names, tensors, dtypes, metadata, stable=stable))
            self._written[(k, t)] = jobs[-1]
        self._staging += jobs
        self._writer.submit(jobs)

    def flush(self) -> None:
        """Wait until every snapshot written so far is on disk."""
        self._writer.flush()

    def close(self) -> None:
        """Wait for pending writes and stop the writer thread; raises a write error if one happened."""
        self._writer.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
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
        k = self._index(sigma_rel)
        self._follow_model()
        recorded = {
            name: dtensors.rebuild((self._emas[k][i] if averaged else self._fixed[i]).detach().clone(), spec)
            for name, (averaged, i), spec in zip(self.names, self._slots, self._specs)
        }
        if trainable_only:
            return {n: t for n, t in recorded.items() if self.roles[n] == AVERAGED}
        frozen = self._frozen.tensors
        return {n: recorded[n] if n in recorded else frozen[n].detach() for n in self.roles}

    @contextlib.contextmanager
    def swapped(self, sigma_rel: float) -> Iterator[nn.Module]:
        """Evaluate with one tracked EMA: its weights go into the model, the training weights come back after.

        >>> with rec.swapped(0.10) as ema_model:  # doctest: +SKIP
        ...     val_loss = evaluate(ema_model)
        """
        k = self._index(sigma_rel)
        self._follow_model()
        with torch.no_grad():
            backup = [s.clone() for s in self._sources]
            for source, ema in zip(self._sources, self._emas[k]):
                source.copy_(ema)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self._sources, backup)

    def _index(self, sigma_rel: float) -> int:
        for k, s in enumerate(self.sigma_rels):
            if math.isclose(s, sigma_rel, rel_tol=1e-12):
                return k
        raise InvalidValueError(
            f"sigma_rel {sigma_rel} is not tracked by this Recorder", f"use one of {', '.join(map(str, self.sigma_rels))}"
        )

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
        with torch.no_grad():
            emas = [[x.to("cpu", copy=True) for x in ema] for ema in self._emas]
        return {
            "format": _STATE_FORMAT,
            "sigma_rels": list(self.sigma_rels),
            "time_unit": self.time_unit,
            "t": self._t,
            "t_ema": list(self._t_ema),
            "updates": list(self._updates),
            "names": self._source_names(),
            "emas": emas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`: the EMAs, their times and update counts become exactly those.

        Snapshots in the folder written after the state's time belong to an
        abandoned run: the writing rank moves them into a subfolder that scans
        ignore (:func:`posthoc_cli.rewind.set_aside_after`). A sharded model's
        state is this rank's local shards: every rank saves and loads its own,
        and every rank must call this (it waits at two barriers). A snapshot due at the
        state's time but missing from the folder (the run stopped before it was
        written) is written now.

        >>> rec.load_state_dict(torch.load("ckpt.pt", weights_only=True)["ema"])  # doctest: +SKIP
        """
        t, t_ema, updates, emas = self._check_state(state)
        self._writer.flush()  # no queued write may land after the rewind below
        while self._staging:
            self._staging.pop().wait_released()
        with torch.no_grad():
            for mine, theirs in zip(self._emas, emas):
                for ema, saved in zip(mine, theirs):
                    ema.copy_(saved)  # from the CPU copy back to the EMA's device (float32 → float32: exact)
        self._t, self._t_ema, self._updates = t, t_ema, updates
        if self._plan is not None:
            # Every rank of a sharded model sees one folder: the first file's rank moves the future
            # (whole set folders) while all wait, so no rank writes or scans mid-move.
            torch.distributed.barrier()
            if self._plan.index == 0:
                set_aside_after(self.ckpt_dir, t)
            torch.distributed.barrier()
        elif self.writes:
            set_aside_after(self.ckpt_dir, t)
        self._written = {key: job for key, job in self._written.items() if key[1] <= t}
        if t and t % self.snapshot_every == 0:
            self._write(t)

    def _check_state(self, state: dict[str, Any]) -> tuple[int, list[int], list[int], list[list[torch.Tensor]]]:
        """Refuse a state saved by another Recorder set-up, naming what differs."""
        fix = "resume with the Recorder settings (sigma_rels, model) that saved this state"
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ResumeError("the EMA state is not a posthoc-ema Recorder state (format 1)", fix)
        n = len(self.sigma_rels)
        sigma_rels = state.get("sigma_rels")
        if not (isinstance(sigma_rels, list) and len(sigma_rels) == n
                and all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(sigma_rels, self.sigma_rels))):
            raise ResumeError(f"the EMA state tracks sigma_rels {sigma_rels}, not {list(self.sigma_rels)}", fix)
        if state.get("time_unit") != self.time_unit:
            raise ResumeError(f"the EMA state counts time in {state.get('time_unit')!r}, not {self.time_unit!r}", fix)
        t, t_ema, updates = state.get("t"), state.get("t_ema"), state.get("updates")
        times_ok = (
            isinstance(t, int) and t >= 0 and isinstance(t_ema, list) and isinstance(updates, list)
            and len(t_ema) == len(updates) == n
            and all(isinstance(x, int) and 0 <= x <= t for x in t_ema)
            and all(isinstance(u, int) and 0 <= u <= x for u, x in zip(updates, t_ema))
        )
        if not times_ok:
            raise ResumeError(f"the EMA state's times are inconsistent (t={t!r}, t_ema={t_ema!r}, updates={updates!r})", fix)
        emas = state.get("emas")
        if state.get("names") != self._source_names() or not isinstance(emas, list) or len(emas) != n:
            raise ResumeError("the EMA state was saved from another model (tensor names differ)", fix)
        for ema in emas:
            if not (isinstance(ema, list) and len(ema) == len(self._sources)
                    and all(isinstance(x, torch.Tensor) and x.shape == s.shape for x, s in zip(ema, self._sources))):
                raise ResumeError("the EMA state was saved from another model (tensor shapes differ)", fix)
        return t, list(t_ema), list(updates), emas  # type: ignore[arg-type, return-value]

    def _source_names(self) -> list[str]:
        """The first state-dict name of each averaged tensor (tied weights: one EMA, several names)."""
        first: dict[int, str] = {}
        for name, (averaged, i) in zip(self.names, self._slots):
            if averaged:
                first.setdefault(i, name)
        return [first[i] for i in range(len(self._sources))]


def _agreed_id(model: nn.Module, selection: Filter) -> str | None:
    """For a sharded model with tensors to store once, one new id shared by every rank.

    One broadcast, at construction only (every rank makes its Recorder), so the
    frozen set is written later without any communication.
    """
    state = model.state_dict(keep_vars=True)
    if not any(dtensors.is_dtensor(t) for t in state.values()):
        return None
    if STORED_ONCE not in select({strip_wrappers(n): t for n, t in state.items()}, selection).values():
        return None
    chosen: list[str | None] = [uuid.uuid4().hex if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(chosen, src=0)
    return chosen[0]


__all__ = ["Recorder", "strip_wrappers"]
