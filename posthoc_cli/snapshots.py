"""Snapshot files, format version 1 (DESIGN.md section 2): metadata, names, scanning a folder.

Every fact about a snapshot comes from its header's ``posthoc_ema`` metadata,
never from its file name. A scan sorts the files of a folder into snapshots
(grouped by sigma_rel, sorted by t), files it ignores on purpose (temporary
files, foreign safetensors, synthesized outputs) and files that are broken.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .container import Header, TensorEntry, read_header
from .dtypes import SAFETENSORS_DTYPES, torch_codes, torch_dtype
from .errors import CatalogueError, SnapshotFileError
from .frozen import FrozenFile, is_frozen, read_frozen
from .profiles import SIGMA_REL_MAX, sigma_rel_to_gamma
from .sharding import Chunk, ShardRecord, parse_shard_record, saved_offsets_metadata, tiling_problem

FORMAT_VERSION = 1
METADATA_KEY = "posthoc_ema"
SUFFIX = ".safetensors"
KINDS = ("snapshot", "synthesized")
# Storage dtypes for averaged tensors, by the name used in metadata and on the command line.
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
if TYPE_CHECKING:  # built on first use (module __getattr__ at the end): scans never import torch
    import torch
    from .frozen_set import FrozenSet

    STORAGE_NAMES: dict[torch.dtype, str]  # torch.float16 → "float16"
    CODES: dict[torch.dtype, str]  # torch dtype → safetensors code, as in container
_MAX_T = 2**62  # far beyond any real counter; keeps t**(gamma+1) arithmetic in float range checks


def format_sigma_rel(sigma_rel: float) -> str:
    """``0.05`` → ``"0.050"``; more digits only where three would merge two values."""
    short = f"{sigma_rel:.3f}"
    return short if float(short) == sigma_rel else repr(sigma_rel)


def snapshot_name(sigma_rel: float, t: int) -> str:
    """The file name of a snapshot, for people: ``ema-s0.050-t000000100000.safetensors``."""
    return f"ema-s{format_sigma_rel(sigma_rel)}-t{t:012d}{SUFFIX}"


def synthesized_name(sigma_rel: float, t: int) -> str:
    """The default file name of a synthesized EMA: ``ema-s0.150-t100000.safetensors``."""
    return f"ema-s{format_sigma_rel(sigma_rel)}-t{t}{SUFFIX}"


def library_info() -> dict[str, str]:
    return {"name": "posthoc-ema", "version": __version__}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def encode_metadata(info: dict[str, Any]) -> dict[str, str]:
    """The safetensors ``__metadata__`` for our record; json writes floats with repr, so they round-trip."""
    return {METADATA_KEY: json.dumps(info, allow_nan=False)}


def set_name(sigma_rel: float, t: int) -> str:
    """The folder name of a sharded snapshot, for people: ``ema-s0.050-t000000100000``."""
    return snapshot_name(sigma_rel, t).removesuffix(SUFFIX)


def snapshot_metadata(
    *,
    sigma_rel: float,
    gamma: float,
    t: int,
    time_unit: str,
    updates: int,
    dtype: str,
    shard: ShardRecord | None = None,
) -> dict[str, str]:
    """The header metadata of a version-1 snapshot; with ``shard``, of one rank file of a sharded set.

    A rank file's record adds ``"shard": {"rank", "files", "shapes"}`` and the
    header adds ``DCP_SHARDING_INFO`` with ``shard.offsets`` (see :mod:`.sharding`).
    """
    record: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "kind": "snapshot",
        "sigma_rel": sigma_rel,
        "gamma": gamma,
        "t": t,
        "time_unit": time_unit,
        "updates": updates,
        "dtype": dtype,
        "library": library_info(),
        "created": utc_now(),
    }
    if shard is None:
        return encode_metadata(record)
    record["shard"] = {"rank": shard.rank, "files": shard.files, "shapes": {n: list(s) for n, s in shard.shapes.items()}}
    return {**encode_metadata(record), **saved_offsets_metadata(shard.offsets)}


@dataclass(frozen=True)
class Snapshot:
    """A validated version-1 snapshot: one file, or a complete sharded set (a folder of rank files).

    Synthesis reads both alike through ``layout`` (every tensor's dtype code and
    global shape, in state-dict order) and ``chunks`` (the pieces that tile each
    tensor; a single file has one chunk per tensor at offsets 0). ``header`` and
    ``tensors`` describe the one file of a single-file snapshot; for a set they
    describe its lowest rank's file only.
    """

    header: Header
    kind: str
    sigma_rel: float
    gamma: float
    t: int
    time_unit: str
    updates: int
    dtype: str
    info: dict[str, Any]
    layout: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    chunks: dict[str, list[Chunk]] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    sharded: bool = False
    folder: Path | None = None  # the set's folder (sharded only)
    headers: tuple[Header, ...] = ()  # the headers of ``files``, in the same order

    def __post_init__(self) -> None:
        if not self.sharded and not self.files:  # a single file: derive the chunked view from its header
            tensors = self.header.tensors
            object.__setattr__(self, "layout", {n: (e.code, e.shape) for n, e in tensors.items()})
            object.__setattr__(self, "chunks", {n: [Chunk(self.header, e, (0,) * len(e.shape))] for n, e in tensors.items()})
            object.__setattr__(self, "files", (self.header.path,))
            object.__setattr__(self, "headers", (self.header,))

    @property
    def path(self) -> Path:
        """The file, or the set's folder."""
        return self.folder if self.folder is not None else self.header.path

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return self.header.tensors

    @property
    def nbytes(self) -> int:
        """Bytes on disk, all files together."""
        return sum(h.file_size for h in self.headers)


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_record(header: Header) -> Snapshot:
    """Check the ``posthoc_ema`` record of a header; ValueError says what is wrong."""
    info = json.loads(header.metadata[METADATA_KEY])
    if not isinstance(info, dict):
        raise ValueError("posthoc_ema metadata is not a JSON object")
    if type(info.get("format")) is not int or info.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported format {info.get('format')!r} (this version reads format {FORMAT_VERSION})")
    kind = info.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    sigma_rel, gamma, t = info.get("sigma_rel"), info.get("gamma"), info.get("t")
    if not (_finite_number(sigma_rel) and 0 < sigma_rel < SIGMA_REL_MAX):  # type: ignore[operator]
        raise ValueError(f"sigma_rel {sigma_rel!r} is not in (0, {SIGMA_REL_MAX:.4f})")
    sigma_rel = float(sigma_rel)  # type: ignore[arg-type]
    try:
        expected = sigma_rel_to_gamma(sigma_rel)
    except ArithmeticError:  # sigma_rel so small that sigma_rel**-2 overflows
        raise ValueError(f"sigma_rel {sigma_rel!r} is too small to have a power-function profile") from None
    if not (_finite_number(gamma) and math.isclose(gamma, expected, rel_tol=1e-9)):  # type: ignore[arg-type]
        raise ValueError(f"gamma {gamma!r} does not match sigma_rel {sigma_rel!r} (expected {expected!r})")
    if not (isinstance(t, int) and not isinstance(t, bool) and 0 < t < _MAX_T):
        raise ValueError(f"t {t!r} is not a positive integer")
    updates = info.get("updates", 0)
    if not (isinstance(updates, int) and not isinstance(updates, bool) and 0 <= updates <= t):
        raise ValueError(f"updates {updates!r} is not an integer in [0, t]")
    time_unit = info.get("time_unit", "step")
    # Printed by the CLI: control characters (terminal escapes) and lone surrogates (unencodable) are refused.
    if not (isinstance(time_unit, str) and time_unit.isprintable()):
        raise ValueError(f"time_unit {time_unit!r} is not a printable string")
    dtype = info.get("dtype")
    if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    float_codes = {e.code for e in header.tensors.values() if SAFETENSORS_DTYPES[e.code].is_floating_point}
    if float_codes - {FLOAT_DTYPES[dtype]}:
        raise ValueError(f"metadata says {dtype} but the file holds {', '.join(sorted(float_codes))} tensors")
    return Snapshot(header, kind, sigma_rel, float(gamma), t, time_unit, updates, dtype, info)  # type: ignore[arg-type]


class NotASnapshot(Exception):
    """A readable safetensors file that is not one of ours (a foreign file): skipped, not an error."""


class StoredOnceFile(NotASnapshot):
    """The folder's frozen weights, stored once (kind ``"frozen"``, :mod:`.frozen`): not a snapshot, not foreign."""

    def __init__(self, file: FrozenFile) -> None:
        super().__init__(f"{file.path}: frozen weights stored once")
        self.file = file


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Read and validate a version-1 file (snapshot or synthesized) from its header alone.

    Raises :class:`SnapshotFileError` for a broken file and :class:`NotASnapshot`
    for a valid safetensors file without posthoc-ema metadata. A folder is read
    as a sharded snapshot (:func:`read_set`).
    """
    if os.path.isdir(path):
        return read_set(path)
    header = read_header(path)
    if METADATA_KEY not in header.metadata:
        raise NotASnapshot(f"{header.path}: safetensors file without posthoc_ema metadata")
    if is_frozen(header):
        raise StoredOnceFile(read_frozen(header))
    try:
        return _parse_record(header)
    except (ValueError, RecursionError) as e:
        raise SnapshotFileError(header.path, f"invalid posthoc_ema metadata: {e}", "delete or replace the file") from e


@dataclass(frozen=True)
class Skipped:
    """A file a scan did not use, and why."""

    path: Path
    reason: str


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
            snap = read_snapshot(path)
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
    catalogue = Catalogue(root.parent)
    snap = _scan_set(root, catalogue)
    if catalogue.broken:
        raise SnapshotFileError(catalogue.broken[0].path, catalogue.broken[0].reason, "move the set out of the folder")
    if catalogue.incomplete:
        raise SnapshotFileError(root, catalogue.incomplete[0].reason, "use a complete snapshot")
    if snap is None:
        raise NotASnapshot(f"{root}: folder without rank files of a sharded snapshot")
    return snap


def _scan_set(folder: Path, catalogue: Catalogue) -> Snapshot | None:
    """A complete set, or None after filing the folder as incomplete, broken or (without rank files) nothing."""
    try:
        members, temps = _set_members(folder, catalogue.ignored)
        if not members:
            if temps:
                catalogue.incomplete.append(Skipped(folder, f"only temporary files ({temps}): a write that did not finish"))
            return None
        return _assemble(folder, members)
    except _Incomplete as e:
        catalogue.incomplete.append(Skipped(folder, str(e)))
    except _Broken as e:
        reason = e.reason if e.path == folder else f"{e.reason} (in the sharded snapshot {folder.name})"
        catalogue.broken.append(Skipped(e.path, reason))
    except OSError as e:
        catalogue.broken.append(Skipped(folder, f"cannot list the folder ({e.strerror})"))
    return None


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
        if path.is_dir() and path.name == "frozen":  # frozen weights of a sharded model (frozen_set.FOLDER_NAME)
            from .frozen_set import scan_sets  # imports torch: only when a folder holds such a set

            sets = scan_sets(path)
            catalogue.frozen += sets.complete
            catalogue.incomplete += [Skipped(p, r) for p, r in sets.incomplete]
            catalogue.broken += [Skipped(p, r) for p, r in sets.broken]
            catalogue.ignored += [Skipped(p, r) for p, r in sets.ignored]
            continue
        if path.is_dir():
            found = _scan_set(path, catalogue)
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
                    f"lacks {_few(missing)}" if missing else "",
                    f"has extra {_few(extra)}" if extra else "",
                )
                if part
            )
        else:
            name = next(n for n in layout if layout[n] != ref_layout[n])
            (code, shape), (ref_code, ref_shape) = layout[name], ref_layout[name]
            detail = f"tensor {name!r} is {code}{list(shape)}, not {ref_code}{list(ref_shape)}"
        problems.append(f"{snap.path.name} disagrees with {ref.path.name}: {detail}")
    return problems


def _few(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


__all__ = [
    "CODES",
    "FLOAT_DTYPES",
    "Catalogue",
    "NotASnapshot",
    "Skipped",
    "Snapshot",
    "layout_problems",
    "read_set",
    "read_snapshot",
    "scan",
    "set_name",
    "snapshot_metadata",
    "snapshot_name",
]


def __getattr__(name: str) -> Any:
    # PEP 562: the tables keyed by torch dtypes import torch, so they are built only when asked for.
    if name == "STORAGE_NAMES":
        return {torch_dtype(code): storage for storage, code in FLOAT_DTYPES.items()}
    if name == "CODES":
        return torch_codes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
