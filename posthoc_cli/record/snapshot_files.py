"""The files of a Recorder's snapshot at time t: what each holds, where it goes, which are already written.

One file per EMA, ``ema-s<sigma_rel>-t<t>.safetensors``; for a sharded model one rank
file per EMA in a set folder (:mod:`posthoc_cli.format.sharding`), holding this rank's
chunks. Each carries the snapshot's metadata and the id of the frozen weights it goes
with. :class:`.writer.SnapshotWriter` stages and writes them; a file whose write
failed is tried again at the next snapshot of that time.

>>> files = SnapshotFiles(writer, Path("ckpts"), "step", torch.float32)  # doctest: +SKIP
>>> files.write(1000, averages, writes=True)  # doctest: +SKIP
>>> files.staging[0].path  # doctest: +SKIP
PosixPath('ckpts/ema-s0.050-t000000001000.safetensors')
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..dtypes import storage_names
from ..errors import OutputError
from ..format.frozen import tag
from ..format.sharding import ShardRecord, rank_file_name
from ..format.snapshot import set_name, snapshot_metadata, snapshot_name
from .averages import Averages
from .thinning import Thinning
from .writer import Job, SnapshotWriter


class SnapshotFiles:
    """Stages one file per EMA at a snapshot time, and remembers what is written: ``(EMA index, t)`` → its job."""

    def __init__(
        self,
        writer: SnapshotWriter,
        folder: Path,
        time_unit: str,
        dtype: torch.dtype,
    ) -> None:
        self.writer = writer
        self.folder = folder
        self.time_unit = time_unit
        self.dtype = dtype
        # (EMA index, t) → the job writing it (None: on disk before the Recorder started); a failed job is retried.
        self.written: dict[tuple[int, int], Job | None] = {}
        self.staging: list[Job] = []  # jobs whose copies of the EMAs may still be running: wait before an update
        self.thinning: Thinning | None = None  # max_snapshots: kept on this rank's writer thread (if it thins)

    def release(self) -> None:
        """Wait until no snapshot is still copying the EMAs (they may change after this)."""
        while self.staging:
            self.staging.pop().wait_released()

    def on_disk(self, k: int, times: Iterable[int]) -> None:
        """EMA ``k``'s snapshots at ``times`` are in the folder already: never written again."""
        self.written.update(((k, t), None) for t in times)

    def forget_after(self, t: int) -> None:
        """Times after ``t`` were rewound: their snapshots are to be written again."""
        self.written = {key: job for key, job in self.written.items() if key[1] <= t}
        if self.thinning is not None:
            self.thinning.forget_after(t)

    def write(self, t: int, averages: Averages, *, writes: bool) -> None:
        """Check the frozen weights, then stage and submit the files of every EMA at ``t`` not written yet.

        Only the EMAs whose time is ``t`` are written (the others were not due); ``writes=False``: none.
        """
        binding, emas = averages.binding, averages.emas
        # First: written once (a sharded model: by every rank owning frozen chunks); later: unchanged?
        frozen_id = binding.frozen.before_snapshot(write=writes or binding.plan is not None)
        if not writes:
            return
        storage = storage_names()[self.dtype]
        plan = binding.plan
        # What this rank stores: every tensor (a replicated model), or its chunks (sharded: see dtensors.py).
        keep = [True] * len(binding.names) if plan is None else [c.writes for c in plan.chunks]
        names = [n for n, kept in zip(binding.names, keep) if kept]
        stable = [averaged for (averaged, _), kept in zip(binding.slots, keep) if kept]  # EMAs wait for their copy
        jobs, written = [], []
        for k, sigma_rel in enumerate(averages.sigma_rels):
            done = (k, t) in self.written and not getattr(self.written[(k, t)], "failed", False)
            if done or averages.t_ema[k] != t:
                continue
            tensors, dtypes = [], []
            for (averaged, i), kept in zip(binding.slots, keep):
                if kept:
                    tensors.append(emas[k][i] if averaged else binding.fixed[i])
                    dtypes.append(self.dtype if averaged else binding.fixed[i].dtype)
            shard = None
            if plan is None:
                path = self.folder / snapshot_name(sigma_rel, t)
            else:
                assert plan.index is not None
                shapes = dict(zip(binding.names, (c.shape for c in plan.chunks)))
                offsets = {n: c.offsets for n, c, kept in zip(binding.names, plan.chunks, keep) if kept}
                shard = ShardRecord(plan.index, plan.files, shapes, offsets)
                path = self._set_folder(sigma_rel, t) / rank_file_name(plan.index)
            metadata = tag(snapshot_metadata(
                sigma_rel=sigma_rel, gamma=averages.gammas[k], t=t, time_unit=self.time_unit,
                updates=averages.updates[k], dtype=storage, shard=shard,
                thinning=None if self.thinning is None else self.thinning.record,
            ), frozen_id)
            jobs.append(self.writer.stage(path, names, tensors, dtypes, metadata, stable=stable))
            self.written[(k, t)] = jobs[-1]
            written.append((sigma_rel, t, path if plan is None else path.parent))
        self.staging += jobs
        thin = self.thinning if plan is None or plan.index == 0 else None  # one rank removes whole sets
        self.writer.submit(jobs, None if thin is None or not written else lambda: thin.after_write(written))

    def _set_folder(self, sigma_rel: float, t: int) -> Path:
        folder = self.folder / set_name(sigma_rel, t)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create snapshot folder {folder} ({e.strerror})", "check the folder and its permissions") from e
        return folder


__all__ = ["SnapshotFiles"]
