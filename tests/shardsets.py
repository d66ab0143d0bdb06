"""Test helper: write sharded snapshot sets from full tensors and a chunking, hostile ones included.

``write_set(folder, tensors, chunking)`` writes one rank file per entry of
``chunking`` (``{name: (offsets, shape)}`` per rank) with the library's own
metadata functions, so a test sees exactly what a Recorder writes; ``edit``
lets a test bend a rank file's record or DCP offsets to make a hostile set.

>>> tensors = {"w": torch.arange(12.0).reshape(4, 3)}
>>> paths = write_set(tmp / "ema-s0.050-t000000000100", tensors, grid(tensors, 2))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from posthoc_cli.ema.profiles import sigma_rel_to_gamma
from posthoc_cli.format.atomic import write_file
from posthoc_cli.format.keys import METADATA_KEY
from posthoc_cli.format.sharding import SHARDING_INFO_KEY, ShardRecord, rank_file_name
from posthoc_cli.format.snapshot import set_name, snapshot_metadata

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)
Chunking = list[dict[str, Box]]  # per rank file: the chunk of each tensor it holds


def split(size: int, parts: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of ``parts`` pieces of ``size`` as ``torch.chunk`` (FSDP2's rule) cuts them; trailing pieces may be empty."""
    step = -(-size // parts) if size else 0
    return [(min(i * step, size), max(0, min(step, size - i * step))) for i in range(parts)]


def grid(tensors: dict[str, torch.Tensor], parts: int, dim: int = 0) -> Chunking:
    """Every tensor cut into ``parts`` along ``dim`` (0-dim tensors and empty pieces go whole to rank 0 / nowhere)."""
    chunking: Chunking = [{} for _ in range(parts)]
    for name, t in tensors.items():
        if t.dim() == 0 or t.numel() == 0:
            chunking[0][name] = ((0,) * t.dim(), tuple(t.shape))
            continue
        for rank, (offset, length) in enumerate(split(t.shape[dim], parts)):
            if length:
                offsets = tuple(offset if d == dim else 0 for d in range(t.dim()))
                shape = tuple(length if d == dim else n for d, n in enumerate(t.shape))
                chunking[rank][name] = (offsets, shape)
    return chunking


def cut(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    offsets, shape = box
    return tensor[tuple(slice(o, o + n) for o, n in zip(offsets, shape))].contiguous()


def write_set(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    chunking: Chunking,
    *,
    sigma_rel: float = 0.05,
    t: int = 100,
    updates: int | None = None,
    dtype: str = "float32",
    time_unit: str = "step",
    ranks: Sequence[int] | None = None,
    edit: Callable[[int, dict[str, Any], dict[str, Any]], None] | None = None,
) -> list[Path]:
    """Write the rank files of one set (only ``ranks``, default all); returns their paths.

    ``edit(rank, record, sharding_info)`` may change a file's ``posthoc_ema``
    record and ``DCP_SHARDING_INFO`` (JSON objects) before it is written.
    """
    folder.mkdir(parents=True, exist_ok=True)
    storage = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    shapes = {name: tuple(t_.shape) for name, t_ in tensors.items()}
    paths = []
    for rank in range(len(chunking)) if ranks is None else ranks:
        boxes = chunking[rank]
        record = ShardRecord(rank, len(chunking), shapes, {name: box[0] for name, box in boxes.items()})
        metadata = snapshot_metadata(
            sigma_rel=sigma_rel, gamma=sigma_rel_to_gamma(sigma_rel), t=t, time_unit=time_unit,
            updates=t if updates is None else updates, dtype=dtype, shard=record,
        )
        if edit is not None:
            info, sharding = json.loads(metadata[METADATA_KEY]), json.loads(metadata[SHARDING_INFO_KEY])
            edit(rank, info, sharding)
            metadata = {METADATA_KEY: json.dumps(info), SHARDING_INFO_KEY: json.dumps(sharding)}
        items = []
        for name, box in boxes.items():
            piece = cut(tensors[name], box)
            items.append((name, piece.to(storage) if piece.is_floating_point() else piece))
        paths.append(write_file(folder / rank_file_name(rank), items, metadata))
    return paths


def set_folder(root: Path, sigma_rel: float = 0.05, t: int = 100) -> Path:
    return root / set_name(sigma_rel, t)


def full_tensors(snap: Any) -> dict[str, torch.Tensor]:
    """Every tensor of a snapshot (set or file), assembled from its chunks."""
    from posthoc_cli.format.sharding import read_region

    return {name: read_region(snap.chunks[name], (0,) * len(shape), shape) for name, (_, shape) in snap.layout.items()}


def assert_same_snapshots(folder: Path, reference: Path, *, sharded: bool = True) -> int:
    """The snapshots of ``folder`` (sets) hold, bit for bit, what the single files of ``reference`` hold.

    Same (sigma_rel, t) pairs, same records (updates, dtype, time unit), same tensors
    in the same order. Returns the number of snapshots compared.
    """
    from posthoc_cli import scan

    ours, theirs = scan(folder), scan(reference)
    assert not ours.broken and not ours.incomplete, (ours.broken, ours.incomplete)
    mine = {(s.sigma_rel, s.t): s for s in ours.snapshots}
    other = {(s.sigma_rel, s.t): s for s in theirs.snapshots}
    assert sorted(mine) == sorted(other)
    for key, ref in other.items():
        snap = mine[key]
        assert snap.sharded == sharded
        assert (snap.updates, snap.dtype, snap.time_unit) == (ref.updates, ref.dtype, ref.time_unit), key
        assert list(snap.layout.items()) == list(ref.layout.items()), key
        a, b = full_tensors(snap), full_tensors(ref)
        for name in b:
            assert torch.equal(a[name], b[name]), (key, name)
    return len(other)
