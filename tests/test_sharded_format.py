"""Sharded snapshot sets on disk (docs/design.md §5): complete, incomplete and broken sets, chunked reads.

Sets are written by ``shardsets.write_set`` with the library's own metadata
functions, then bent into every hostile shape the contract names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shardsets import cut, grid, set_folder, split, write_set
from typer.testing import CliRunner

from posthoc_cli import CatalogueError, SnapshotFileError, plan, read_snapshot, scan
from posthoc_cli.cli.main import app
from posthoc_cli.format.atomic import write_file
from posthoc_cli.format.sharding import SHARDING_INFO_KEY, read_region, tiling_problem
from posthoc_cli.format.snapshot_set import read_set


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with an uneven dimension, a tensor smaller than the world size, a 0-dim and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(7, 5, generator=g),
        "fc.bias": torch.randn(7, generator=g),
        "tiny": torch.randn(2, generator=g),
        "scale": torch.randn((), generator=g),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
    }


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    return model_tensors()


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        return CliRunner()


# -- complete sets ----------------------------------------------------------------------------------


def test_a_complete_set_is_one_snapshot_with_global_layout_and_chunks(tmp_path, tensors):
    folder = set_folder(tmp_path)
    paths = write_set(folder, tensors, grid(tensors, 3))
    catalogue = scan(tmp_path)
    assert not catalogue.broken and not catalogue.incomplete and not catalogue.ignored
    (snap,) = catalogue.snapshots
    assert snap.sharded and snap.path == folder and snap.files == tuple(paths)
    assert (snap.sigma_rel, snap.t, snap.dtype) == (0.05, 100, "float32")
    assert list(snap.layout) == list(tensors)  # state-dict order
    assert snap.layout["fc.weight"] == ("F32", (7, 5)) and snap.layout["bn.num_batches_tracked"] == ("I64", ())
    assert [c.offsets for c in snap.chunks["fc.weight"]] == [(0, 0), (3, 0), (6, 0)]
    assert len(snap.chunks["tiny"]) == 2  # the third rank's piece is empty: not written
    assert snap.nbytes == sum(p.stat().st_size for p in paths)
    for name, t in tensors.items():
        assert torch.equal(read_region(snap.chunks[name], (0,) * t.dim(), tuple(t.shape)), t)
    assert read_snapshot(folder).layout == snap.layout == read_set(folder).layout


def test_a_single_file_has_the_same_fields(tmp_path, tensors):
    path = write_file(tmp_path / "x.safetensors", tensors.items(), write_set_metadata())
    snap = read_snapshot(path)
    assert not snap.sharded and snap.files == (path,) and snap.path == path
    assert snap.layout == {n: (snap.tensors[n].code, tuple(t.shape)) for n, t in tensors.items()}
    assert all(len(c) == 1 and c[0].offsets == (0,) * tensors[n].dim() for n, c in snap.chunks.items())
    assert torch.equal(read_region(snap.chunks["fc.weight"], (2, 1), (3, 4)), tensors["fc.weight"][2:5, 1:5])


def write_set_metadata() -> dict[str, str]:
    from posthoc_cli.ema.profiles import sigma_rel_to_gamma
    from posthoc_cli.format.snapshot import snapshot_metadata

    return snapshot_metadata(sigma_rel=0.05, gamma=sigma_rel_to_gamma(0.05), t=100, time_unit="step", updates=100, dtype="float32")


def test_two_dimensional_chunks_of_a_2x2_mesh_tile(tmp_path, tensors):
    w = tensors["fc.weight"]
    rows, cols = split(7, 2), split(5, 2)
    chunking = [{"fc.weight": ((r0, c0), (rn, cn))} for r0, rn in rows for c0, cn in cols]
    chunking[0].update({n: ((0,) * t.dim(), tuple(t.shape)) for n, t in tensors.items() if n != "fc.weight"})
    write_set(set_folder(tmp_path), tensors, chunking)
    (snap,) = scan(tmp_path).snapshots
    assert len(snap.chunks["fc.weight"]) == 4
    assert torch.equal(read_region(snap.chunks["fc.weight"], (1, 2), (5, 3)), w[1:6, 2:5])


# -- incomplete sets --------------------------------------------------------------------------------


def test_a_missing_rank_file_makes_the_set_incomplete(tmp_path, tensors):
    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 3), ranks=[0, 2])
    catalogue = scan(tmp_path)
    assert not catalogue.series and not catalogue.broken
    (skipped,) = catalogue.incomplete
    assert skipped.path == folder and "2 of 3 rank files (rank 1 missing)" in skipped.reason
    with pytest.raises(SnapshotFileError, match="rank 1 missing"):
        read_snapshot(folder)


def test_only_temporary_files_make_the_set_incomplete(tmp_path, tensors):
    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 2))
    for path in folder.iterdir():
        path.rename(path.with_name(path.name + ".tmp"))
    catalogue = scan(tmp_path)
    assert [s.path for s in catalogue.incomplete] == [folder] and "only temporary files" in catalogue.incomplete[0].reason
    assert not catalogue.series and not catalogue.broken


def test_an_incomplete_set_is_listed_by_inspect_and_never_used(tmp_path, tensors, record):
    ckpts = record(tmp_path / "ckpts", steps=100, snapshot_every=20)
    write_set(set_folder(ckpts, 0.05, 120), tensors, grid(tensors, 2), t=120, ranks=[1])
    result = runner().invoke(app, ["inspect", str(ckpts), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["incomplete"] == [{"path": str(set_folder(ckpts, 0.05, 120)), "reason": "1 of 2 rank files (rank 0 missing): a write that did not finish"}]
    assert report["latest_t"] == 100 and not report["broken"]
    text = runner().invoke(app, ["inspect", str(ckpts)])
    assert text.exit_code == 0 and "incomplete sharded snapshot" in text.stdout
    assert plan(ckpts, [0.07]).t == 100  # synthesis ignores it


# -- broken sets ------------------------------------------------------------------------------------


def broken_reason(root: Path) -> tuple[Path, str]:
    catalogue = scan(root)
    assert not catalogue.series
    (skipped,) = catalogue.broken
    return skipped.path, skipped.reason


def test_overlapping_chunks_are_broken_naming_the_file(tmp_path, tensors):
    chunking = grid(tensors, 2)
    chunking[1]["fc.weight"] = ((3, 0), (4, 5))  # rank 0 holds rows 0..3, rank 1 now 3..7
    folder = set_folder(tmp_path)
    write_set(folder, tensors, chunking)
    path, reason = broken_reason(tmp_path)
    assert path == folder / "rank-00001.safetensors" and "overlaps" in reason and "fc.weight" in reason


def test_gapped_chunks_are_broken_naming_the_set(tmp_path, tensors):
    chunking = grid(tensors, 2)
    chunking[1]["fc.weight"] = ((5, 0), (2, 5))  # row 4 is nowhere
    folder = set_folder(tmp_path)
    write_set(folder, tensors, chunking)
    path, reason = broken_reason(tmp_path)
    assert path == folder and "gap" in reason and "fc.weight" in reason


def test_a_tensor_missing_from_every_file_is_broken(tmp_path, tensors):
    chunking = grid(tensors, 2)
    del chunking[0]["scale"]
    write_set(set_folder(tmp_path), tensors, chunking)
    assert "'scale' has no chunk" in broken_reason(tmp_path)[1]


def test_disagreeing_global_shapes_are_broken(tmp_path, tensors):
    def edit(rank, info, sharding):
        if rank == 1:
            info["shard"]["shapes"]["fc.weight"] = [8, 5]

    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 2), edit=edit)
    path, reason = broken_reason(tmp_path)
    assert path == folder / "rank-00001.safetensors" and "global shape of 'fc.weight' is [8, 5], not [7, 5]" in reason


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("t", 120, "its t is 120, not 100"), ("updates", 7, "its updates is 7, not 100"), ("dtype", "float16", "metadata says float16")],
)
def test_disagreeing_metadata_is_broken(tmp_path, tensors, key, value, expected):
    def edit(rank, info, sharding):
        if rank == 2:
            info[key] = value

    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 3), edit=edit)
    path, reason = broken_reason(tmp_path)
    assert path == folder / "rank-00002.safetensors" and expected in reason


def test_sets_of_two_world_sizes_in_one_folder_are_broken(tmp_path, tensors):
    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 3), ranks=[2])
    write_set(folder, tensors, grid(tensors, 2))
    path, reason = broken_reason(tmp_path)
    assert path == folder / "rank-00002.safetensors" and "its set has 3 files, not 2" in reason


def test_a_repeated_rank_is_broken(tmp_path, tensors):
    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 2))
    shutil.copy(folder / "rank-00001.safetensors", folder / "rank-00001-copy.safetensors")
    path, reason = broken_reason(tmp_path)
    assert "rank 1 is also in" in reason and path.parent == folder


def test_a_rank_out_of_range_is_broken(tmp_path, tensors):
    def edit(rank, info, sharding):
        info["shard"]["rank"] = rank + 5 if rank else 0

    write_set(set_folder(tmp_path), tensors, grid(tensors, 2), edit=edit)
    assert "shard rank 6 is not in 0..1" in broken_reason(tmp_path)[1]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s.pop("fc.bias"), "does not list exactly the file's tensors"),
        (lambda s: s.update({"fc.weight": {"saved_offsets": [0]}}), "does not match global shape"),
        (lambda s: s.update({"fc.weight": {"saved_offsets": [4, 0]}}), "exceeds global shape"),
        (lambda s: s.update({"fc.weight": {"saved_offsets": "0,0"}}), "invalid saved_offsets"),
    ],
)
def test_bad_dcp_offsets_are_broken(tmp_path, tensors, change, expected):
    def edit(rank, info, sharding):
        if rank == 0:
            change(sharding)

    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 2), edit=edit)
    path, reason = broken_reason(tmp_path)
    assert path == folder / "rank-00000.safetensors" and expected in reason


def test_a_broken_set_stops_synthesis_with_its_file_named(tmp_path, tensors, record):
    ckpts = record(tmp_path / "ckpts", steps=60, snapshot_every=20)
    folder = set_folder(ckpts, 0.05, 120)
    write_set(folder, tensors, grid(tensors, 2), t=120, edit=lambda r, i, s: i.update(t=140) if r else None)
    with pytest.raises(CatalogueError, match="rank-00001.safetensors"):
        plan(ckpts, [0.07])
    before = sorted(p.name for p in ckpts.rglob("*"))
    result = runner().invoke(app, ["synthesize", str(ckpts), "--sigma-rel", "0.07", "--out", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "rank-00001.safetensors" in result.stderr
    assert not (tmp_path / "out.safetensors").exists() and sorted(p.name for p in ckpts.rglob("*")) == before


def test_a_rank_file_outside_a_set_folder_is_broken(tmp_path, tensors):
    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 2))
    (folder / "rank-00000.safetensors").rename(tmp_path / "stray.safetensors")
    catalogue = scan(tmp_path)
    assert [s.path for s in catalogue.broken] == [tmp_path / "stray.safetensors"]
    assert [s.path for s in catalogue.incomplete] == [folder]


def test_a_folder_without_rank_files_is_not_a_snapshot(tmp_path, tensors):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    catalogue = scan(tmp_path)
    assert not (catalogue.series or catalogue.broken or catalogue.incomplete)


def test_sharding_info_is_what_torch_reads(tmp_path, tensors):
    from safetensors import safe_open

    folder = set_folder(tmp_path)
    write_set(folder, tensors, grid(tensors, 2))
    with safe_open(folder / "rank-00001.safetensors", framework="pt") as f:
        info = json.loads(f.metadata()[SHARDING_INFO_KEY])
        assert info["fc.weight"] == {"saved_offsets": [4, 0]}
        assert set(info) == set(f.keys())


# -- properties -------------------------------------------------------------------------------------


@st.composite
def chunkings(draw):
    """A 2-D tensor cut by a random grid of row and column boundaries, and a random box inside it."""
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    rcuts = sorted(set(draw(st.lists(st.integers(1, rows), max_size=3))) | {0, rows})
    ccuts = sorted(set(draw(st.lists(st.integers(1, cols), max_size=3))) | {0, cols})
    boxes = [((r0, c0), (r1 - r0, c1 - c0)) for r0, r1 in zip(rcuts, rcuts[1:]) for c0, c1 in zip(ccuts, ccuts[1:])]
    r0 = draw(st.integers(0, rows - 1))
    c0 = draw(st.integers(0, cols - 1))
    region = ((r0, c0), (draw(st.integers(1, rows - r0)), draw(st.integers(1, cols - c0))))
    return (rows, cols), boxes, region, draw(st.integers(0, len(boxes) - 1))


@settings(max_examples=40, deadline=None)
@given(chunkings())
def test_any_grid_tiles_reads_back_and_a_missing_or_grown_chunk_is_caught(tmp_path_factory, case):
    (rows, cols), boxes, region, victim = case
    tmp = tmp_path_factory.mktemp("grid")
    w = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols)
    chunking = [{"w": box} for box in boxes]
    write_set(tmp / "s", {"w": w}, chunking)
    snap = read_set(tmp / "s")
    assert tiling_problem("w", (rows, cols), snap.chunks["w"]) is None
    assert torch.equal(read_region(snap.chunks["w"], *region), cut(w, region))
    fewer = [c for i, c in enumerate(snap.chunks["w"]) if i != victim]
    assert tiling_problem("w", (rows, cols), fewer) is not None or not fewer


def test_a_resumed_recorder_removes_the_unfinished_sets_it_will_rewrite(tmp_path, tensors, record):
    from conftest import make_tiny_model

    from posthoc_cli import Recorder

    ckpts = record(tmp_path / "ckpts", steps=100, snapshot_every=20)
    late, early = set_folder(ckpts, 0.05, 120), set_folder(ckpts, 0.05, 60)
    write_set(late, tensors, grid(tensors, 2), t=120, ranks=[1])
    (early).mkdir()
    (early / "rank-00000.safetensors.tmp").write_bytes(b"x")
    rec = Recorder(make_tiny_model(), ckpts, snapshot_every=20)
    assert rec.t == 100 and not late.exists()  # after the resume time: removed, to be rewritten
    assert early.exists()  # before it: never rewritten, left listed
    rec.close()
    assert [s.path for s in scan(ckpts).incomplete] == [early]
