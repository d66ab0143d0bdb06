"""A sharded snapshot: a folder of rank files that together hold one snapshot (docs/design.md §5).

Each rank file is a version-1 snapshot whose record adds ``shard`` (and whose
header adds ``DCP_SHARDING_INFO``, :mod:`.sharding`). A set is complete when it
has every rank file, they agree, and their chunks tile every tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import SnapshotFileError
from .keys import SUFFIX
from .sharding import Chunk, ShardRecord, parse_shard_record, tiling_problem
from .snapshot import NotASnapshot, Skipped, Snapshot, read_file


class Filing(Protocol):
    """Where a scan files what it does not use (a :class:`~.catalogue.Catalogue` is one)."""

    ignored: list[Skipped]
    incomplete: list[Skipped]
    broken: list[Skipped]


@dataclass
class _Filed:
    ignored: list[Skipped] = field(default_factory=list)
    incomplete: list[Skipped] = field(default_factory=list)
    broken: list[Skipped] = field(default_factory=list)


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read and validate a version-1 file (snapshot or synthesized) from its header alone.

    Raises :class:`SnapshotFileError` for a broken file and :class:`NotASnapshot`
    for a valid safetensors file without posthoc-ema metadata. A folder is read
    as a sharded snapshot (:func:`read_set`).
    """
    return read_set(path) if os.path.isdir(path) else read_file(path)


_AGREE = ("kind", "sigma_rel", "gamma", "t", "time_unit", "updates", "dtype")  # what a set's files share


class _Broken(Exception):
    """A set whose present files contradict each other or their headers."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


class _Incomplete(Exception):
    """A set a crash left unfinished (rank files missing, or only temporary files)."""


def _set_members(folder: Path, ignored: list[Skipped]) -> tuple[list[tuple[Snapshot, ShardRecord]], int]:
    """The rank files of a folder (validated one by one) and the number of temporary files beside them."""
    members, temps = [], 0
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.name.endswith(".tmp"):
            temps += 1
            continue
        if path.is_dir() or not path.name.endswith(SUFFIX):
            ignored.append(Skipped(path, "not a rank file of a sharded snapshot"))
            continue
        try:
            snap = read_file(path)
        except NotASnapshot:
            ignored.append(Skipped(path, "safetensors file without posthoc_ema metadata"))
            continue
        except SnapshotFileError as e:
            raise _Broken(path, e.what.removeprefix(f"{path}: ")) from e
        if "shard" not in snap.info or snap.kind != "snapshot":
            ignored.append(Skipped(path, f"{snap.kind} file inside a folder, not a rank file of a sharded snapshot"))
            continue
        try:
            members.append((snap, parse_shard_record(snap.info["shard"], snap.header)))
        except (ValueError, RecursionError) as e:
            raise _Broken(path, f"invalid shard record: {e}") from e
    return members, temps


def _assemble(folder: Path, members: list[tuple[Snapshot, ShardRecord]]) -> Snapshot:
    """Check that a set's rank files agree and tile every tensor; the set as one :class:`Snapshot`."""
    members = sorted(members, key=lambda m: m[1].rank)
    ref, ref_record = members[0]
    seen: dict[int, Path] = {}
    for snap, record in members:
        if record.rank in seen:
            raise _Broken(snap.path, f"rank {record.rank} is also in {seen[record.rank].name}")
        seen[record.rank] = snap.path
        for key in _AGREE:
            if getattr(snap, key) != getattr(ref, key):
                raise _Broken(snap.path, f"its {key} is {getattr(snap, key)!r}, not {getattr(ref, key)!r} as in {ref.path.name}")
        if record.files != ref_record.files:
            raise _Broken(snap.path, f"its set has {record.files} files, not {ref_record.files} as in {ref.path.name}")
        if record.shapes != ref_record.shapes:
            name = next(
                (n for n in ref_record.shapes if record.shapes.get(n) != ref_record.shapes[n]),
                next(iter(record.shapes.keys() - ref_record.shapes.keys()), ""),
            )
            mine, theirs = record.shapes.get(name), ref_record.shapes.get(name)
            raise _Broken(
                snap.path,
                f"global shape of {name!r} is {list(mine) if mine is not None else 'missing'}, "
                f"not {list(theirs) if theirs is not None else 'missing'} as in {ref.path.name}",
            )
    if len(members) < ref_record.files:
        missing = sorted(set(range(ref_record.files)) - set(seen))
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise _Incomplete(f"{len(members)} of {ref_record.files} rank files (rank {shown} missing): a write that did not finish")
    chunks: dict[str, list[Chunk]] = {name: [] for name in ref_record.shapes}
    for snap, record in members:
        for name, entry in snap.tensors.items():
            chunks[name].append(Chunk(snap.header, entry, record.offsets[name]))
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in ref_record.shapes.items():
        codes = {c.entry.code for c in chunks[name]}
        if len(codes) > 1:
            raise _Broken(chunks[name][-1].path, f"tensor {name!r} is stored as {' and '.join(sorted(codes))} in different files")
        problem = tiling_problem(name, shape, chunks[name])
        if problem is not None:
            overlap = " overlaps " in problem
            raise _Broken(chunks[name][-1].path if overlap else folder, problem)
        layout[name] = (codes.pop(), shape)
    return Snapshot(
        ref.header, ref.kind, ref.sigma_rel, ref.gamma, ref.t, ref.time_unit, ref.updates, ref.dtype, ref.info,
        layout=layout, chunks=chunks, files=tuple(s.path for s, _ in members), sharded=True, folder=folder,
        headers=tuple(s.header for s, _ in members),
    )


def read_set(folder: str | os.PathLike[str]) -> Snapshot:
    """Read and check a sharded snapshot (a folder of rank files) from its headers alone.

    Raises :class:`SnapshotFileError` naming the file when the set is broken or
    incomplete, :class:`NotASnapshot` when the folder holds no rank file.

    >>> read_set("ckpts/ema-s0.050-t000000001000").layout["fc.weight"]  # doctest: +SKIP
    ('F32', (16, 8))
    """
    root = Path(folder)
    filed = _Filed()
    snap = scan_set(root, filed)
    if filed.broken:
        raise SnapshotFileError(filed.broken[0].path, filed.broken[0].reason, "move the set out of the folder")
    if filed.incomplete:
        raise SnapshotFileError(root, filed.incomplete[0].reason, "use a complete snapshot")
    if snap is None:
        raise NotASnapshot(f"{root}: folder without rank files of a sharded snapshot")
    return snap


def scan_set(folder: Path, filed: Filing) -> Snapshot | None:
    """A complete set, or None after filing the folder as incomplete, broken or (without rank files) nothing."""
    try:
        members, temps = _set_members(folder, filed.ignored)
        if not members:
            if temps:
                filed.incomplete.append(Skipped(folder, f"only temporary files ({temps}): a write that did not finish"))
            return None
        return _assemble(folder, members)
    except _Incomplete as e:
        filed.incomplete.append(Skipped(folder, str(e)))
    except _Broken as e:
        reason = e.reason if e.path == folder else f"{e.reason} (in the sharded snapshot {folder.name})"
        filed.broken.append(Skipped(e.path, reason))
    except OSError as e:
        filed.broken.append(Skipped(folder, f"cannot list the folder ({e.strerror})"))
    return None
