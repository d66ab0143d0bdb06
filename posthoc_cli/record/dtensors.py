"""DTensor models (FSDP2, tensor parallel, HSDP): each rank's local shards, where they sit, who writes them.

A Recorder on a model with DTensor parameters averages every rank's *local*
shard (``to_local()``: a view, no copy, no communication). What each rank must
know to write its part of a sharded snapshot is computed from the DTensors'
meshes and placements alone, identically on every rank, without talking to
the others:

- where its chunk of each tensor starts in the global tensor;
- whether it writes that chunk: only ranks at coordinate 0 of every mesh
  dimension over which the tensor is replicated (HSDP's replicas, TP-replicated
  norms) write, so each element is stored once;
- the writing ranks of the whole model (the union over tensors), whose position
  in that sorted list is the rank file's index. Plain tensors of such a model
  (buffers, unsharded parameters) are replicated everywhere: the first writer
  stores them.

``torch.distributed`` is imported only when a model holds a DTensor.

>>> plan = shard_plan(state)  # doctest: +SKIP
>>> plan.files, plan.index  # doctest: +SKIP
(2, 1)
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidValueError
from . import ranks


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (without importing torch.distributed when it cannot be one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor a rank holds: a DTensor's local shard (a view, no copy), or the tensor itself."""
    return tensor._local_tensor.detach() if is_dtensor(tensor) else tensor.detach()  # type: ignore[attr-defined]


def refuse_unsupported(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Legacy FSDP (flat parameters) and DeepSpeed hide the model's real tensors: say so instead of averaging garbage."""
    refuse_old_torch(state)
    if _fsdp1(model, state):
        raise InvalidValueError(
            "the model is (or is inside) legacy FullyShardedDataParallel (FSDP1): its parameters are views of flat "
            "shards, not the model's tensors, which the Recorder does not support",
            "shard the model with torch.distributed.fsdp.fully_shard (FSDP2) instead of FullyShardedDataParallel",
        )
    if any(hasattr(t, "ds_id") or hasattr(t, "ds_tensor") for t in state.values()) or type(model).__module__.startswith("deepspeed"):
        raise InvalidValueError(
            "the model is managed by DeepSpeed (ZeRO partitioned parameters), which the Recorder does not support",
            "use torch.distributed's fully_shard (FSDP2) or DDP, or record the unwrapped model",
        )


def _fsdp1(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether FSDP1 manages ``model``: the wrapper, its flat parameters, or (for a module taken out of
    the wrapper, ``use_orig_params=True``) the parameters it re-pointed at flat-shard views, which FSDP1
    marks ``_fsdp_flattened`` (FSDP2 never does)."""
    fsdp1 = sys.modules.get("torch.distributed.fsdp.fully_sharded_data_parallel")
    flat = sys.modules.get("torch.distributed.fsdp._flat_param")
    if fsdp1 is None and flat is None:
        return False  # FSDP1 was never imported: nothing can be managed by it
    if fsdp1 is not None and any(isinstance(m, fsdp1.FullyShardedDataParallel) for m in model.modules()):
        return True
    tensors = [*state.values(), *model.parameters()]
    return any(getattr(t, "_fsdp_flattened", False) or (flat is not None and isinstance(t, flat.FlatParameter)) for t in tensors)


def spec(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    """What :func:`rebuild` needs to make a local tensor a DTensor like ``tensor`` (None: not a DTensor)."""
    if not is_dtensor(tensor):
        return None
    return (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())  # type: ignore[attr-defined]


def rebuild(local_tensor: torch.Tensor, how: tuple[Any, ...] | None) -> torch.Tensor:
    """``local_tensor`` as the DTensor ``spec`` describes (no communication), or as it is."""
    if how is None:
        return local_tensor
    from torch.distributed.tensor import DTensor

    mesh, placements, shape, stride = how
    return DTensor.from_local(local_tensor, mesh, placements, run_check=False, shape=shape, stride=stride)


def refuse_old_torch(state: Mapping[str, torch.Tensor]) -> None:
    """Sharded recording relies on torch 2.6's public DTensor and fully_shard."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if version < (2, 6) and any(type(t).__name__ == "DTensor" for t in state.values()):
        raise InvalidValueError(
            f"recording a sharded (DTensor) model needs torch 2.6 or later, not {torch.__version__}",
            "upgrade torch (pip install 'torch>=2.6')",
        )


@dataclass(frozen=True)
class LocalChunk:
    """One tensor as this rank holds it."""

    shape: tuple[int, ...]  # the global shape
    offsets: tuple[int, ...]  # where the local shard starts in it
    local_shape: tuple[int, ...]
    writes: bool  # whether this rank stores it in its file


@dataclass(frozen=True)
class ShardPlan:
    """What this rank writes of a sharded snapshot: its file's index, the number of files, each tensor's chunk."""

    index: int | None  # this rank's file in the set (None: it writes no file)
    files: int
    chunks: list[LocalChunk]  # per state-dict entry, in order
    mesh_shape: tuple[int, ...]  # the largest mesh seen (for messages)


def _world_mesh(mesh: Any, replicate: list[bool]) -> tuple[torch.Tensor | None, list[int]]:
    """The ranks of the mesh spanning the job (a sub-mesh's root) and its dimensions the tensor is replicated over.

    A DTensor on a sub-mesh (``world_mesh["dp"]``, as FSDP2 over TP makes for the
    parameters TP leaves alone) is replicated over the root's other dimensions.
    """
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    if root is mesh:
        return mesh.mesh, [d for d, r in enumerate(replicate) if r]
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if not names or not root_names or not set(names) <= set(root_names):
        return None, []  # a flattened or unnamed sub-mesh: its place in the root is unknown
    within = {root_names.index(n): r for n, r in zip(names, replicate)}
    return root.mesh, [d for d in range(len(root_names)) if within.get(d, True)]


Cut = tuple[int, int]  # one mesh dimension sharding a tensor dimension: (its size, the split factor; 0 for Shard)
Runs = tuple[tuple[int, int], ...]  # indices of a dimension, in order, as runs [start, stop): no per-row work


def _merged(runs: list[tuple[int, int]]) -> Runs:
    out: list[tuple[int, int]] = []
    for a, b in runs:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def _take(runs: Runs, lo: int, hi: int) -> Runs:
    """Positions ``lo:hi`` of the sequence ``runs`` describes."""
    taken, seen = [], 0
    for a, b in runs:
        first, last = max(lo - seen, 0), min(hi - seen, b - a)
        if first < last:
            taken.append((a + first, a + last))
        seen += b - a
    return _merged(taken)


def _piece(runs: Runs, count: int, k: int) -> Runs:
    """Piece ``k`` of ``runs`` cut in ``count`` as ``Shard`` cuts a dimension (torch.chunk: pieces of ceil(n/count), missing ones empty)."""
    total = sum(b - a for a, b in runs)
    step = -(-total // count)
    return _take(runs, k * step, min((k + 1) * step, total)) if k * step < total else ()


def _indices(size: int, cuts: tuple[Cut, ...], coordinate: tuple[int, ...]) -> Runs:
    """The global indices, in local order, that the rank at ``coordinate`` (on the cutting mesh dims) holds of a dimension.

    The cuts apply left to right, as DTensor defines placements: ``Shard`` cuts
    what is left and keeps this rank's piece; ``_StridedShard(sf)`` (FSDP2 over
    TP on the same dimension) first cuts it in ``sf`` pieces, each of those in
    mesh-size pieces, and keeps this rank's piece of each, one after another.
    """
    runs: Runs = ((0, size),)
    for (n, split), mine in zip(cuts, coordinate):
        groups = [_piece(runs, split, g) for g in range(split)] if split else [runs]
        runs = _merged([run for group in groups for run in _piece(group, n, mine)])
    return runs


def _nested(size: int, cuts: tuple[Cut, ...], coordinate: tuple[int, ...]) -> Runs:
    """The indices as FSDP2 over TP lays them out: the other cuts first, then the strided one(s) cut what is left."""
    runs: Runs = ((0, size),)
    order = sorted(range(len(cuts)), key=lambda k: bool(cuts[k][1]))  # stable: the plain cuts keep their order
    for k in order:
        runs = _piece(runs, cuts[k][0], coordinate[k])
    return runs


def _first(runs: Runs, count: int) -> list[int]:
    return [i for a, b in runs for i in range(a, min(b, a + count))][:count]


@functools.lru_cache(maxsize=1024)
def _scattered(size: int, cuts: tuple[Cut, ...]) -> tuple[list[int], tuple[int, ...]] | None:
    """Some coordinate's indices that are not one block, with that coordinate (None: every rank holds a block).

    A strided layout is recorded only where the placements' meaning (left to
    right) and FSDP2's actual layout (the TP shard cut again, :func:`_nested`)
    agree on every rank: they part for some uneven sizes (25 rows on dp 4 x tp 2),
    where no reading of the placements alone is safe. Every rank checks every
    coordinate, so all refuse a layout together instead of some training on
    while others stop; cached, as a model repeats a few shapes.
    """
    for coordinate in itertools.product(*(range(n) for n, _ in cuts)):
        held = _indices(size, cuts, coordinate)
        if len(held) > 1 or held != _nested(size, cuts, coordinate):  # not one block, or not where FSDP2 puts it
            return _first(held, 8), coordinate
    return None


def _local_box(tensor: torch.Tensor, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where this rank's local shard of ``tensor`` starts in the global tensor, and its shape.

    The local shard must be one box of the global tensor, its rows in global
    order, so that it is stored as one chunk: true of ``Shard`` and of FSDP2 over
    TP's ``_StridedShard``, whose later ``Shard`` picks one of the ``sf`` pieces;
    other strided layouts hold pieces scattered over the tensor and are refused.
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    coordinate = mesh.get_coordinate()
    offsets = []
    for dim in range(tensor.dim()):
        along = [(m, p) for m, p in enumerate(placements) if isinstance(p, (Shard, _StridedShard)) and p.dim == dim]
        cuts = tuple((mesh.size(m), int(p.split_factor) if isinstance(p, _StridedShard) else 0) for m, p in along)
        bad = _scattered(int(tensor.shape[dim]), cuts) if any(split for _, split in cuts) else None
        if bad is not None:
            raise InvalidValueError(
                f"the model holds {name}, whose local shards are not one block of the tensor each, in the same place as "
                f"FSDP2 over TP puts them (indices {bad[0]} of dimension {dim} at mesh coordinate {list(bad[1])})",
                "shard as FSDP2 over TP does (fully_shard after parallelize_module), with that dimension divisible by "
                "the product of the mesh sizes sharding it",
            )
        held = _indices(int(tensor.shape[dim]), cuts, tuple(coordinate[m] for m, _ in along))
        offsets.append(held[0][0] if held else int(tensor.shape[dim]))  # an empty shard sits at the end, as in torch
    shape = tuple(int(n) for n in tensor._local_tensor.shape)  # type: ignore[attr-defined]
    return tuple(offsets), shape


def local_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where a DTensor's local shard starts in the global tensor, and its shape (refused unless it is one box)."""
    return _local_box(tensor, f"a {type(tensor).__name__} with placements {tensor.placements}")  # type: ignore[attr-defined]


def _writers(tensor: torch.Tensor) -> tuple[set[int], LocalChunk]:
    """The global ranks that write ``tensor`` (a DTensor) and this rank's chunk of it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    name = lambda: f"a {type(tensor).__name__} with placements {placements}"  # noqa: E731
    for p in placements:
        if not isinstance(p, (Replicate, Shard, _StridedShard)):  # Partial: pending sums, not the tensor's values
            raise InvalidValueError(
                f"the model holds {name()}: only Shard, _StridedShard and Replicate placements can be recorded without communication",
                "record the model after its pending reductions (a Partial placement is an intermediate result, not a parameter)",
            )
    world = ranks.world_size()
    grid, replicated = _world_mesh(mesh, [isinstance(p, Replicate) for p in placements])
    if grid is None or grid.numel() != world:
        raise InvalidValueError(
            f"the model holds {name()} on a mesh of {mesh.mesh.numel()} ranks, but the job has {world}: the other ranks' copies are unknown to it",
            "put every rank in the DTensor's mesh (e.g. HSDP on a 2-D mesh instead of a sub-mesh plus DDP)",
        )
    offsets, local_shape = _local_box(tensor, name())
    for dim in replicated:
        grid = grid.narrow(dim, 0, 1)
    writers = set(grid.flatten().tolist())
    me = ranks.rank()
    return writers, LocalChunk(tuple(tensor.shape), offsets, local_shape, me in writers)


def shard_plan(state: Mapping[str, torch.Tensor]) -> ShardPlan | None:
    """The sharded-snapshot plan of a state dict holding DTensors; None when it holds none (a replicated model)."""
    if not any(is_dtensor(t) for t in state.values()):
        return None
    found: list[tuple[set[int] | None, LocalChunk]] = []
    writers: set[int] | None
    everyone: set[int] = set()
    mesh_shape: tuple[int, ...] = ()
    for tensor in state.values():
        if is_dtensor(tensor):
            writers, chunk = _writers(tensor)
            everyone |= writers
            mesh_shape = max(mesh_shape, tuple(tensor.device_mesh.mesh.shape), key=len)  # type: ignore[attr-defined]
            found.append((writers, chunk))
        else:
            shape = tuple(tensor.shape)
            found.append((None, LocalChunk(shape, (0,) * len(shape), shape, False)))
    order = sorted(everyone)
    me = ranks.rank()
    first = me == order[0]
    chunks = []
    for writers, chunk in found:
        if writers is None or math.prod(chunk.shape) == 0:  # replicated everywhere, or globally empty: the first writer stores it
            chunk = LocalChunk(chunk.shape, chunk.offsets, chunk.local_shape, first)
        elif chunk.writes and 0 in chunk.local_shape:  # an empty local shard: nothing to store
            chunk = LocalChunk(chunk.shape, chunk.offsets, chunk.local_shape, False)
        chunks.append(chunk)
    return ShardPlan(order.index(me) if me in everyone else None, len(order), chunks, mesh_shape)


__all__ = ["LocalChunk", "ShardPlan", "is_dtensor", "local", "local_box", "rebuild", "refuse_unsupported", "shard_plan", "spec"]
