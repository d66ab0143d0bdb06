"""The Recorder's frozen weights: written once at its first snapshot, checked at every later one.

A Recorder that averages only what trains (:mod:`.selection`) writes the tensors
it does not average once per folder (:mod:`posthoc_cli.format.frozen`), at its
first snapshot, so weights loaded after the Recorder was made are the ones kept;
tensors as they are in the model (dtype and bytes unchanged). A sharded model's
ranks each write their own chunks (:mod:`posthoc_cli.format.frozen_set`). A
resumed Recorder instead checks at its first snapshot that the model still holds
those bytes. After that, each snapshot checks that no stored-once parameter has
started to require grad and that no stored-once tensor was changed in place
(torch's version counter; changed tensors are compared with the file, bit for
bit): an error, never a silently constant EMA.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import torch_codes
from ..errors import (
    FrozenWeightsError,
    OutputError,
    ResumeError,
    SnapshotFileError,
    few,
)
from ..format.atomic import AtomicWriter
from ..format.catalogue import Catalogue
from ..format.container import read_header, read_tensor
from ..format.frozen import (
    FILE_NAME,
    WHERE,
    FrozenFile,
    info_record,
    is_frozen,
    options,
    read_frozen,
)
from ..format.frozen_set import FOLDER_NAME, FrozenSet, as_set, assemble, member
from ..format.keys import METADATA_KEY
from ..format.sharding import (
    ShardRecord,
    rank_file_name,
    read_region,
    saved_offsets_metadata,
)
from . import dtensors
from .selection import AS_IS, AVERAGED, STORED_ONCE, describe_difference

if TYPE_CHECKING:
    import torch


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def write_frozen(
    folder: Path, tensors: Mapping[str, torch.Tensor], state_dict: Sequence[str], selection: dict[str, Any]
) -> FrozenFile:
    """Write ``tensors`` as they are (dtype, bytes) into ``folder/frozen.safetensors``, atomically, one at a time."""

    info = info_record(uuid.uuid4().hex, state_dict, selection)
    layout = [(name, torch_codes()[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    path = folder / FILE_NAME
    refuse_foreign(path)
    with AtomicWriter(path, layout, {METADATA_KEY: json.dumps(info)}, overwrite=True) as writer:
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
            if entry is None or entry.code != torch_codes()[live.dtype] or entry.shape != tuple(live.shape):
                out.append(name)
                continue
            stored = read_tensor(fd, entry, path=file.path)
            if not torch.equal(stored.reshape(-1).view(torch.uint8), live.reshape(-1).view(torch.uint8)):
                out.append(name)
    finally:
        os.close(fd)
    return out


def write_frozen_set(
    folder: Path, tensors: Mapping[str, torch.Tensor], state_dict: Sequence[str], selection: dict[str, Any], ident: str
) -> FrozenSet | None:
    """Write this rank's owned chunks of ``tensors`` into ``folder/frozen/rank-k.safetensors`` (atomically).

    Ownership follows :func:`.dtensors.shard_plan`; a rank owning no chunk writes
    nothing (returns None). No communication.
    """

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
    layout = [(n, torch_codes()[t.dtype], tuple(t.shape)) for n, t in zip(names, locals_)]
    sub = folder / FOLDER_NAME
    try:
        sub.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {sub} ({e.strerror})", "check the folder and its permissions") from e
    path = sub / rank_file_name(plan.index)
    refuse_foreign(path)
    metadata = {METADATA_KEY: json.dumps(info), **saved_offsets_metadata(shard.offsets)}
    with AtomicWriter(path, layout, metadata, overwrite=True) as writer:
        for t in locals_:  # one local shard in host memory at a time
            writer.write(t.detach().to("cpu").contiguous())
        writer.commit()
    mine = member(path)
    assert mine is not None
    return assemble(sub, [mine], require_all=False)


def _local_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], torch.Tensor]:
    """Where this rank's part of ``tensor`` starts globally, and that part (a plain tensor)."""

    if dtensors.is_dtensor(tensor):
        return dtensors.local_box(tensor)[0], dtensors.local(tensor)
    return (0,) * tensor.dim(), tensor.detach()


def differing_chunks(stored: FrozenSet, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names whose local shards differ from what ``stored`` holds for them (bit for bit).

    A complete set is read at each rank's own box (any stored chunking); a rank's
    own file checks only the chunks it holds itself.
    """
    import torch


    out = []
    for name, tensor in tensors.items():
        offsets, live = _local_box(tensor)
        live = live.to("cpu").contiguous()
        chunks = stored.chunks.get(name)
        if not stored.complete:
            chunks = [c for c in chunks or [] if c.offsets == offsets and c.entry.shape == tuple(live.shape)]
            if not chunks:
                continue  # stored by another rank, which checks it
        if chunks is None or stored.codes[name] != torch_codes()[live.dtype] or (
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
        latest = catalogue.snapshots[-1]
        ref = catalogue.frozen_for([latest])
        if ref is not None and ref.file is None:
            raise FrozenWeightsError(
                f"{self.folder}: the snapshots keep their frozen weights in {WHERE} (id {ref.id}), which is missing",
                f"put {FILE_NAME} or the frozen/ files back to continue this recording, or record in a new folder",
            )
        file = ref.file if ref is not None else None
        roles = {n: AVERAGED if e.is_floating_point else AS_IS for n, e in latest.tensors.items()}
        roles.update({n: STORED_ONCE for n in (file.tensors if file else ())})
        # Other names are another model: the Recorder's own check says so; here only the roles differ.
        diff = describe_difference(roles, ours) if roles.keys() == ours.keys() else None
        if diff is not None:
            theirs = options(file.filter) if file is not None else "every tensor averaged"
            ours_text = options(self.selection)
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
                f"{few(unfrozen)} now require grad, but were frozen (stored once, not averaged) when the Recorder was made",
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
        if self.set_id is not None:  # a sharded model: each rank writes its own chunks (layout: format/frozen_set.py)
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
                f"frozen {few(bad)} no longer equal what {self.file.path} stores once for this recording",
                "keep frozen weights unchanged while recording (load the recorded model's weights before resuming), "
                "or average them with average_frozen=True in a new folder",
            )
