"""One snapshot file, format version 1 (docs/design.md §2): its names, metadata and record.

Every fact about a snapshot comes from its header's ``posthoc_ema`` metadata,
never from its file name. A sharded snapshot (a folder of rank files) is read
by :mod:`.snapshot_set`; a folder of snapshots by :mod:`.catalogue`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import FLOAT_DTYPES, SAFETENSORS_DTYPES
from ..ema.profiles import SIGMA_REL_MAX, sigma_rel_to_gamma
from ..errors import SnapshotFileError
from .container import Header, TensorEntry, read_header
from .frozen import SNAPSHOT_KEY, FrozenFile, is_frozen, read_frozen
from .keys import FORMAT_VERSION, KINDS, METADATA_KEY, SUFFIX, library_info, utc_now
from .sharding import Chunk, ShardRecord, saved_offsets_metadata

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
    thinning: dict[str, Any] | None = None,
) -> dict[str, str]:
    """The header metadata of a version-1 snapshot; with ``shard``, of one rank file of a sharded set.

    ``thinning`` (``{"max_snapshots", "keep_faithful"}``) says the Recorder kept the folder bounded.

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
    if thinning is not None:
        record["thinning"] = thinning
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

    @property
    def frozen_id(self) -> str | None:
        """The id of the frozen file this snapshot belongs with (None: it holds the whole model)."""
        ident = self.info.get(SNAPSHOT_KEY)
        return ident if isinstance(ident, str) else None


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
    """The folder's frozen weights, stored once (kind ``"frozen"``, :mod:`.frozen`; the Recorder writes it): not a snapshot, not foreign."""

    def __init__(self, file: FrozenFile) -> None:
        super().__init__(f"{file.path}: frozen weights stored once")
        self.file = file

def read_file(path: str | os.PathLike[str]) -> Snapshot:
    """Read and validate one version-1 file (snapshot or synthesized) from its header alone.

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
