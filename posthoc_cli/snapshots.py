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

FORMAT_VERSION = 1
METADATA_KEY = "posthoc_ema"
SUFFIX = ".safetensors"
KINDS = ("snapshot", "synthesized")
# Storage dtypes for averaged tensors, by the name used in metadata and on the command line.
FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
if TYPE_CHECKING:  # built on first use (module __getattr__ at the end): scans never import torch
    import torch

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


def snapshot_metadata(
    *, sigma_rel: float, gamma: float, t: int, time_unit: str, updates: int, dtype: str
) -> dict[str, str]:
    """The header metadata of a version-1 snapshot."""
    return encode_metadata(
        {
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
    )


@dataclass(frozen=True)
class Snapshot:
    """A validated version-1 file: its header plus the posthoc-ema record."""

    header: Header
    kind: str
    sigma_rel: float
    gamma: float
    t: int
    time_unit: str
    updates: int
    dtype: str
    info: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return self.header.tensors


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
    for a valid safetensors file without posthoc-ema metadata.
    """
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
    frozen: list[FrozenFile] = field(default_factory=list)  # frozen weights stored once (.frozen)

    @property
    def snapshots(self) -> list[Snapshot]:
        """All snapshots, by (t, sigma_rel)."""
        return sorted((s for group in self.series.values() for s in group), key=lambda s: (s.t, s.sigma_rel))

    @property
    def latest_t(self) -> int:
        return max(s.t for s in self.snapshots)

    def raise_if_broken(self) -> None:
        """Refuse to work from a folder with a broken file: silently leaving one out would change results."""
        if self.broken:
            first = self.broken[0]
            more = f" (and {len(self.broken) - 1} more problems)" if len(self.broken) > 1 else ""
            raise CatalogueError(
                f"{first.path}: {first.reason}{more}",
                "move the file out of the folder (or delete it) and run again; `posthoc-ema inspect` lists all problems",
            )


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
        if path.is_dir():
            continue
        if path.name.endswith(".tmp"):
            catalogue.ignored.append(Skipped(path, "temporary file of an unfinished write"))
            continue
        if not path.name.endswith(SUFFIX):
            catalogue.ignored.append(Skipped(path, "not a .safetensors file"))
            continue
        try:
            snap = read_snapshot(path)
        except StoredOnceFile as found:
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
        key = (snap.sigma_rel, snap.t)
        twin = by_key.get(key)
        if twin is None:
            by_key[key] = snap
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
    ref_layout = {n: (e.code, e.shape) for n, e in ref.tensors.items()}
    for snap in snapshots[:-1]:
        if snap.time_unit != ref.time_unit:  # its t is on another scale: the weights would be wrong
            detail = f"its time unit is {snap.time_unit!r}, not {ref.time_unit!r}"
            problems.append(f"{snap.path.name} disagrees with {ref.path.name}: {detail}")
            continue
        layout = {n: (e.code, e.shape) for n, e in snap.tensors.items()}
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
    "read_snapshot",
    "scan",
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
