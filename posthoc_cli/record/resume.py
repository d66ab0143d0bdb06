"""How a Recorder continues: from the snapshots in its folder, or from a state saved in a trainer's checkpoint.

From the folder, each EMA continues from its latest snapshot (each rank reads its
own chunks, whatever chunking stored them), after checking that the folder was
recorded with these sigma_rels, snapshot dtype, time unit, choice of what to average
and model. Unfinished sharded sets after the resume time are removed, so that their
rewrite starts clean. From a checkpoint, :func:`saved_state` / :func:`checked_state`
carry each EMA exactly, also between snapshot times.

>>> continue_folder(scan("ckpts"), averages, files)  # doctest: +SKIP
>>> averages.t, averages.t_ema  # doctest: +SKIP
(3000, [3000])
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..dtypes import storage_names
from ..errors import ResumeError
from ..format.catalogue import Catalogue
from ..format.removal import finish_removals
from ..format.sharding import read_region
from ..format.snapshot import Snapshot, set_name
from .averages import Averages
from .binding import Binding
from .snapshot_files import SnapshotFiles

STATE_FORMAT = 1  # version of Recorder.state_dict()


def continue_folder(catalogue: Catalogue, averages: Averages, files: SnapshotFiles) -> None:
    """Each EMA from its latest snapshot, its snapshots marked written in ``files``; or refuse with what differs.

    The snapshots must be of ``averages``' sigma_rels and model, and in ``files``' dtype and time unit.
    """
    files.written.clear()
    if files.thinning is not None:
        files.thinning.resume(catalogue)
    if not catalogue.series and not catalogue.broken:
        return
    catalogue.raise_if_broken()
    binding, sigma_rels = averages.binding, averages.sigma_rels
    if catalogue.series:
        binding.frozen.resume(catalogue, binding.roles)  # another choice of what to average is another model
    recorded = sorted(catalogue.series)
    # A crash between the files of the very first snapshot leaves some sigma_rels without any:
    # those EMAs start again from t=0 (and so does the run), costing one snapshot interval at most.
    first_only = len({s.t for s in catalogue.snapshots}) == 1 and all(len(g) == 1 for g in catalogue.series.values())
    if recorded != sorted(sigma_rels) and not (first_only and set(recorded) < set(sigma_rels)):
        raise ResumeError(
            f"{files.folder} holds snapshots of sigma_rels {recorded}, not {sorted(sigma_rels)}",
            f"pass sigma_rels={tuple(recorded)} to continue them, or use a new folder",
        )
    storage, time_unit = storage_names()[files.dtype], files.time_unit
    for k, sigma_rel in enumerate(sigma_rels):
        if sigma_rel not in catalogue.series:
            continue  # not written yet (see above): starts at t=0
        latest = catalogue.series[sigma_rel][-1]
        if latest.dtype != storage:
            raise ResumeError(
                f"{latest.path} was recorded in {latest.dtype}, not {storage}",
                f"pass snapshot_dtype=torch.{latest.dtype} to continue it, or use a new folder",
            )
        if latest.time_unit != time_unit:
            raise ResumeError(
                f"{latest.path} counts time in {latest.time_unit!r}, not {time_unit!r}",
                f"pass time_unit={latest.time_unit!r}, or use a new folder",
            )
        _load(averages.emas[k], latest, binding)
        averages.t_ema[k], averages.updates[k] = latest.t, latest.updates
        files.on_disk(k, (s.t for s in catalogue.series[sigma_rel]))
    averages.t = min(averages.t_ema)


def _load(ema: list[torch.Tensor], snap: Snapshot, binding: Binding) -> None:
    """One EMA from a snapshot: each rank reads its own chunk of each tensor (any stored chunking)."""
    stored = {n: shape for n, (_, shape) in snap.layout.items()}
    ours = dict(zip(binding.names, binding.global_shapes()))
    if stored != ours:
        diff = sorted(set(stored.items()) ^ set(ours.items()))[:3]
        raise ResumeError(
            f"{snap.path} was recorded from another model (tensors differ: {diff})",
            "record this model in a new folder",
        )
    boxes = binding.plan.chunks if binding.plan is not None else None
    with torch.no_grad():
        for j, ((averaged, i), name) in enumerate(zip(binding.slots, binding.names)):
            if not averaged:
                continue
            offsets = boxes[j].offsets if boxes is not None else (0,) * ema[i].dim()
            ema[i].copy_(read_region(snap.chunks[name], offsets, tuple(ema[i].shape)))


def stale_sets(catalogue: Catalogue, sigma_rels: Sequence[float], t: int) -> list[Path]:
    """The unfinished sharded sets of ``sigma_rels`` after time ``t``: rewritten, never read.

    A stale rank file of a larger world would make the rewritten set contradictory.
    """
    ours = {set_name(s, 0).rsplit("-t", 1)[0] for s in sigma_rels}
    doomed = []
    for skipped in catalogue.incomplete:
        prefix, _, written = skipped.path.name.rpartition("-t")
        if prefix in ours and written.isdigit() and int(written) > t:
            doomed.append(skipped.path)
    return doomed


def remove_sets(folders: list[Path], ckpt_dir: Path) -> None:
    """Remove the rank files (finished or not) of ``folders``, and the folders once empty; and what an
    interrupted removal (thinning, ``prune``) left in ``ckpt_dir``."""
    finish_removals(ckpt_dir)
    for folder in folders:
        for path in folder.iterdir():
            if path.name.startswith("rank-") and path.name.endswith((".safetensors", ".safetensors.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


def saved_state(averages: Averages, *, time_unit: str) -> dict[str, Any]:
    """The Recorder's state for a trainer's checkpoint: plain types and CPU tensors (``weights_only`` loads it)."""
    with torch.no_grad():
        emas = [[x.to("cpu", copy=True) for x in ema] for ema in averages.emas]
    return {
        "format": STATE_FORMAT,
        "sigma_rels": list(averages.sigma_rels),
        "time_unit": time_unit,
        "t": averages.t,
        "t_ema": list(averages.t_ema),
        "updates": list(averages.updates),
        "names": averages.binding.source_names(),
        "emas": emas,
    }


def checked_state(
    state: dict[str, Any], averages: Averages, *, time_unit: str
) -> tuple[int, list[int], list[int], list[list[torch.Tensor]]]:
    """A :func:`saved_state`'s times, update counts and EMAs for ``averages``; another set-up's is refused, naming what differs."""
    fix = "resume with the Recorder settings (sigma_rels, model) that saved this state"
    sigma_rels = averages.sigma_rels
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ResumeError("the EMA state is not a posthoc-ema Recorder state (format 1)", fix)
    n = len(sigma_rels)
    saved = state.get("sigma_rels")
    if not (isinstance(saved, list) and len(saved) == n
            and all(math.isclose(a, b, rel_tol=1e-12) for a, b in zip(saved, sigma_rels))):
        raise ResumeError(f"the EMA state tracks sigma_rels {saved}, not {list(sigma_rels)}", fix)
    if state.get("time_unit") != time_unit:
        raise ResumeError(f"the EMA state counts time in {state.get('time_unit')!r}, not {time_unit!r}", fix)
    t, t_ema, updates = state.get("t"), state.get("t_ema"), state.get("updates")
    times_ok = (
        isinstance(t, int) and t >= 0 and isinstance(t_ema, list) and isinstance(updates, list)
        and len(t_ema) == len(updates) == n
        and all(isinstance(x, int) and 0 <= x <= t for x in t_ema)
        and all(isinstance(u, int) and 0 <= u <= x for u, x in zip(updates, t_ema))
    )
    if not times_ok:
        raise ResumeError(f"the EMA state's times are inconsistent (t={t!r}, t_ema={t_ema!r}, updates={updates!r})", fix)
    emas, sources = state.get("emas"), averages.binding.sources
    if state.get("names") != averages.binding.source_names() or not isinstance(emas, list) or len(emas) != n:
        raise ResumeError("the EMA state was saved from another model (tensor names differ)", fix)
    for ema in emas:
        if not (isinstance(ema, list) and len(ema) == len(sources)
                and all(isinstance(x, torch.Tensor) and x.shape == s.shape for x, s in zip(ema, sources))):
            raise ResumeError("the EMA state was saved from another model (tensor shapes differ)", fix)
    return t, list(t_ema), list(updates), emas  # type: ignore[arg-type, return-value]


__all__ = ["STATE_FORMAT", "checked_state", "continue_folder", "remove_sets", "saved_state", "stale_sets"]
