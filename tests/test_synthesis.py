"""Streaming synthesis against an oracle: an EMA tracked directly during the same training run."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from conftest import drift
from torch import nn

from posthoc_cli import (
    CatalogueError,
    InvalidValueError,
    NonFiniteError,
    OutputError,
    Recorder,
    load_synthesized,
    plan,
    synthesize,
)
from posthoc_cli.format.atomic import write_file
from posthoc_cli.format.catalogue import scan
from posthoc_cli.format.container import load_tensors
from posthoc_cli.format.snapshot_set import read_snapshot
from posthoc_cli.synth import inputs, mapping, stream


@pytest.fixture(autouse=True, params=["mapped", "read"])
def input_path(request, monkeypatch):
    """Every test here runs twice: inputs mapped side by side (even the smallest slices), and read."""
    if request.param == "mapped":
        if not mapping.supported():
            pytest.skip("mapping files side by side is Linux-only")
        monkeypatch.setattr(inputs, "_MAP_MIN_BYTES", 1)
    else:
        monkeypatch.setenv("POSTHOC_EMA_MMAP", "0")


def make_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))


def train(folders_and_sigmas, steps: int = 400, snapshot_every: int = 20, **kw) -> nn.Module:
    """One synthetic trajectory (drift + noise, like SGD), recorded by one Recorder per folder."""
    model = make_model()
    recs = [Recorder(model, f, sigma_rels=s, snapshot_every=snapshot_every, **kw) for f, s in folders_and_sigmas]
    drift(model, recs, steps, seed=2)
    return model


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    den = sum(float(b[n].double().pow(2).sum()) for n in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    train([(root / "ckpts", (0.05, 0.10)), (root / "direct", (0.15, 0.08))])
    return root


def test_synthesized_matches_directly_tracked_ema(recorded, tmp_path):
    out = synthesize(recorded / "ckpts", 0.15, out=tmp_path / "ema.safetensors")[0]
    direct = load_tensors(scan(recorded / "direct").series[0.15][-1].header)
    got = safetensors.torch.load_file(out)
    assert rel_err(got, direct) < 1e-3
    # and a length between the recorded ones, at an earlier time
    out = synthesize(recorded / "ckpts", 0.08, t=200, out=tmp_path / "ema08.safetensors")[0]
    direct08 = next(s for s in scan(recorded / "direct").series[0.08] if s.t == 200)
    assert rel_err(safetensors.torch.load_file(out), load_tensors(direct08.header)) < 1e-3


def test_output_loads_into_the_model_and_records_what_it_is(recorded, tmp_path):
    out = synthesize(recorded / "ckpts", 0.15, out=tmp_path / "ema.safetensors")[0]
    model = make_model()
    model.load_state_dict(safetensors.torch.load_file(out))
    snap = read_snapshot(out)
    assert snap.kind == "synthesized" and snap.sigma_rel == 0.15 and snap.t == 400
    info = snap.info
    assert len(info["inputs"]) == len(info["weights"]) > 2
    assert abs(sum(info["weights"]) - 1) < 1e-9
    assert 0 <= info["profile_error"] < 0.05 and info["sum_abs_weights"] >= 1
    # synthesized outputs next to the snapshots are not inputs to later scans
    synthesize(recorded / "ckpts", 0.12, out=recorded / "ckpts" / "side.safetensors")
    assert not any(s.kind != "snapshot" for s in scan(recorded / "ckpts").snapshots)
    (recorded / "ckpts" / "side.safetensors").unlink()


def test_load_synthesized_is_identical_to_the_file(recorded, tmp_path):
    out = synthesize(recorded / "ckpts", 0.15, out=tmp_path / "ema.safetensors")[0]
    in_memory = load_synthesized(recorded / "ckpts", 0.15)
    on_disk = safetensors.torch.load_file(out)
    assert in_memory.keys() == on_disk.keys()
    for name in on_disk:
        assert torch.equal(in_memory[name], on_disk[name]), name


def test_recorded_length_is_reproduced_bit_for_bit(recorded):
    snap = scan(recorded / "ckpts").series[0.10][-1]
    got = load_synthesized(recorded / "ckpts", 0.10)
    for name, tensor in load_tensors(snap.header).items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_many_targets_in_one_pass_equal_single_runs(recorded, tmp_path, accumulate):
    targets = [0.06, 0.09, 0.12, 0.15, 0.2]
    paths = synthesize(recorded / "ckpts", targets, out=tmp_path / "many", accumulate=accumulate)
    assert [p.parent for p in paths] == [tmp_path / "many"] * len(targets)
    for sigma_rel, path in zip(targets, paths):
        single = load_synthesized(recorded / "ckpts", sigma_rel, accumulate=accumulate)
        many = safetensors.torch.load_file(path)
        for name in single:  # bit for bit: no target depends on the others
            assert torch.equal(many[name], single[name]), (sigma_rel, name)


def test_slicing_does_not_change_results(recorded, monkeypatch):
    """Tensors split across many tiny read buffers give the same sums as whole-tensor reads."""
    whole = load_synthesized(recorded / "ckpts", 0.15)
    monkeypatch.setattr(stream, "SLICE_BYTES", 64)
    sliced = load_synthesized(recorded / "ckpts", 0.15)
    for name in whole:
        assert torch.equal(sliced[name], whole[name]), name


def test_dtype_and_float64_accumulation(recorded):
    half = load_synthesized(recorded / "ckpts", 0.15, dtype="float16")
    wide = load_synthesized(recorded / "ckpts", 0.15, accumulate="float64")
    base = load_synthesized(recorded / "ckpts", 0.15)
    for name, tensor in base.items():
        if tensor.is_floating_point():
            assert half[name].dtype == torch.float16
            torch.testing.assert_close(half[name].float(), tensor, rtol=2e-3, atol=1e-3)
            torch.testing.assert_close(wide[name], tensor, rtol=1e-5, atol=1e-6)


def test_integer_buffers_come_from_the_latest_input(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with Recorder(model, tmp_path, snapshot_every=10) as rec:
        for _ in range(30):
            model[1].num_batches_tracked.add_(1)
            with torch.no_grad():
                model[0].weight.add_(0.1)
            rec.update()
    for t, expected in ((30, 30), (20, 20)):
        got = load_synthesized(tmp_path, 0.09, t=t)
        assert int(got["1.num_batches_tracked"]) == expected


def test_refusals(recorded, tmp_path):
    ckpts = recorded / "ckpts"
    with pytest.raises(InvalidValueError, match="outside the recorded range"):
        plan(ckpts, [0.15], t=401)
    with pytest.raises(InvalidValueError, match="outside the recorded range"):
        plan(ckpts, [0.15], t=5)
    with pytest.raises(InvalidValueError, match="out of range"):
        plan(ckpts, [0.29])
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists"):
        synthesize(ckpts, 0.15, out=out)
    assert out.read_bytes() == b"keep me"
    victim = scan(ckpts).series[0.10][-1].path
    before = victim.read_bytes()
    with pytest.raises(OutputError, match="one of the input"):
        synthesize(ckpts, 0.15, out=victim, force=True)
    assert victim.read_bytes() == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogueError, match="no posthoc-ema snapshots"):
        synthesize(tmp_path / "empty", 0.15, out=tmp_path / "y.safetensors")


def test_single_recorded_length_cannot_make_others(tmp_path):
    train([(tmp_path, (0.10,))], steps=60)
    with pytest.raises(CatalogueError, match="only sigma_rel 0.1 was recorded"):
        plan(tmp_path, [0.15])
    assert plan(tmp_path, [0.10]).fit.weights.shape[0] == 1


def test_nonfinite_input_is_reported_with_file_and_tensor(tmp_path):
    train([(tmp_path, (0.05, 0.10))], steps=60)
    snap = scan(tmp_path).series[0.05][-1]
    tensors = load_tensors(snap.header)
    tensors["0.weight"][0, 0] = float("nan")
    snap.path.unlink()
    write_file(snap.path, tensors.items(), snap.header.metadata)
    with pytest.raises(NonFiniteError, match=r"'0.weight' in .*ema-s0.050-t000000000060"):
        synthesize(tmp_path, 0.08, out=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))
    out = synthesize(tmp_path, 0.08, out=tmp_path / "out.safetensors", allow_nonfinite=True)[0]
    assert torch.isnan(safetensors.torch.load_file(out)["0.weight"][0, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_snapshots(tmp_path, dtype):
    train([(tmp_path / "full", (0.05, 0.10))], steps=100, snapshot_every=10)
    model_folder = tmp_path / "lp"
    train([(model_folder, (0.05, 0.10))], steps=100, snapshot_every=10, snapshot_dtype=dtype)
    got = load_synthesized(model_folder, 0.15)
    ref = load_synthesized(tmp_path / "full", 0.15)
    assert got["0.weight"].dtype == dtype
    assert rel_err({k: v.float() for k, v in got.items()}, ref) < 1e-2
    as_float = load_synthesized(model_folder, 0.15, dtype="float32")
    assert as_float["0.weight"].dtype == torch.float32


def test_output_under_a_file_or_failing_run_leaves_no_folders(recorded, tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OutputError, match="blocker"):
        synthesize(recorded / "ckpts", 0.15, out=tmp_path / "blocker" / "ema.safetensors")
    with pytest.raises(InvalidValueError):  # refused while planning, before any folder is made
        synthesize(recorded / "ckpts", 0.15, t=10**6, out=tmp_path / "new" / "sub" / "ema.safetensors")
    assert not (tmp_path / "new").exists()


def test_failed_synthesis_removes_the_folders_it_made(tmp_path):
    train([(tmp_path / "ck", (0.05, 0.10))], steps=40)
    snap = scan(tmp_path / "ck").series[0.10][-1]
    tensors = load_tensors(snap.header)
    tensors["0.bias"][0] = float("inf")
    snap.path.unlink()
    write_file(snap.path, tensors.items(), snap.header.metadata)
    with pytest.raises(NonFiniteError):
        synthesize(tmp_path / "ck", 0.08, out=tmp_path / "new" / "sub" / "ema.safetensors")
    assert not (tmp_path / "new").exists()
