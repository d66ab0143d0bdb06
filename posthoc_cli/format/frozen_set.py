"""Frozen weights of a sharded (DTensor) model, stored once per folder as a set of rank files.

A sharded model's stored-once tensors (:mod:`.frozen`) are written like a sharded
snapshot (:mod:`.sharding`): each writing rank writes its own chunks, without
communication, into ``frozen/rank-0000k.safetensors``. Each file is a frozen file
(``kind: "frozen"``, ``id``, ``state_dict``, ``filter``) whose record adds the
``shard`` object and whose header adds ``DCP_SHARDING_INFO``. Scans group the
folder's rank files by id; a set is complete when it has every rank file and its
chunks tile every tensor. Reading these needs no torch.

>>> fs = scan_sets(Path("ckpts/frozen"))  # doctest: +SKIP
>>> fs.complete[0].tensors["base.weight"].shape  # doctest: +SKIP
(64, 64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CatalogueError, SnapshotFileError, arg
from .container import TensorEntry, read_header
from .frozen import FILE_NAME, WHERE, FrozenFile, is_frozen, read_frozen
from .sharding import Chunk, ShardRecord, parse_shard_record, tiling_problem

FOLDER_NAME = "frozen"  # the sub-folder of the snapshot folder holding the rank files


@dataclass(frozen=True)
class FrozenSet:
    """The rank files of one recording's frozen weights; ``complete`` False: only some of them (this rank's own)."""

    files: tuple[FrozenFile, ...]
    chunks: dict[str, list[Chunk]]  # per tensor, in state-dict order
    shapes: dict[str, tuple[int, ...]]  # global shapes
    codes: dict[str, str]
    complete: bool
    folder: Path
    tensors: dict[str, TensorEntry] = field(default_factory=dict)  # global tensors (begin: their order, no file offsets)

    def __post_init__(self) -> None:
        start = 0
        for name, shape in self.shapes.items():
            entry = TensorEntry(name, self.codes[name], shape, start, start)
            nbytes = entry.numel * entry.itemsize
            self.tensors[name] = TensorEntry(name, self.codes[name], shape, start, start + nbytes)
            start += nbytes

    @property
    def id(self) -> str:
        return self.files[0].id

    @property
    def state_dict(self) -> tuple[str, ...]:
        return self.files[0].state_dict

    @property
    def filter(self) -> dict[str, Any]:
        return self.files[0].filter

    @property
    def path(self) -> Path:
        return self.folder

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.tensors.values())


def member(path: Path) -> tuple[FrozenFile, ShardRecord] | None:
    header = read_header(path)
    if not is_frozen(header):
        return None
    file = read_frozen(header)
    try:
        return file, parse_shard_record(file.info.get("shard"), header)
    except (ValueError, RecursionError) as e:
        raise SnapshotFileError(path, f"invalid shard record of a frozen-weights rank file: {e}", "move the file out of the folder") from e


def assemble(folder: Path, members: list[tuple[FrozenFile, ShardRecord]], *, require_all: bool) -> FrozenSet:
    """One id's rank files as a set; ValueError says why they are not a complete one (``require_all``)."""
    members = sorted(members, key=lambda m: m[1].rank)
    ref, ref_record = members[0]
    ranks = [r.rank for _, r in members]
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"two files of frozen weights {ref.id} claim the same rank")
    for file, record in members:
        if record.files != ref_record.files or record.shapes != ref_record.shapes or file.state_dict != ref.state_dict:
            raise ValueError(f"{file.path.name} disagrees with {ref.path.name} on the set's layout")
    chunks: dict[str, list[Chunk]] = {name: [] for name in ref_record.shapes}
    codes: dict[str, str] = {}
    for file, record in members:
        for name, entry in file.tensors.items():
            if codes.setdefault(name, entry.code) != entry.code:
                raise ValueError(f"tensor {name!r} is stored as {codes[name]} and {entry.code} in different files")
            chunks[name].append(Chunk(file.header, entry, record.offsets[name]))
    complete = len(members) == ref_record.files
    if require_all:
        if not complete:
            raise ValueError(f"{len(members)} of {ref_record.files} rank files of frozen weights {ref.id}: a write that did not finish")
        for name, shape in ref_record.shapes.items():
            problem = tiling_problem(name, shape, chunks[name])
            if problem is not None:
                raise ValueError(problem)
    else:  # this rank's own file: only the tensors it holds a chunk of
        chunks = {n: c for n, c in chunks.items() if c}
    shapes = {n: s for n, s in ref_record.shapes.items() if n in chunks}
    return FrozenSet(tuple(f for f, _ in members), chunks, shapes, codes, complete, folder)


@dataclass
class SetScan:
    """What ``frozen/`` holds: complete sets, and the ids and reasons of the others."""

    complete: list[FrozenSet] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)
    broken: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)


def scan_sets(folder: Path) -> SetScan:
    """Group the rank files of ``folder`` (``ckpts/frozen``) by id into sets (headers only)."""
    out = SetScan()
    by_id: dict[str, list[tuple[FrozenFile, ShardRecord]]] = {}
    for path in sorted(p for p in folder.iterdir() if not p.name.startswith(".")):
        if path.is_dir() or not path.name.endswith(".safetensors"):
            out.ignored.append((path, "not a rank file of frozen weights"))
            continue
        try:
            found = member(path)
        except SnapshotFileError as e:
            out.broken.append((path, e.what.removeprefix(f"{path}: ")))
            continue
        if found is None:
            out.ignored.append((path, "not a rank file of frozen weights"))
            continue
        by_id.setdefault(found[0].id, []).append(found)
    for ident, members in by_id.items():
        try:
            out.complete.append(assemble(folder, members, require_all=True))
        except ValueError as e:
            (out.incomplete if "did not finish" in str(e) else out.broken).append((members[0][0].path, str(e)))
    return out


def as_set(file: FrozenFile) -> FrozenSet:
    """A single frozen file as a complete set of one file (each tensor one chunk at the origin)."""
    chunks = {n: [Chunk(file.header, e, (0,) * len(e.shape))] for n, e in file.tensors.items()}
    shapes = {n: e.shape for n, e in file.tensors.items()}
    return FrozenSet((file,), chunks, shapes, {n: e.code for n, e in file.tensors.items()}, True, file.path.parent)


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
                f"{self.folder}: the snapshots keep their frozen weights in {WHERE} (id {self.id}), which is missing",
                f"put {FILE_NAME} or the frozen/ files back, or write only the averaged tensors with {arg('trainable_only', True)}",
            )
        return self.file
