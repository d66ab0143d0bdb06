"""Frozen weights of a sharded (DTensor) model, stored once per folder as a set of rank files.

A sharded model's stored-once tensors (:mod:`.frozen`) are written like a sharded
snapshot (:mod:`.sharding`): each writing rank writes its own chunks, without
communication, into ``frozen/rank-0000k.safetensors``. Each file is a frozen file
(``kind: "frozen"``, ``id``, ``state_dict``, ``filter``) whose record adds the
``shard`` object and whose header adds ``DCP_SHARDING_INFO``. The ranks agree on the
``id`` when the Recorder is made (where it may talk to the others), so writing needs
no collective. Scans group the folder's rank files by id; a set is complete when it
has every rank file and its chunks tile every tensor.

>>> fs = scan_sets(Path("ckpts/frozen"))  # doctest: +SKIP
>>> fs.complete[0].tensors["base.weight"].shape  # doctest: +SKIP
(64, 64)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .container import TensorEntry, read_header
from .errors import FrozenWeightsError, OutputError, SnapshotFileError
from .frozen import _METADATA_KEY, FrozenFile, info_record, is_frozen, read_frozen, refuse_foreign
from .sharding import Chunk, ShardRecord, parse_shard_record, rank_file_name, read_region, saved_offsets_metadata, tiling_problem

if TYPE_CHECKING:
    import torch

# torch (and .dtensors) are imported where tensors are written, compared or copied, not by
# scans: ``inspect`` of a folder holding a frozen set stays torch-free (issue 14).

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


def _member(path: Path) -> tuple[FrozenFile, ShardRecord] | None:
    header = read_header(path)
    if not is_frozen(header):
        return None
    file = read_frozen(header)
    try:
        return file, parse_shard_record(file.info.get("shard"), header)
    except (ValueError, RecursionError) as e:
        raise SnapshotFileError(path, f"invalid shard record of a frozen-weights rank file: {e}", "move the file out of the folder") from e


def _assemble(folder: Path, members: list[tuple[FrozenFile, ShardRecord]], *, require_all: bool) -> FrozenSet:
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
            found = _member(path)
        except SnapshotFileError as e:
            out.broken.append((path, e.what.removeprefix(f"{path}: ")))
            continue
        if found is None:
            out.ignored.append((path, "not a rank file of frozen weights"))
            continue
        by_id.setdefault(found[0].id, []).append(found)
    for ident, members in by_id.items():
        try:
            out.complete.append(_assemble(folder, members, require_all=True))
        except ValueError as e:
            (out.incomplete if "did not finish" in str(e) else out.broken).append((members[0][0].path, str(e)))
    return out


# -- recording side -------------------------------------------------------------------------------


def write_frozen_set(
    folder: Path, tensors: Mapping[str, torch.Tensor], state_dict: Sequence[str], selection: dict[str, Any], ident: str
) -> FrozenSet | None:
    """Write this rank's owned chunks of ``tensors`` into ``folder/frozen/rank-k.safetensors`` (atomically).

    Ownership follows :func:`.dtensors.shard_plan`; a rank owning no chunk writes
    nothing (returns None). No communication.
    """
    from . import dtensors
    from .container import CODES, AtomicWriter

    plan = dtensors.shard_plan(tensors)
    if plan is None or plan.index is None:
        return None
    names = [n for n, c in zip(tensors, plan.chunks) if c.writes]
    shard = ShardRecord(
        plan.index, plan.files, {n: c.shape for n, c in zip(tensors, plan.chunks)},
        {n: c.offsets for n, c in zip(tensors, plan.chunks) if c.writes},
    )
    info = info_record(ident, state_dict, selection)
    info["shard"] = {"rank": shard.rank, "files": shard.files, "shapes": {n: list(s) for n, s in shard.shapes.items()}}
    locals_ = [dtensors.local(tensors[n]) for n in names]
    layout = [(n, CODES[t.dtype], tuple(t.shape)) for n, t in zip(names, locals_)]
    sub = folder / FOLDER_NAME
    try:
        sub.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {sub} ({e.strerror})", "check the folder and its permissions") from e
    path = sub / rank_file_name(plan.index)
    refuse_foreign(path)
    metadata = {_METADATA_KEY: json.dumps(info), **saved_offsets_metadata(shard.offsets)}
    with AtomicWriter(path, layout, metadata, overwrite=True) as writer:
        for t in locals_:  # one local shard in host memory at a time
            writer.write(t.detach().to("cpu").contiguous())
        writer.commit()
    member = _member(path)
    assert member is not None
    return _assemble(sub, [member], require_all=False)


def _local_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """Where this rank's part of ``tensor`` starts globally, and that part (a plain tensor)."""
    from . import dtensors

    if dtensors.is_dtensor(tensor):
        return dtensors.local_box(tensor)[0], dtensors.local(tensor)
    return (0,) * tensor.dim(), tensor.detach()


def differing_chunks(stored: FrozenSet, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names whose local shards differ from what ``stored`` holds for them (bit for bit).

    A complete set is read at each rank's own box (any stored chunking); a rank's
    own file checks only the chunks it holds itself.
    """
    import torch

    from . import dtensors
    from .container import CODES

    out = []
    for name, tensor in tensors.items():
        offsets, live = _local_box(tensor)
        live = live.to("cpu").contiguous()
        chunks = stored.chunks.get(name)
        if not stored.complete:
            chunks = [c for c in chunks or [] if c.offsets == offsets and c.entry.shape == tuple(live.shape)]
            if not chunks:
                continue  # stored by another rank, which checks it
        if chunks is None or stored.codes[name] != CODES[live.dtype] or (
            dtensors.is_dtensor(tensor) and tuple(tensor.shape) != stored.shapes[name]
        ) or (not dtensors.is_dtensor(tensor) and tuple(live.shape) != stored.shapes[name]):
            out.append(name)
            continue
        if live.numel() == 0:
            continue
        region = read_region(chunks, offsets, tuple(live.shape))
        if not torch.equal(region.reshape(-1).view(torch.uint8), live.reshape(-1).view(torch.uint8)):
            out.append(name)
    return out


# -- synthesis side -------------------------------------------------------------------------------


def copy_set(stored: FrozenSet, sinks: Sequence[Any], chunk: int = 16 << 20) -> Iterator[tuple[str, int]]:
    """Append every tensor of a complete set to each sink in row-major order, in slices of about ``chunk`` bytes."""
    import torch

    for name, entry in stored.tensors.items():
        shape = entry.shape
        if not shape or entry.numel == 0:
            part = read_region(stored.chunks[name], (0,) * len(shape), shape) if entry.numel else None
            if part is not None:
                for sink in sinks:
                    sink.write(part.reshape(-1).view(torch.uint8))
            yield name, entry.nbytes
            continue
        row_bytes = entry.nbytes // shape[0]
        step = max(1, min(shape[0], chunk // max(row_bytes, 1)))
        for start in range(0, shape[0], step):
            n = min(step, shape[0] - start)
            part = read_region(stored.chunks[name], (start, *(0,) * (len(shape) - 1)), (n, *shape[1:]))
            raw = part.reshape(-1).view(torch.uint8)
            for sink in sinks:
                sink.write(raw)
            yield name, n * row_bytes


__all__ = ["FOLDER_NAME", "FrozenSet", "SetScan", "copy_set", "differing_chunks", "scan_sets", "write_frozen_set"]
