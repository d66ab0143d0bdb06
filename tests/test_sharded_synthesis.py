"""Synthesis from sharded snapshot sets equals, bit for bit, synthesis from single files of the same values.

The single files are a real Recorder's; the sets hold exactly their tensors, cut
by ``shardsets`` as FSDP2 (rows), tensor parallelism (columns) or a grid would
cut them, with world sizes changing over the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shardsets import Chunking, grid, set_folder, write_set
from typer.testing import CliRunner

import posthoc_cli
from posthoc_cli.cli.main import app
from posthoc_cli.format.container import load_tensors
from posthoc_cli.format.sharding import read_region
from posthoc_cli.format.snapshot_set import read_snapshot
from posthoc_cli.synth.chunked import flat_boxes


def columns(tensors: dict[str, torch.Tensor], parts: int) -> Chunking:
    """Matrices cut along dimension 1 (row-wise tensor parallelism); others along dimension 0."""
    chunking: Chunking = [{} for _ in range(parts)]
    for name, t in tensors.items():
        dim = 1 if t.dim() == 2 else 0
        for rank, piece in enumerate(grid({name: t}, parts, dim=dim)):
            chunking[rank] |= piece
    return chunking


def reshard(single: Path, out: Path, chunkings: list[int | str], *, keep_single: tuple[int, ...] = ()) -> Path:
    """A copy of a folder of single-file snapshots as sharded sets: snapshot k cut by ``chunkings[k % len]``."""
    out.mkdir()
    for k, path in enumerate(sorted(single.glob("*.safetensors"))):
        if k in keep_single:
            shutil.copy(path, out / path.name)
            continue
        snap = read_snapshot(path)
        tensors = load_tensors(snap.header)
        how = chunkings[k % len(chunkings)]
        chunking = columns(tensors, int(how[1:])) if isinstance(how, str) else grid(tensors, how)
        write_set(
            set_folder(out, snap.sigma_rel, snap.t), tensors, chunking, sigma_rel=snap.sigma_rel, t=snap.t,
            updates=snap.updates, dtype=snap.dtype, time_unit=snap.time_unit,
        )
    return out


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)) for k in a)


@given(st.lists(st.integers(0, 4), min_size=0, max_size=3), st.data())
@settings(max_examples=60, deadline=None)
def test_flat_boxes_tile_the_flat_range(shape, data):
    numel = 1
    for d in shape:
        numel *= d
    start = data.draw(st.integers(0, numel))
    stop = data.draw(st.integers(start, numel))
    marks = torch.arange(numel).reshape(shape) if shape else torch.tensor(0)
    got = [marks[tuple(slice(o, o + n) for o, n in zip(offs, box))].reshape(-1) for offs, box in flat_boxes(shape, start, stop)]
    flat = torch.cat(got) if got else torch.empty(0, dtype=torch.long)
    assert torch.equal(flat, torch.arange(numel)[start:stop])


@pytest.mark.parametrize("chunkings", [[2], [3, 2], ["c2", 3, 1]], ids=["fsdp2", "world-size-3-then-2", "tp-grid-mixed"])
def test_sharded_recording_synthesizes_to_the_bits_of_single_files(recorded, tmp_path, chunkings):
    sharded = reshard(recorded, tmp_path / "sharded", chunkings)
    assert all(s.sharded for s in posthoc_cli.scan(sharded).snapshots)
    for sigma_rel in (0.15, 0.07):
        want = posthoc_cli.load_synthesized(recorded, sigma_rel)
        assert same_bits(posthoc_cli.load_synthesized(sharded, sigma_rel), want)
        early = dict(t=120, dtype="bfloat16", accumulate="float64", allow_poor=True)  # 0.15 at t=120: poor (0.055)
        assert same_bits(posthoc_cli.load_synthesized(sharded, sigma_rel, **early),
                         posthoc_cli.load_synthesized(recorded, sigma_rel, **early))
    one = posthoc_cli.synthesize(recorded, [0.15, 0.07], out=tmp_path / "one")
    two = posthoc_cli.synthesize(sharded, [0.15, 0.07], out=tmp_path / "two", max_shard_size="1KB")
    for a, b in zip(one, two):
        merged: dict[str, torch.Tensor] = {}
        for shard in sorted(b.glob("*.safetensors")):
            merged |= safetensors.torch.load_file(shard)
        assert same_bits(merged, safetensors.torch.load_file(a))


def test_a_folder_mixing_single_files_and_sets_of_two_world_sizes(recorded, tmp_path):
    mixed = reshard(recorded, tmp_path / "mixed", [2, 3, "c2"], keep_single=(0, 5, 19))
    catalogue = posthoc_cli.scan(mixed)
    assert 0 < sum(s.sharded for s in catalogue.snapshots) < len(catalogue.snapshots) == 20
    assert same_bits(posthoc_cli.load_synthesized(mixed, 0.12), posthoc_cli.load_synthesized(recorded, 0.12))


def test_incomplete_sets_are_skipped_with_a_warning_and_the_default_time_is_the_latest_complete(recorded, tmp_path):
    sharded = reshard(recorded, tmp_path / "sharded", [2])
    for rank_file in sorted(sharded.glob("ema-s0.100-t000000000200/*.safetensors"))[1:]:
        rank_file.unlink()  # the last 0.10 set lost a rank: a crash while writing
    (sharded / "ema-s0.050-t000000000200" / "rank-00001.safetensors").rename(
        sharded / "ema-s0.050-t000000000200" / "rank-00001.safetensors.tmp"
    )
    p = posthoc_cli.plan(sharded, [0.15])
    assert p.t == 180 and p.incomplete == 2
    result = CliRunner().invoke(app, ["synthesize", str(sharded), "-s", "0.15", "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 0, result.stderr
    assert "t=180" in result.stdout and "Warning: 2 incomplete sharded snapshot(s)" in result.stderr
    want = posthoc_cli.load_synthesized(recorded, 0.15, t=180)
    assert same_bits(safetensors.torch.load_file(tmp_path / "o.safetensors"), want)


def _bend(folder: Path, how: str) -> Path:
    """Damage the last 0.05 set of a resharded folder as ``how`` says; returns the file the error must name."""
    target = folder / "ema-s0.050-t000000000200"
    tensors = {n: read_region(c, (0,) * len(s), s) for (n, (_, s)), c in zip(read_snapshot(target).layout.items(), read_snapshot(target).chunks.values())}
    shutil.rmtree(target)
    chunking = grid(tensors, 2)
    if how == "overlap":
        chunking[1]["fc1.weight"] = ((7, 0), (9, 8))  # rank 0 holds rows 0..8
        write_set(target, tensors, chunking, t=200)
        return target / "rank-00001.safetensors"
    if how == "gap":
        chunking[1]["fc1.weight"] = ((9, 0), (7, 8))  # row 8 is nowhere
        write_set(target, tensors, chunking, t=200)
        return target
    if how == "shapes":
        write_set(target, tensors, chunking, t=200, edit=lambda r, info, s: info["shard"]["shapes"].update({"fc2.bias": [4]}) if r else None)
        return target / "rank-00001.safetensors"
    if how == "two-world-sizes-in-one-set":
        write_set(target, tensors, grid(tensors, 3), t=200, ranks=[2])
        write_set(target, tensors, chunking, t=200)
        return target / "rank-00002.safetensors"
    assert how == "contradicting-sets-at-one-time"
    write_set(target, tensors, chunking, t=200)
    other = {n: t + 1 if t.is_floating_point() else t for n, t in tensors.items()}
    write_set(folder / "ema-s0.050-t000000000200-ws3", other, grid(other, 3), t=200)
    return folder / "ema-s0.050-t000000000200-ws3"


@pytest.mark.parametrize("how", ["overlap", "gap", "shapes", "two-world-sizes-in-one-set", "contradicting-sets-at-one-time"])
def test_hostile_sets_stop_the_cli_with_one_error_naming_the_file(recorded, tmp_path, how):
    folder = reshard(recorded, tmp_path / "sharded", [2])
    named = _bend(folder, how)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    for extra in ([], ["--max-shard-size", "300"]):
        result = CliRunner().invoke(app, ["synthesize", str(folder), "-s", "0.15", "--out", str(out / "x"), *extra])
        assert result.exit_code == 1, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(named) in lines[0]
        assert not out.exists()
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_a_missing_rank_file_is_an_incomplete_set_skipped_not_an_error(recorded, tmp_path):
    folder = reshard(recorded, tmp_path / "sharded", [3])
    (folder / "ema-s0.050-t000000000100" / "rank-00002.safetensors").unlink()
    result = CliRunner().invoke(app, ["synthesize", str(folder), "-s", "0.15", "--out", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 0 and "Warning: 1 incomplete sharded snapshot(s)" in result.stderr
    (recorded / "ema-s0.050-t000000000100.safetensors").unlink()
    assert same_bits(safetensors.torch.load_file(tmp_path / "o.safetensors"), posthoc_cli.load_synthesized(recorded, 0.15))


def test_inspect_counts_whole_sharded_snapshots(recorded, tmp_path):
    """Values and bytes of a sharded snapshot are summed over its rank files: the same as the single files it was cut
    from, in the table, the text and --json alike (inspect once counted rank 0's file alone)."""
    import json
    import subprocess
    import sys

    sharded = reshard(recorded, tmp_path / "sharded", [2, "c2", 3])

    def inspect(folder: Path, *flags: str) -> str:
        command = [sys.executable, "-m", "posthoc_cli", "inspect", str(folder), *flags]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
        assert done.returncode == 0, done.stderr
        return done.stdout

    single, whole = json.loads(inspect(recorded, "--json")), json.loads(inspect(sharded, "--json"))
    assert whole["contents"]["averaged"] == single["contents"]["averaged"]
    assert whole["contents"]["as_is"] == single["contents"]["as_is"]
    assert [s["parameters"] for s in whole["series"]] == [s["parameters"] for s in single["series"]]
    values = single["contents"]["averaged"]["parameters"]
    assert f"averages {single['contents']['averaged']['tensors']} tensors ({values:,} values" in inspect(sharded)
