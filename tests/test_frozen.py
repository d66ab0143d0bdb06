"""Record only what trains: frozen weights stored once, include/exclude patterns, complete or trainable-only outputs."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn

from posthoc_cli import (
    CatalogueError,
    FrozenWeightsError,
    InvalidValueError,
    Recorder,
    ResumeError,
    load_synthesized,
    plan,
    scan,
    synthesize,
)
from posthoc_cli.format.container import load_tensors, read_header
from posthoc_cli.format.frozen import FILE_NAME


class Adapted(nn.Module):
    """A frozen base layer (256 KB) with a small trainable low-rank adapter and a BatchNorm beside it."""

    def __init__(self, width: int = 256, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(width, width)
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        self.norm = nn.BatchNorm1d(width)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.base(x) + self.up(self.down(x)))


def make_adapted(seed: int = 0) -> Adapted:
    torch.manual_seed(seed)
    return Adapted()


def train(model: nn.Module, recorders: list[Recorder], steps: int, seed: int = 1) -> None:
    """Real steps: SGD on what requires grad, BatchNorm statistics updated by the forward pass."""
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 256, generator=generator)
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for rec in recorders:
            rec.update()
    for rec in recorders:
        rec.close()


def trainable_bytes(model: nn.Module) -> int:
    """Bytes of what is averaged: parameters that require grad and floating-point buffers."""
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + sum(b.numel() * b.element_size() for b in model.buffers() if b.is_floating_point())


def test_snapshots_hold_the_adapter_and_the_frozen_file_the_base(tmp_path):
    model = make_adapted()
    frozen_before = {n: t.detach().clone() for n, t in model.base.state_dict().items()}
    train(model, [Recorder(model, tmp_path, snapshot_every=10)], 40)
    catalogue = scan(tmp_path)
    assert not catalogue.ignored and not catalogue.broken  # the frozen file is recognised, not foreign
    adapter = trainable_bytes(model)
    for snap in catalogue.snapshots:
        header_bytes = min(e.begin for e in snap.tensors.values())
        assert snap.header.file_size - header_bytes <= 1.01 * adapter
        assert not any(name.startswith("base.") for name in snap.tensors)
    (frozen,) = catalogue.frozen
    assert frozen.path.name == FILE_NAME
    stored = load_tensors(frozen.header)
    assert stored.keys() == {"base.weight", "base.bias"}
    for name, tensor in stored.items():
        assert torch.equal(tensor, frozen_before[name.removeprefix("base.")]), name
    assert list(frozen.state_dict) == list(model.state_dict())
    assert all(json.loads(s.header.metadata["posthoc_ema"])["frozen"] == frozen.id for s in catalogue.snapshots)


def test_default_output_is_complete_and_equals_full_averaging(tmp_path):
    model = make_adapted()
    only, full = tmp_path / "only", tmp_path / "full"
    recorders = [Recorder(model, only, snapshot_every=10), Recorder(model, full, snapshot_every=10, average_frozen=True)]
    train(model, recorders, 60)
    assert scan(full).frozen == [] and "base.weight" in scan(full).snapshots[-1].tensors
    (path,) = synthesize(only, 0.08, out=tmp_path / "only.safetensors")
    (reference,) = synthesize(full, 0.08, out=tmp_path / "full.safetensors")
    got, want = safetensors.torch.load_file(path), safetensors.torch.load_file(reference)
    assert got.keys() == want.keys() == model.state_dict().keys()
    for name, tensor in got.items():
        if name.startswith("base."):
            # Copied bit for bit; full averaging gives Σ w_i x = x up to float32 rounding.
            assert torch.equal(tensor, model.state_dict()[name])
            torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(tensor, want[name]), name
    make_adapted(seed=5).load_state_dict(got, strict=True)
    in_memory = load_synthesized(only, 0.08)
    assert list(in_memory) == list(model.state_dict())  # the model's order
    assert all(torch.equal(in_memory[n], got[n]) for n in got)


def test_trainable_only_writes_the_averaged_tensors(tmp_path):
    model = make_adapted()
    train(model, [Recorder(model, tmp_path / "ckpts", snapshot_every=10)], 40)
    (path,) = synthesize(tmp_path / "ckpts", 0.08, out=tmp_path / "adapter.safetensors", trainable_only=True)
    adapter = safetensors.torch.load_file(path)
    averaged = {n for n, t in model.state_dict(keep_vars=True).items() if t.is_floating_point() and not n.startswith("base.")}
    assert adapter.keys() == averaged
    assert json.loads(read_header(path).metadata["posthoc_ema"])["contents"] == "trainable"
    memory = load_synthesized(tmp_path / "ckpts", 0.08, trainable_only=True)
    assert memory.keys() == averaged and all(torch.equal(memory[n], adapter[n]) for n in averaged)
    result = make_adapted(seed=3).load_state_dict(adapter, strict=False)
    assert set(result.missing_keys) == {"base.weight", "base.bias"}  # BatchNorm tolerates its missing counter
    assert not result.unexpected_keys


def test_missing_or_corrupt_frozen_file_is_a_clear_error(tmp_path):
    model = make_adapted()
    folder = tmp_path / "ckpts"
    train(model, [Recorder(model, folder, snapshot_every=10)], 20)
    frozen = folder / FILE_NAME
    data = frozen.read_bytes()
    frozen.unlink()
    with pytest.raises(CatalogueError, match="frozen.safetensors .* which is missing .*trainable_only=True"):
        synthesize(folder, 0.08, out=tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    synthesize(folder, 0.08, out=tmp_path / "b.safetensors", trainable_only=True)  # needs no frozen file
    with pytest.raises(FrozenWeightsError, match="which is missing"):
        Recorder(make_adapted(), folder, snapshot_every=10)
    frozen.write_bytes(data[:-10])  # truncated
    with pytest.raises(CatalogueError, match="frozen.safetensors"):
        plan(folder, [0.08])


def test_include_and_exclude_patterns(tmp_path):
    model = make_adapted()
    rec = Recorder(
        model, tmp_path / "a", average_frozen=True, include=["down.*", "up.*", "norm.*"], exclude="norm.num_batches_tracked"
    )
    assert rec.roles == {
        "base.weight": "stored once", "base.bias": "stored once", "down.weight": "averaged", "up.weight": "averaged",
        "norm.weight": "averaged", "norm.bias": "averaged", "norm.running_mean": "averaged",
        "norm.running_var": "averaged", "norm.num_batches_tracked": "stored once",
    }
    rec.close()


def test_patterns_that_leave_out_trainable_weights_or_match_nothing_are_refused(tmp_path):
    model = make_adapted()
    with pytest.raises(InvalidValueError, match=r"exclude pattern 'text_encoder\.\*' matches no tensor"):
        Recorder(model, tmp_path / "a", exclude=["text_encoder.*"])
    with pytest.raises(InvalidValueError, match="include pattern 'Down.*' matches no tensor"):
        Recorder(model, tmp_path / "b", include=["Down.*"])  # case-sensitive, like state_dict names
    with pytest.raises(InvalidValueError, match="'down.weight' require grad but the patterns leave them out"):
        Recorder(model, tmp_path / "c", exclude=["down.*"])
    model.requires_grad_(False)
    model.norm.requires_grad_(False)
    with pytest.raises(InvalidValueError, match="nothing to average"):
        Recorder(model, tmp_path / "d", exclude=["norm.*"])
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcd")


def test_tied_weights_share_a_role(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    model.requires_grad_(False)
    with pytest.raises(InvalidValueError, match="one tied tensor"):
        Recorder(model, tmp_path, average_frozen=True, exclude=["1.weight"])


def test_unfreezing_halfway_is_an_error_at_the_next_snapshot(tmp_path):
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=10, async_write=False)
    train(model, [], 0)
    for _ in range(10):
        rec.update()
    model.base.requires_grad_(True)
    for _ in range(9):
        rec.update()  # not noticed between snapshots: the check costs nothing per update
    with pytest.raises(FrozenWeightsError, match="'base.weight', 'base.bias' now require grad.*average_frozen=True"):
        rec.update()
    assert max(s.t for s in scan(tmp_path).snapshots) == 10  # nothing written for t=20


def test_frozen_weights_changed_in_place_are_noticed(tmp_path):
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=10, async_write=False)
    for _ in range(10):
        rec.update()
    with torch.no_grad():
        model.base.weight.mul_(1.0)  # touched but unchanged: fine
    for _ in range(10):
        rec.update()
    with torch.no_grad():
        model.base.bias.add_(1.0)
    for _ in range(9):
        rec.update()
    with pytest.raises(FrozenWeightsError, match="frozen 'base.bias' no longer equal"):
        rec.update()


def test_frozen_weights_replaced_between_snapshots_are_checked_at_the_next_one(tmp_path):
    """Updates watch only what they average; frozen tensors replaced (assign=True) are followed at the next snapshot."""
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=10, async_write=False)
    train(model, [rec], 5)
    kept = {k: v.detach().clone() for k, v in model.base.state_dict().items()}
    model.base.load_state_dict(kept, assign=True)  # new tensors, the same values: followed
    train(model, [rec], 10, seed=2)
    assert [s.t for s in scan(tmp_path).series[0.05]] == [10]
    model.base.load_state_dict({k: v + 1.0 for k, v in kept.items()}, assign=True)  # other values
    with pytest.raises(FrozenWeightsError, match="no longer equal"):
        train(model, [rec], 10, seed=3)


def test_updates_in_grad_mode_build_no_autograd_graph(tmp_path):
    """update() runs in the training loop's grad mode: its EMAs stay plain tensors, so no graph grows step by step."""
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=10**9)
    train(model, [rec], 3)
    assert torch.is_grad_enabled()
    assert not any(t.requires_grad or t.grad_fn is not None for ema in rec._emas for t in ema)  # what autograd would hold


def test_weights_loaded_after_the_recorder_was_made_are_the_ones_stored(tmp_path):
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=10)
    pretrained = make_adapted(seed=7).base.state_dict()
    model.base.load_state_dict(pretrained)
    train(model, [rec], 10)
    stored = load_tensors(scan(tmp_path).frozen[0].header)
    assert torch.equal(stored["base.weight"], pretrained["weight"])


def test_resume_continues_with_the_same_filter_and_refuses_another(tmp_path):
    model = make_adapted()
    train(model, [Recorder(model, tmp_path, snapshot_every=10)], 20)
    with pytest.raises(ResumeError, match=r"'base.weight' was stored once there but would be averaged here.*average_frozen="):
        Recorder(model, tmp_path, snapshot_every=10, average_frozen=True)
    with pytest.raises(ResumeError, match=r"exclude=\[\]; here .*exclude=\['norm.running_\*'\]\): 'norm.running_mean' was averaged"):
        Recorder(model, tmp_path, snapshot_every=10, exclude=["norm.running_*"])
    rec = Recorder(model, tmp_path, snapshot_every=10)
    assert rec.t == 20
    train(model, [rec], 10)
    assert len(scan(tmp_path).frozen) == 1 and scan(tmp_path).latest_t == 30
    other = make_adapted(seed=9)  # same names, other frozen weights: noticed at the first snapshot
    rec = Recorder(other, tmp_path, snapshot_every=10, async_write=False)
    with pytest.raises(FrozenWeightsError, match="no longer equal"):
        train(other, [rec], 10)


def test_folder_of_a_full_recording_refuses_a_filtered_resume(tmp_path):
    model = make_adapted()
    train(model, [Recorder(model, tmp_path, snapshot_every=10, average_frozen=True)], 10)
    with pytest.raises(ResumeError, match="every tensor averaged.*'base.weight' was averaged there but would be stored once here"):
        Recorder(model, tmp_path, snapshot_every=10)


def test_ema_state_dict_is_complete_or_trainable_only(tmp_path):
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=1000)
    train(model, [rec], 5)
    full = rec.ema_state_dict(0.05)
    assert list(full) == list(model.state_dict())
    assert full["base.weight"].data_ptr() == model.base.weight.data_ptr()  # the model's own, not copied
    assert set(rec.ema_state_dict(0.05, trainable_only=True)) == {
        "down.weight", "up.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
    }


def test_cli_end_to_end_through_the_entry_point(tmp_path):
    from test_e2e import cli

    model = make_adapted()
    folder = tmp_path / "ckpts"
    train(model, [Recorder(model, folder, snapshot_every=10)], 40)
    base_values = 256 * 256 + 256
    shown = cli("inspect", folder, cwd=tmp_path).stdout
    assert f"Stored once (frozen weights, not averaged): 2 tensors ({base_values:,} values, 263.2 kB) in {folder / FILE_NAME}" in shown
    assert "Each snapshot averages 6 tensors (3,072 values, 12.3 kB) and keeps 1 tensor (1 value, 8 bytes) as they are" in shown
    assert "skipped" not in shown and "Problems" not in shown
    doc = json.loads(cli("inspect", folder, "--json", cwd=tmp_path).stdout)
    assert doc["contents"]["stored_once"]["bytes"] == 4 * base_values and doc["ignored"] == []
    assert doc["contents"]["averaged"] == {"tensors": 6, "parameters": 3072, "bytes": 4 * 3072}

    cli("synthesize", folder, "-s", 0.08, "--trainable-only", "--out", "adapter.safetensors", cwd=tmp_path)
    adapter = safetensors.torch.load_file(tmp_path / "adapter.safetensors")
    assert set(adapter) == {"down.weight", "up.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var"}
    cli("synthesize", folder, "-s", 0.08, "--out", "complete.safetensors", cwd=tmp_path)
    complete = safetensors.torch.load_file(tmp_path / "complete.safetensors")
    make_adapted(seed=4).load_state_dict(complete, strict=True)
    assert all(torch.equal(complete[n], adapter[n]) for n in adapter)

    (folder / FILE_NAME).rename(tmp_path / "moved.safetensors")
    failed = cli("synthesize", folder, "-s", 0.08, "--out", "again.safetensors", cwd=tmp_path, check_rc=1)
    assert failed.stderr.startswith("Error: ") and "which is missing — put frozen.safetensors or the frozen/ files back" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1 and not (tmp_path / "again.safetensors").exists()
    assert "which is missing" in cli("inspect", folder, cwd=tmp_path).stdout


def test_a_foreign_file_under_the_frozen_name_is_never_replaced(tmp_path):
    foreign = {"x": torch.ones(3)}
    safetensors.torch.save_file(foreign, tmp_path / FILE_NAME)
    before = (tmp_path / FILE_NAME).read_bytes()
    model = make_adapted()
    rec = Recorder(model, tmp_path, snapshot_every=10, async_write=False)
    for _ in range(9):
        rec.update()
    with pytest.raises(FrozenWeightsError, match="exists and is not posthoc-ema's frozen weights"):
        rec.update()
    assert (tmp_path / FILE_NAME).read_bytes() == before and not scan(tmp_path).snapshots


def test_frozen_tensors_keep_their_own_dtype_and_bytes(tmp_path):
    """A bfloat16 frozen base stays bfloat16, bit for bit, whatever --dtype the averaged tensors get."""
    model = make_adapted()
    model.base.to(torch.bfloat16)
    rec = Recorder(model, tmp_path / "ckpts", snapshot_every=10)
    for _ in range(3):
        for _ in range(10):
            with torch.no_grad():
                model.down.weight.add_(0.01)
            rec.update()
    rec.close()
    (frozen,) = scan(tmp_path / "ckpts").frozen
    info = json.loads(frozen.header.metadata["posthoc_ema"])
    assert {k: info[k] for k in ("format", "kind", "filter")} == {
        "format": 1, "kind": "frozen", "filter": {"average_frozen": False, "include": None, "exclude": []},
    }
    assert {e.code for e in frozen.tensors.values()} == {"BF16"}
    (path,) = synthesize(tmp_path / "ckpts", 0.08, out=tmp_path / "half.safetensors", dtype="float16")
    out = safetensors.torch.load_file(path)
    assert out["base.weight"].dtype == torch.bfloat16 and torch.equal(out["base.weight"], model.base.weight)
    assert out["down.weight"].dtype == torch.float16
