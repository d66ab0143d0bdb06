"""A bounded folder while recording: at most ``max_snapshots`` per sigma_rel, the least useful removed.

After the files of a snapshot time are on disk (on the writer thread, so training
never waits for it), each series above ``max_snapshots`` loses the snapshot whose
removal raises least the worst profile error of the power EMAs in ``keep_faithful``
at that time (:func:`posthoc_cli.ema.thinning.drop_one`). The newest snapshot of a
series is never removed (resuming needs it); a sharded set goes as a whole, and only
once every rank file of it is there. Removal is rename-then-delete
(:mod:`posthoc_cli.format.removal`), so a kill at any point leaves a folder that
synthesizes and resumes. Each snapshot records the setting (``thinning`` in its
metadata, docs/design.md §2), which ``inspect`` shows.

One rank thins (rank 0, or the first rank file's writer of a sharded model); it acts
on the snapshots it knows from the folder's scan and from its own writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..ema.thinning import check_band, drop_one
from ..errors import InvalidValueError, SnapshotFileError
from ..format.catalogue import Catalogue
from ..format.removal import remove_snapshots
from ..format.snapshot import NotASnapshot
from ..format.snapshot_set import read_set


class Thinning:
    """Which snapshots of each series are on disk, and the removals that keep them at ``max_snapshots``."""

    def __init__(self, max_snapshots: int, keep_faithful: tuple[float, float]) -> None:
        if not isinstance(max_snapshots, int) or isinstance(max_snapshots, bool) or max_snapshots < 2:
            raise InvalidValueError(f"max_snapshots={max_snapshots!r} is not an integer ≥ 2", "pass e.g. max_snapshots=40")
        self.max_snapshots = max_snapshots
        self.band = check_band(keep_faithful)
        self.on_disk: dict[float, dict[int, Path]] = {}  # sigma_rel → t → file or set folder

    @property
    def record(self) -> dict[str, Any]:
        """What each snapshot's metadata says about the thinning (key ``thinning``)."""
        return {"max_snapshots": self.max_snapshots, "keep_faithful": list(self.band)}

    def resume(self, catalogue: Catalogue) -> None:
        """Know the folder's snapshots (at start, and after a rebind)."""
        self.on_disk = {s: {snap.t: snap.path for snap in group} for s, group in catalogue.series.items()}

    def forget_after(self, t: int) -> None:
        """Snapshots after ``t`` were set aside (a rewind): no longer in the folder."""
        self.on_disk = {s: {u: p for u, p in group.items() if u <= t} for s, group in self.on_disk.items()}

    def after_write(self, written: list[tuple[float, int, Path]]) -> None:
        """``written`` (sigma_rel, t, path) is on disk: thin every series above the limit (writer thread)."""
        for sigma_rel, t, path in written:
            self.on_disk.setdefault(sigma_rel, {})[t] = path
        now = max(t for _, t, _ in written)
        for sigma_rel in sorted(self.on_disk):
            while len(self.on_disk[sigma_rel]) > self.max_snapshots and self._drop(sigma_rel, now):
                pass

    def _drop(self, sigma_rel: float, now: int) -> bool:
        """Remove one snapshot of the series (False when none can go now)."""
        # In (t, sigma_rel) order, as `plan --max-snapshots` simulates it: the same inputs, the same choice.
        entries = sorted(((s, t, p) for s, group in self.on_disk.items() for t, p in group.items() if t <= now),
                         key=lambda e: (e[1], e[0]))
        newest = max(self.on_disk[sigma_rel])
        blocked: set[int] = set()
        while True:
            removable = [s == sigma_rel and t != newest and t not in blocked for s, t, _ in entries]
            if not any(removable):
                return False
            j, _ = drop_one([t for _, t, _ in entries], [s for s, _, _ in entries], removable, self.band, [now])
            _, t, path = entries[j]
            if not path.exists():  # gone already (removed by hand): nothing to do
                del self.on_disk[sigma_rel][t]
                return True
            if path.is_dir() and not _complete(path):  # another rank is still writing it: not this time
                blocked.add(t)
                continue
            remove_snapshots([path])
            del self.on_disk[sigma_rel][t]
            return True


def _complete(folder: Path) -> bool:
    try:
        read_set(folder)
    except (SnapshotFileError, NotASnapshot, OSError):
        return False
    return True


__all__ = ["Thinning"]
