"""A folder of snapshots: what it holds, sorted into series, files left out, and frozen weights.

A scan reads headers only. It sorts the files of a folder into snapshots
(grouped by sigma_rel, sorted by t), files it ignores on purpose (temporary
files, foreign safetensors, synthesized outputs) and files that are broken.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CatalogueError, SnapshotFileError, few
from .frozen import FrozenFile
from .frozen_set import FOLDER_NAME, FrozenRef, FrozenSet, scan_sets
from .keys import SUFFIX, SWEEPS_FOLDER
from .snapshot import (
    NotASnapshot,
    Skipped,
    Snapshot,
    StoredOnceFile,
    snapshot_name,
)
from .snapshot_set import read_snapshot, scan_set


@dataclass
class Catalogue:
    """What a folder holds: snapshots by sigma_rel (sorted by t), and files left out."""

    folder: Path
    series: dict[float, list[Snapshot]] = field(default_factory=dict)
    ignored: list[Skipped] = field(default_factory=list)  # on purpose: tmp, foreign, synthesized
    broken: list[Skipped] = field(default_factory=list)  # corrupt or contradictory: the user must act
    frozen: list[FrozenFile | FrozenSet] = field(default_factory=list)  # frozen weights stored once (.frozen)
    incomplete: list[Skipped] = field(default_factory=list)  # sharded sets a crash left unfinished: never used

    @property
    def snapshots(self) -> list[Snapshot]:
        """All snapshots, by (t, sigma_rel)."""
        return sorted((s for group in self.series.values() for s in group), key=lambda s: (s.t, s.sigma_rel))

    @property
    def latest_t(self) -> int:
        return max(s.t for s in self.snapshots)

    @property
    def complete_t(self) -> int:
        """The default synthesis time: the earliest of the series' newest times.

        A run killed while writing leaves some series one snapshot short (the rest is a
        ``.tmp`` or an incomplete set); a target fitted at the newest time would then rest
        on the other series alone. By this time every series has a snapshot at or before
        it (also on staggered schedules, which share no time).
        """
        return min(group[-1].t for group in self.series.values())

    def raise_if_broken(self) -> None:
        """Refuse to work from a folder with a broken file: silently leaving one out would change results."""
        if self.broken:
            first = self.broken[0]
            more = f" (and {len(self.broken) - 1} more problems)" if len(self.broken) > 1 else ""
            raise CatalogueError(
                f"{first.path}: {first.reason}{more}",
                "move the file out of the folder (or delete it) and run again; `posthoc-ema inspect` lists all problems",
            )

    def frozen_for(self, inputs: Sequence[Snapshot]) -> FrozenRef | None:
        """The frozen weights stored once that ``inputs`` belong with; refuses snapshots of two recordings."""
        ids = {s.frozen_id: s for s in inputs}
        if len(ids) > 1:
            (a, sa), (b, sb) = list(ids.items())[:2]
            raise CatalogueError(
                f"{sa.path.name} and {sb.path.name} come from two recordings (stored-once weights {a} and {b})",
                "keep one recording per folder",
            )
        if not ids or (ident := next(iter(ids))) is None:
            return None
        found = next((f for f in self.frozen if f.id == ident), None)
        if found is not None:
            clash = [n for n in found.tensors if n in inputs[-1].tensors]
            if clash:
                raise CatalogueError(
                    f"{found.path}: {few(clash)} are also in {inputs[-1].path.name}", "replace the file with the one the Recorder wrote"
                )
        return FrozenRef(ident, found, self.folder)


# The folder the trainer integrations write into, inside the run's output folder (the HF callback's
# default ckpt_dir): looked at first when a run's folder is given.
INTEGRATIONS_FOLDER = "posthoc-ema"


def no_snapshots(folder: Path, fix: str) -> CatalogueError:
    """The error for a folder without snapshots. Given a run's folder, whose snapshots are one level
    down (``run/posthoc-ema``, where the trainer integrations write), it names that folder instead."""
    below = folders_with_snapshots(folder)
    if below:
        where = " and ".join(map(str, below[:3])) + (" …" if len(below) > 3 else "")
        fix = f"the snapshots are in {where}: pass {'that folder' if len(below) == 1 else 'one of those folders'}"
    return CatalogueError(f"no posthoc-ema snapshots in {folder}", fix)


def folders_with_snapshots(folder: Path) -> list[Path]:
    """The immediate subfolders of ``folder`` that hold snapshots (headers only; on the error path alone)."""
    try:
        subfolders = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                            key=lambda p: (p.name != INTEGRATIONS_FOLDER, p.name))
    except OSError:
        return []
    found = []
    for sub in subfolders:
        try:
            if scan(sub).series:
                found.append(sub)
        except (CatalogueError, OSError):  # unreadable, or gone meanwhile: not where the snapshots are
            continue
    return found


def _data_digest(snap: Snapshot) -> bytes:
    """A hash of the tensors (names, layout, bytes); headers differ in `created` alone."""
    h = hashlib.blake2b()
    with open(snap.path, "rb") as f:
        for entry in sorted(snap.tensors.values(), key=lambda e: e.name):
            h.update(f"{entry.name}:{entry.code}:{entry.shape}".encode())
            f.seek(entry.begin)
            left = entry.nbytes
            while left and (chunk := f.read(min(left, 1 << 22))):
                h.update(chunk)
                left -= len(chunk)
    return h.digest()


def scan(folder: str | os.PathLike[str]) -> Catalogue:
    """Sort the files of ``folder`` into a :class:`Catalogue` (headers only, no tensor data).

    Sub-folders holding rank files are sharded snapshots: complete sets join the
    series, unfinished ones are listed in ``incomplete``, contradictory ones in ``broken``.

    >>> cat = scan("ckpts")  # doctest: +SKIP
    >>> sorted(cat.series)  # doctest: +SKIP
    [0.05, 0.1]
    """
    root = Path(folder)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise CatalogueError(f"snapshot folder {root} {what}", "pass the folder the Recorder wrote (default: ckpts)")
    catalogue = Catalogue(root)
    by_key: dict[tuple[float, int], Snapshot] = {}
    for path in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        if path.is_dir() and path.name == FOLDER_NAME:  # frozen weights of a sharded model
            sets = scan_sets(path)
            catalogue.frozen += sets.complete
            catalogue.incomplete += [Skipped(p, r) for p, r in sets.incomplete]
            catalogue.broken += [Skipped(p, r) for p, r in sets.broken]
            catalogue.ignored += [Skipped(p, r) for p, r in sets.ignored]
            continue
        if path.is_dir() and path.name == SWEEPS_FOLDER:  # a sweep's results and candidates: not snapshots
            continue
        if path.is_dir():
            found = scan_set(path, catalogue)
            if found is None:
                continue
            snap = found
        elif path.name.endswith(".tmp"):
            catalogue.ignored.append(Skipped(path, "temporary file of an unfinished write"))
            continue
        elif not path.name.endswith(SUFFIX):
            catalogue.ignored.append(Skipped(path, "not a .safetensors file"))
            continue
        else:
            try:
                snap = read_snapshot(path)
            except StoredOnceFile as found:
                if "shard" in found.file.info:  # its tensors are chunks: read as whole tensors they would be wrong
                    catalogue.broken.append(Skipped(path, "rank file of frozen weights outside the frozen/ folder of its set"))
                else:
                    catalogue.frozen.append(found.file)
                continue
            except NotASnapshot:
                catalogue.ignored.append(Skipped(path, "safetensors file without posthoc_ema metadata"))
                continue
            except SnapshotFileError as e:
                catalogue.broken.append(Skipped(path, e.what.removeprefix(f"{path}: ")))
                continue
            if snap.kind != "snapshot":
                catalogue.ignored.append(Skipped(path, f"{snap.kind} file, not a snapshot"))
                continue
            if "shard" in snap.info:  # a rank file outside its set's folder
                catalogue.broken.append(Skipped(path, "rank file of a sharded snapshot outside its set's folder"))
                continue
        key = (snap.sigma_rel, snap.t)
        twin = by_key.get(key)
        if twin is None:
            by_key[key] = snap
            continue
        if snap.sharded or twin.sharded:  # no cheap way to prove two layouts hold the same values
            catalogue.broken.append(Skipped(path, f"another snapshot of sigma_rel {snap.sigma_rel} at t={snap.t} is {twin.path.name}"))
            continue
        try:
            same = _data_digest(twin) == _data_digest(snap)
        except OSError as e:
            catalogue.broken.append(Skipped(path, f"cannot read ({e.strerror})"))
            continue
        if same:
            if path.name == snapshot_name(snap.sigma_rel, snap.t):  # keep the Recorder's name, skip the copy
                by_key[key], snap, twin = snap, twin, snap
            catalogue.ignored.append(Skipped(snap.path, f"duplicate of {twin.path.name}"))
        else:
            catalogue.broken.append(
                Skipped(path, f"differs from {twin.path.name}, another snapshot of sigma_rel {snap.sigma_rel} at t={snap.t}")
            )
    for snap in sorted(by_key.values(), key=lambda s: (s.sigma_rel, s.t)):
        catalogue.series.setdefault(snap.sigma_rel, []).append(snap)
    return catalogue


def layout_problems(snapshots: list[Snapshot]) -> list[str]:
    """Disagreements in time unit, tensor names, shapes or dtypes between snapshots (empty when consistent)."""
    if not snapshots:
        return []
    problems = []
    ref = snapshots[-1]
    ref_layout = ref.layout
    for snap in snapshots[:-1]:
        if snap.time_unit != ref.time_unit:  # its t is on another scale: the weights would be wrong
            detail = f"its time unit is {snap.time_unit!r}, not {ref.time_unit!r}"
            problems.append(f"{snap.path.name} disagrees with {ref.path.name}: {detail}")
            continue
        layout = snap.layout
        if layout == ref_layout:
            continue
        missing, extra = sorted(ref_layout.keys() - layout.keys()), sorted(layout.keys() - ref_layout.keys())
        if missing or extra:
            detail = ", ".join(
                part
                for part in (
                    f"lacks {few(missing)}" if missing else "",
                    f"has extra {few(extra)}" if extra else "",
                )
                if part
            )
        else:
            name = next(n for n in layout if layout[n] != ref_layout[n])
            (code, shape), (ref_code, ref_shape) = layout[name], ref_layout[name]
            detail = f"tensor {name!r} is {code}{list(shape)}, not {ref_code}{list(ref_shape)}"
        problems.append(f"{snap.path.name} disagrees with {ref.path.name}: {detail}")
    return problems
