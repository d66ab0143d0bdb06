"""Frozen weights stored once per folder: the file, and the Recorder's watch over what it holds.

A Recorder that averages only what trains (:mod:`.selection`) writes the tensors
it does not average once, into ``frozen.safetensors`` beside the snapshots: a
safetensors file whose ``posthoc_ema`` metadata has ``kind: "frozen"``, an
``id``, the model's ``state_dict`` names in order, and the ``filter`` options.
Every snapshot of that recording names the ``id`` in its own metadata
(``"frozen": id``), so synthesis finds the file by its header, never by its
name, and refuses snapshots of two recordings mixed in one folder.

The file is written atomically at the Recorder's first snapshot (so weights
loaded after the Recorder was made are the ones kept), tensors as they are in
the model (dtype and bytes unchanged). A resumed Recorder instead checks at
its first snapshot that the model still holds those bytes. After that, each
snapshot checks that no stored-once parameter has started to require grad and
that no stored-once tensor was changed in place (torch's version counter;
changed tensors are compared with the file, bit for bit): an error, never a
silently constant EMA.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .container import Header, TensorEntry, read_header
from .dtypes import SAFETENSORS_DTYPES
from .errors import CatalogueError, FrozenWeightsError, ResumeError, SnapshotFileError, arg

if TYPE_CHECKING:
    import torch

    from .frozen_set import FrozenSet
    from .snapshots import Catalogue, Snapshot  # imported the other way at run time (scans read frozen files)

KIND = "frozen"
FILE_NAME = "frozen.safetensors"
_WHERE = "frozen.safetensors (a sharded model: every rank file of frozen/)"
SNAPSHOT_KEY = "frozen"  # the key in a snapshot's record that holds the id of its frozen file
_METADATA_KEY = "posthoc_ema"  # snapshots.METADATA_KEY (this module cannot import snapshots)


@dataclass(frozen=True)
class FrozenFile:
    """A validated frozen file: its header and record."""

    header: Header
    id: str
    state_dict: tuple[str, ...]  # every name of the recorded model, in its order
    filter: dict[str, Any]
    info: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def tensors(self) -> dict[str, TensorEntry]:
        return self.header.tensors

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def is_frozen(header: Header) -> bool:
    """Whether a header's ``posthoc_ema`` record says ``kind: "frozen"``."""
    try:
        info = json.loads(header.metadata.get(_METADATA_KEY, "null"))
    except (ValueError, RecursionError):
        return False
    return isinstance(info, dict) and info.get("kind") == KIND


def read_frozen(header: Header) -> FrozenFile:
    """Validate the record of a frozen file; :class:`SnapshotFileError` says what is wrong."""
    try:
        info = json.loads(header.metadata[_METADATA_KEY])
        if info.get("format") != 1 or type(info.get("format")) is not int:
            raise ValueError(f"unsupported format {info.get('format')!r} (this version reads format 1)")
        ident, names, selection = info.get("id"), info.get("state_dict"), info.get("filter", {})
        if not (isinstance(ident, str) and ident.isalnum() and 0 < len(ident) <= 64):
            raise ValueError(f"id {ident!r} is not a short alphanumeric string")
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(set(names)) == len(names)):
            raise ValueError("state_dict is not a list of distinct names")
        known = set(names)
        stray = [n for n in header.tensors if n not in known]
        if stray:
            raise ValueError(f"tensor {stray[0]!r} is not in its state_dict list")
        if not isinstance(selection, dict):
            raise ValueError("filter is not an object")
    except (ValueError, RecursionError, AttributeError) as e:
        raise SnapshotFileError(header.path, f"invalid frozen-weights file: {e}", "replace it with the one the Recorder wrote") from e
    return FrozenFile(header, ident, tuple(names), selection, info)


# Reading and scanning need no torch (snapshots.py imports this module); writing and checking do,
# so those import it (and the torch parts of container) where they run.


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def info_record(ident: str, state_dict: Sequence[str], selection: dict[str, Any]) -> dict[str, Any]:
    """The ``posthoc_ema`` record of a frozen file (a rank file of a set adds ``shard``)."""
    return {
        "format": 1,
        "kind": KIND,
        "id": ident,
        "state_dict": list(state_dict),
        "filter": selection,
        "library": {"name": "posthoc-ema", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }


def write_frozen(
    folder: Path, tensors: Mapping[str, torch.Tensor], state_dict: Sequence[str], selection: dict[str, Any]
) -> FrozenFile:
    """Write ``tensors`` as they are (dtype, bytes) into ``folder/frozen.safetensors``, atomically, one at a time."""
    from .container import CODES, AtomicWriter

    info = info_record(uuid.uuid4().hex, state_dict, selection)
    layout = [(name, CODES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    path = folder / FILE_NAME
    refuse_foreign(path)
    with AtomicWriter(path, layout, {_METADATA_KEY: json.dumps(info)}, overwrite=True) as writer:
        for tensor in tensors.values():  # one tensor in host memory at a time
            writer.write(_cpu(tensor))
        writer.commit()
    return read_frozen(read_header(path))


def refuse_foreign(path: Path) -> None:
    """Never replace a file of the user's that happens to have our name (only an earlier frozen file)."""
    if not os.path.lexists(path):
        return
    try:
        ours = is_frozen(read_header(path))
    except SnapshotFileError:
        ours = False
    if not ours:
        raise FrozenWeightsError(
            f"{path} exists and is not posthoc-ema's frozen weights, which the Recorder writes under that name",
            "move that file out of the snapshot folder, or record in another folder",
        )


def differing(file: FrozenFile | FrozenSet, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names whose bytes in the model differ from the file's (or that the file lacks)."""
    import torch

    from . import dtensors
    from .container import CODES, read_tensor
    from .frozen_set import FrozenSet, differing_chunks

    if isinstance(file, FrozenSet):
        return differing_chunks(file, tensors)
    if any(dtensors.is_dtensor(t) for t in tensors.values()):  # a sharded run continuing an unsharded recording
        return differing_chunks(as_set(file), tensors)

    out = []
    try:
        fd = os.open(file.path, os.O_RDONLY)
    except OSError as e:
        raise SnapshotFileError(file.path, f"cannot open ({e.strerror})", "check that it still exists") from e
    try:
        for name, tensor in tensors.items():
            entry = file.tensors.get(name)
            live = _cpu(tensor)
            if entry is None or entry.code != CODES[live.dtype] or entry.shape != tuple(live.shape):
                out.append(name)
                continue
            stored = read_tensor(fd, entry, path=file.path)
            if not torch.equal(stored.reshape(-1).view(torch.uint8), live.reshape(-1).view(torch.uint8)):
                out.append(name)
    finally:
        os.close(fd)
    return out


def as_set(file: FrozenFile) -> FrozenSet:
    """A single frozen file as a complete set of one file (each tensor one chunk at the origin)."""
    from .frozen_set import FrozenSet
    from .sharding import Chunk

    chunks = {n: [Chunk(file.header, e, (0,) * len(e.shape))] for n, e in file.tensors.items()}
    shapes = {n: e.shape for n, e in file.tensors.items()}
    return FrozenSet((file,), chunks, shapes, {n: e.code for n, e in file.tensors.items()}, True, file.path.parent)


def snapshot_frozen_id(snap: Snapshot) -> str | None:
    """The id of the frozen file a snapshot belongs with (None: it holds the whole model)."""
    ident = snap.info.get(SNAPSHOT_KEY)
    return ident if isinstance(ident, str) else None


def tag(metadata: dict[str, str], ident: str | None, key: str = SNAPSHOT_KEY) -> dict[str, str]:
    """A file's metadata with ``key: ident`` added to its record (a snapshot: the id of its frozen file)."""
    if ident is None:
        return metadata
    info = json.loads(metadata[_METADATA_KEY])
    info[key] = ident
    return {**metadata, _METADATA_KEY: json.dumps(info, allow_nan=False)}


def _options(selection: Mapping[str, Any]) -> str:
    """``average_frozen=False, include=None, exclude=['x.*']``, as the options were passed (from any file)."""
    return ", ".join(f"{key}={value!r}" for key, value in selection.items()) or "no options recorded"


def _few(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# -- synthesis side -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenRef:
    """The frozen file that a plan's snapshots need (``file`` None: it is missing from the folder)."""

    id: str
    file: FrozenFile | FrozenSet | None
    folder: Path

    def require(self) -> FrozenFile | FrozenSet:
        """The file, or a clear error when it is missing."""
        if self.file is None:
            raise CatalogueError(
                f"{self.folder}: the snapshots keep their frozen weights in {_WHERE} (id {self.id}), which is missing",
                f"put {FILE_NAME} or the frozen/ files back, or write only the averaged tensors with {arg('trainable_only', True)}",
            )
        return self.file


def copy_frozen(file: FrozenFile | FrozenSet, sinks: Sequence[Any], chunk: int = 16 << 20) -> Iterator[tuple[str, int]]:
    """Append every tensor of ``file`` to each sink, bit for bit, in file order; yields (name, bytes) as it goes."""
    import torch

    from .frozen_set import FrozenSet, copy_set

    if isinstance(file, FrozenSet):
        yield from copy_set(file, sinks, chunk)
        return

    from .container import read_into

    raw = torch.empty(min(chunk, max(file.nbytes, 1)), dtype=torch.uint8)
    buffer = raw.numpy().data
    try:
        fd = os.open(file.path, os.O_RDONLY)
    except OSError as e:
        raise SnapshotFileError(file.path, f"cannot open ({e.strerror})", "check that it still exists and is readable") from e
    try:
        for entry in sorted(file.tensors.values(), key=lambda e: e.begin):
            for start in range(0, entry.nbytes, len(buffer)):
                view = buffer[: min(len(buffer), entry.nbytes - start)]
                read_into(fd, entry, view, start, path=file.path)
                for sink in sinks:
                    sink.write(raw[: len(view)])
                yield entry.name, len(view)
    finally:
        os.close(fd)


def frozen_ref(inputs: Sequence[Snapshot], catalogue: Catalogue) -> FrozenRef | None:
    """The frozen file that ``inputs`` belong with; refuses snapshots of two recordings."""
    ids = {snapshot_frozen_id(s): s for s in inputs}
    if len(ids) > 1:
        (a, sa), (b, sb) = list(ids.items())[:2]
        raise CatalogueError(
            f"{sa.path.name} and {sb.path.name} come from two recordings (stored-once weights {a} and {b})",
            "keep one recording per folder",
        )
    if not ids or (ident := next(iter(ids))) is None:
        return None
    found = next((f for f in catalogue.frozen if f.id == ident), None)
    if found is not None:
        clash = [n for n in found.tensors if n in inputs[-1].tensors]
        if clash:
            raise CatalogueError(
                f"{found.path}: {_few(clash)} are also in {inputs[-1].path.name}", "replace the file with the one the Recorder wrote"
            )
    return FrozenRef(ident, found, catalogue.folder)


def contents_report(catalogue: Catalogue) -> tuple[dict[str, Any], list[str]]:
    """What the latest snapshot averages, what it keeps as it is, and what is stored once (with bytes);
    plus the problems found (a missing frozen file). JSON-ready, for ``inspect``."""
    snaps = catalogue.snapshots
    if not snaps:
        return {}, []
    latest = snaps[-1]

    def part(shapes: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, int]:
        counts = [(math.prod(shape), SAFETENSORS_DTYPES[code].itemsize) for code, shape in shapes]
        return {"tensors": len(counts), "parameters": sum(n for n, _ in counts), "bytes": sum(n * size for n, size in counts)}

    entries = list(latest.layout.values())  # global shapes: a sharded snapshot counts all its rank files, not rank 0's
    ident = snapshot_frozen_id(latest)
    file = next((f for f in catalogue.frozen if f.id == ident), None)
    problems = []
    if ident is not None and file is None:
        problems.append(
            f"the snapshots keep their frozen weights in {_WHERE} (id {ident}), which is missing: "
            "complete outputs cannot be made (--trainable-only still works)"
        )
    report: dict[str, Any] = {
        "averaged": part([e for e in entries if SAFETENSORS_DTYPES[e[0]].is_floating_point]),
        "as_is": part([e for e in entries if not SAFETENSORS_DTYPES[e[0]].is_floating_point]),
        "stored_once": None if file is None else {"path": str(file.path), **part([(e.code, e.shape) for e in file.tensors.values()])},
        "frozen_id": ident,
        "unused_frozen_files": [str(f.path) for f in catalogue.frozen if f is not file],
    }
    return report, problems


# -- recording side -------------------------------------------------------------------------------


class FrozenWeights:
    """The stored-once tensors of one Recorder: written or checked at its first snapshot, watched after.

    >>> fw = FrozenWeights(Path("ckpts"), {"base.weight": base.weight}, ["base.weight", "lora.weight"], {})  # doctest: +SKIP
    >>> fw.before_snapshot(write=True)  # doctest: +SKIP
    '3f2a…'
    """

    def __init__(
        self,
        folder: Path,
        tensors: Mapping[str, torch.Tensor],
        state_dict: Sequence[str],
        selection: dict[str, Any],
        set_id: str | None = None,
    ) -> None:
        self.folder = folder
        self.tensors = dict(tensors)  # the model's own Parameters and buffers (their requires_grad and version)
        self.state_dict = list(state_dict)
        self.selection = selection
        self.file: FrozenFile | FrozenSet | None = None  # a set: this rank's own file, or the folder's set on resume
        self.set_id = set_id  # a sharded model: the id its ranks agreed on when the Recorder was made
        self._in_use = False  # snapshots refer to self.file: check it, never rewrite it
        self._versions: dict[str, int] | None = None

    def resume(self, catalogue: Catalogue, ours: Mapping[str, str]) -> None:
        """Adopt the folder's frozen file, or refuse a recording whose choice of what to average differs."""
        from .selection import AS_IS, AVERAGED, STORED_ONCE, describe_difference

        latest = catalogue.snapshots[-1]
        ref = frozen_ref([latest], catalogue)
        if ref is not None and ref.file is None:
            raise FrozenWeightsError(
                f"{self.folder}: the snapshots keep their frozen weights in {_WHERE} (id {ref.id}), which is missing",
                f"put {FILE_NAME} or the frozen/ files back to continue this recording, or record in a new folder",
            )
        file = ref.file if ref is not None else None
        roles = {n: AVERAGED if e.is_floating_point else AS_IS for n, e in latest.tensors.items()}
        roles.update({n: STORED_ONCE for n in (file.tensors if file else ())})
        # Other names are another model: the Recorder's own check says so; here only the roles differ.
        diff = describe_difference(roles, ours) if roles.keys() == ours.keys() else None
        if diff is not None:
            theirs = _options(file.filter) if file is not None else "every tensor averaged"
            ours_text = _options(self.selection)
            raise ResumeError(
                f"{latest.path} was recorded with other choices of what to average ({theirs}; here {ours_text}): {diff}",
                "pass the include=/exclude=/average_frozen= it was recorded with, or use a new folder",
            )
        self.file, self._in_use = file, file is not None

    def carry_over(self, old: FrozenWeights) -> None:
        """Continue ``old``'s file after the model's tensors were replaced: checked again at the next snapshot."""
        self.file, self._in_use = old.file, old._in_use or old.file is not None

    def before_snapshot(self, *, write: bool) -> str | None:
        """Check the stored-once tensors; on the first call write (or verify) the file. Returns its id."""
        if not self.tensors:
            return None
        unfrozen = [n for n, t in self.tensors.items() if t.requires_grad]
        if unfrozen:
            raise FrozenWeightsError(
                f"{_few(unfrozen)} now require grad, but were frozen (stored once, not averaged) when the Recorder was made",
                "make the Recorder after unfreezing (in a new folder), or pass average_frozen=True (or include=) to average them",
            )
        if self._versions is None:
            if write:
                self._first_write()
            self._versions = {n: t._version for n, t in self.tensors.items()}
        else:
            changed = {n: t for n, t in self.tensors.items() if t._version != self._versions[n]}
            if changed and self.file is not None:
                self._check(changed)
            self._versions.update({n: t._version for n, t in changed.items()})
        return self.file.id if self.file is not None else self.set_id

    def _first_write(self) -> None:
        if self._in_use and self.file is not None:
            self._check(self.tensors)
            return
        if self.set_id is not None:  # a sharded model: each rank writes its own chunks (frozen_set.py)
            from .frozen_set import write_frozen_set

            self.file = write_frozen_set(self.folder, self.tensors, self.state_dict, self.selection, self.set_id)
            self._in_use = True
            return
        self.file = write_frozen(self.folder, self.tensors, self.state_dict, self.selection)
        self._in_use = True

    def _check(self, tensors: Mapping[str, torch.Tensor]) -> None:
        assert self.file is not None
        bad = differing(self.file, tensors)
        if bad:
            raise FrozenWeightsError(
                f"frozen {_few(bad)} no longer equal what {self.file.path} stores once for this recording",
                "keep frozen weights unchanged while recording (load the recorded model's weights before resuming), "
                "or average them with average_frozen=True in a new folder",
            )


__all__ = [
    "FILE_NAME",
    "KIND",
    "FrozenFile",
    "FrozenRef",
    "FrozenWeights",
    "contents_report",
    "copy_frozen",
    "differing",
    "frozen_ref",
    "is_frozen",
    "read_frozen",
    "snapshot_frozen_id",
    "tag",
    "write_frozen",
]
