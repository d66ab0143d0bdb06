"""Recorder.state_dict / load_state_dict and set_aside_after: exact resume at any step, abandoned futures kept aside."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, train_step
from trainer_helpers import assert_same_snapshots, read_folder

from posthoc_cli import Recorder, ResumeError
from posthoc_cli.record.rewind import set_aside_after


def run(folder: Path, start: int, stop: int, *, state: dict | None = None, model_state: dict | None = None,
        keep_at: int = -1) -> tuple[dict, dict]:
    """Steps start+1..stop of one deterministic trajectory (step k draws from seed k); returns the states at keep_at."""
    model = make_tiny_model(0)
    if model_state is not None:
        model.load_state_dict(model_state)
    kept: tuple[dict, dict] = ({}, {})
    with Recorder(model, folder, (0.05, 0.10), snapshot_every=4, update_every=2) as rec:
        if state is not None:
            rec.load_state_dict(state)
        for t in range(start + 1, stop + 1):
            train_step(model, torch.Generator().manual_seed(t))
            rec.update(step=t)
            if t == keep_at:
                kept = (rec.state_dict(), {k: v.clone() for k, v in model.state_dict().items()})
        rec.snapshot()
    return kept


@pytest.mark.parametrize("at", [4, 5, 7])
def test_load_state_dict_resumes_exactly_and_sets_the_future_aside(tmp_path: Path, at: int) -> None:
    run(tmp_path / "straight", 0, 13)
    state, model_state = run(tmp_path / "resumed", 0, 13, keep_at=at)  # the abandoned run went on to 13
    future = {n for n, (_, m) in read_folder(tmp_path / "resumed").items() if m["t"] > at}
    run(tmp_path / "resumed", at, 13, state=state, model_state=model_state)
    assert assert_same_snapshots(tmp_path / "straight", tmp_path / "resumed") == 8
    assert set(read_folder(tmp_path / "resumed" / f".abandoned-after-t{at:012d}")) == future


def test_state_dict_is_plain_and_exact(tmp_path: Path) -> None:
    state, _ = run(tmp_path, 0, 5, keep_at=5)
    torch.save(state, tmp_path / "s.pt")
    again = torch.load(tmp_path / "s.pt", weights_only=True)  # plain types and tensors only
    assert again["t"] == 5 and again["t_ema"] == [4, 4] and again["updates"] == [2, 2]  # update_every=2
    assert all(torch.equal(a, b) for ea, eb in zip(state["emas"], again["emas"]) for a, b in zip(ea, eb))


def test_load_state_dict_refuses_another_set_up(tmp_path: Path) -> None:
    state, _ = run(tmp_path / "a", 0, 5, keep_at=5)
    with Recorder(make_tiny_model(0), tmp_path / "b", (0.05, 0.15)) as rec, pytest.raises(ResumeError, match="sigma_rels"):
        rec.load_state_dict(state)
    with Recorder(make_tiny_model(0, hidden=8), tmp_path / "c", (0.05, 0.10)) as rec, pytest.raises(ResumeError, match="another model"):
        rec.load_state_dict(state)
    with Recorder(make_tiny_model(0), tmp_path / "d", (0.05, 0.10)) as rec, pytest.raises(ResumeError, match="times"):
        rec.load_state_dict(dict(state, t_ema=[9, 9]))


def test_set_aside_after_moves_only_later_snapshots_and_never_overwrites(tmp_path: Path) -> None:
    run(tmp_path, 0, 12)
    (tmp_path / "notes.txt").write_text("kept")
    assert set_aside_after(tmp_path, 12) is None  # nothing later
    first = set_aside_after(tmp_path, 8)
    assert first == tmp_path / ".abandoned-after-t000000000008"
    assert {m["t"] for _, m in read_folder(first).values()} == {12}
    assert {m["t"] for _, m in read_folder(tmp_path).values()} == {4, 8}
    run(tmp_path / "other", 0, 12)
    for path in (tmp_path / "other").glob("*t000000000012*"):
        path.rename(tmp_path / path.name)
    second = set_aside_after(tmp_path, 8)  # a second rewind to 8 gets its own folder
    assert second == tmp_path / ".abandoned-after-t000000000008-2"
    assert len(list(first.iterdir())) == len(list(second.iterdir())) == 2
    assert (tmp_path / "notes.txt").read_text() == "kept"


def sharded_run(folder: Path, start: int, stop: int, *, state: dict | None = None, model_state: dict | None = None,
                keep_at: int = -1, shard: bool = True) -> tuple[dict, dict]:
    """:func:`run` with the model's parameters as DTensors (FSDP2) on a 1-rank mesh: snapshots are set folders."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_tiny_model(0)
    if model_state is not None:
        model.load_state_dict(model_state)
    if shard:
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    kept: tuple[dict, dict] = ({}, {})
    with Recorder(model, folder, (0.05, 0.10), snapshot_every=4, update_every=2) as rec:
        if state is not None:
            rec.load_state_dict(state)
        for t in range(start + 1, stop + 1):
            g = torch.Generator().manual_seed(t)
            with torch.no_grad():
                for p in model.parameters():
                    (p.to_local() if shard else p).add_(0.01 * torch.randn(p.shape, generator=g) + 0.002)
            rec.update(step=t)
            if t == keep_at:
                # The state's tensors are this rank's local shards, as the sharded trainers save them per rank.
                kept = (rec.state_dict(), {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
                                           for k, v in model.state_dict().items()})
        rec.snapshot()
    return kept


def test_sharded_load_state_dict_resumes_exactly_and_sets_future_set_folders_aside(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded_run(tmp_path / "straight", 0, 13)
        state, model_state = sharded_run(tmp_path / "resumed", 0, 13, keep_at=5)
        future = sorted(p.name for p in (tmp_path / "resumed").iterdir() if p.is_dir() and int(p.name[-12:]) > 5)
        assert future and all((tmp_path / "resumed" / n / "rank-00000.safetensors").is_file() for n in future)
        sharded_run(tmp_path / "resumed", 5, 13, state=state, model_state=model_state)
    finally:
        dist.destroy_process_group()
    from shardsets import assert_same_snapshots as same_sets

    sharded_run(tmp_path / "plain", 0, 13, shard=False)  # the unsharded model's snapshots: the sets hold the same, bit for bit
    assert same_sets(tmp_path / "straight", tmp_path / "plain") == 8
    assert same_sets(tmp_path / "resumed", tmp_path / "plain") == 8
    aside = tmp_path / "resumed" / ".abandoned-after-t000000000005"
    assert sorted(p.name for p in aside.iterdir()) == future  # whole set folders, rank files inside


def test_set_aside_after_moves_unfinished_set_folders_by_name_and_leaves_other_folders(tmp_path: Path) -> None:
    unfinished = tmp_path / "ema-s0.050-t000000000012"
    unfinished.mkdir()
    (unfinished / "rank-00001.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"x")
    aside = set_aside_after(tmp_path, 8)
    assert aside is not None and (aside / unfinished.name / "rank-00001.safetensors.tmp").is_file()
    assert (tmp_path / "plots" / "a.png").is_file()
