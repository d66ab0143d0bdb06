"""Hugging Face sharded output (``--max-shard-size``): layout, loaders, equality with the single file, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from huggingface_hub import load_torch_model
from huggingface_hub.serialization import load_state_dict_from_file
from huggingface_hub.serialization._base import parse_size_to_int
from typer.testing import CliRunner

import posthoc_cli
from posthoc_cli.cli.main import app
from posthoc_cli.format.container import read_header
from posthoc_cli.synth.outputs import parse_size, shard_layouts

SIZES = [512, 64, 1024, 64, 192, 12]


def shards_of(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("text", ["5GB", "500MB", "20KB", "1TB", "1.5GB", " 7kb ", "3Mb"])
def test_sizes_are_read_as_huggingface_hub_reads_them(text):
    assert parse_size(text) == parse_size_to_int(text)


@pytest.mark.parametrize("bad", ["", "GB", "0", "-5MB", "5XB", "five", "1.5", "nanGB", "infTB"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(posthoc_cli.InvalidValueError, match="max_shard_size="):
        parse_size(bad)


def test_shards_keep_file_order_and_cut_before_overflow():
    layout = [(f"t{i}", "U8", (n,)) for i, n in enumerate(SIZES)]
    cut = [[name for name, _, _ in shard] for shard in shard_layouts(layout, 600)]
    assert cut == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]  # t2 exceeds the limit: alone
    assert [name for shard in cut for name in shard] == [f"t{i}" for i in range(6)]
    assert len(shard_layouts(layout, 10**9)) == 1 and len(shard_layouts([], 10)) == 1


def test_sharded_output_loads_with_huggingface_hub_equal_to_the_single_file(recorded, tmp_path, make_model):
    single = posthoc_cli.synthesize(recorded, 0.15, out=tmp_path / "single.safetensors")[0]
    # TinyNet's tensors take 512, 64, 64, 64, 64, 64, 8, 192 and 12 bytes: 300 bytes cut them in three.
    folder = posthoc_cli.synthesize(recorded, 0.15, out=tmp_path / "hf", max_shard_size=300)[0]
    assert folder == tmp_path / "hf"
    names = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
    assert shards_of(folder) == [*names, "model.safetensors.index.json"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    want = safetensors.torch.load_file(single)
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in want.values())}
    assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(names)
    merged: dict[str, torch.Tensor] = {}
    single_meta = read_header(single).metadata
    for name in names:
        header = read_header(folder / name)
        assert header.metadata["format"] == "pt"
        assert header.metadata["posthoc_ema"] == single_meta["posthoc_ema"] or _same_but_created(header.metadata, single_meta)
        merged |= load_state_dict_from_file(folder / name)
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    model = make_model(seed=5)
    load_torch_model(model, folder, strict=True)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def _same_but_created(a: dict[str, str], b: dict[str, str]) -> bool:
    x, y = json.loads(a["posthoc_ema"]), json.loads(b["posthoc_ema"])
    x.pop("created"), y.pop("created")
    return x == y


def test_one_shard_is_model_safetensors_alone_and_several_targets_get_subfolders(recorded, tmp_path, make_model):
    folder = posthoc_cli.synthesize(recorded, 0.15, out=tmp_path / "one", max_shard_size="5GB")[0]
    assert shards_of(folder) == ["model.safetensors"]
    with safetensors.safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt" and "posthoc_ema" in f.metadata()
    load_torch_model(make_model(), folder, strict=True)
    paths = posthoc_cli.synthesize(recorded, [0.15, 0.07], out=tmp_path / "many", max_shard_size="1KB")
    assert [p.name for p in paths] == ["ema-s0.150-t200", "ema-s0.070-t200"]
    for path, sigma_rel in zip(paths, [0.15, 0.07]):
        want = posthoc_cli.load_synthesized(recorded, sigma_rel)
        model = make_model(seed=9)
        load_torch_model(model, path, strict=True)
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_existing_folders_are_kept_unless_forced_and_only_weights_are_replaced(recorded, tmp_path):
    out = tmp_path / "hf"
    run = ["synthesize", str(recorded), "-s", "0.15", "--out", str(out), "--max-shard-size", "600"]
    assert CliRunner().invoke(app, run).exit_code == 0
    before = {p.name: p.stat().st_ino for p in out.iterdir()}
    result = CliRunner().invoke(app, run)
    assert result.exit_code == 1 and result.stderr.startswith(f"Error: {out} already exists — use --force")
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == before
    result = CliRunner().invoke(app, [*run[:-1], "1KB", "--force"])
    assert result.exit_code == 0, result.stderr
    assert shards_of(out) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    (out / "config.json").write_text("{}")
    result = CliRunner().invoke(app, [*run, "--force"])
    assert result.exit_code == 1 and "holds other files than model weights (config.json)" in result.stderr
    assert (out / "config.json").exists() and len(shards_of(out)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpts", "hf"]  # no temporary folder left beside it


def test_a_failed_run_leaves_no_shard_no_index_and_no_temporary_folder(recorded, tmp_path):
    victim = sorted(recorded.glob("*.safetensors"))[-1]
    header = read_header(victim)
    entry = max(header.tensors.values(), key=lambda e: e.begin)  # the last tensor: earlier shards are done by then
    with open(victim, "r+b") as f:
        f.seek(entry.begin)
        f.write(torch.tensor([float("nan")]).numpy().tobytes())
    out = tmp_path / "out" / "hf"
    result = CliRunner().invoke(app, ["synthesize", str(recorded), "-s", "0.15", "--out", str(out), "--max-shard-size", "100"])
    assert result.exit_code == 1 and "holds NaN or Inf" in result.stderr
    assert not (tmp_path / "out").exists()  # the folder made for it is gone too
    os.makedirs(out)
    result = CliRunner().invoke(app, ["synthesize", str(recorded), "-s", "0.15", "--out", str(out), "--max-shard-size", "100"])
    assert result.exit_code == 1 and shards_of(out) == [] and sorted(p.name for p in out.parent.iterdir()) == ["hf"]
