"""A Recorder follows the model's live tensors: never averages tensors the model replaced (issue 10).

``model.to(dtype)``, ``load_state_dict(..., assign=True)`` and ``to_empty`` after
the Recorder was made: before its first update it starts over on the new
tensors; later it carries its EMAs over to them (same layout), or refuses
when the layout changed. Each case is checked against an oracle Recorder made
after the change (or on a twin model that never changed), bit for bit.
(``model.to("cuda")`` is in test_cuda.py; ``fully_shard`` in test_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from posthoc_cli import ModelChangedError, Recorder


def steps(models: list[nn.Module], recorders: list[Recorder], n: int, seed: int = 1) -> None:
    """The same deterministic drift applied to every model (in its own dtype), each Recorder updated."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            deltas = [0.01 * torch.randn(p.shape, generator=g, dtype=torch.float64) + 0.002 for p in models[0].parameters()]
            for model in models:
                for p, d in zip(model.parameters(), deltas):
                    p.add_(d.to(p.dtype))
            for rec in recorders:
                rec.update()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_cast_before_the_first_update_starts_over_on_the_new_tensors(tmp_path):
    model = make_tiny_model()
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    model.to(torch.float64)
    oracle_model = make_tiny_model().to(torch.float64)
    oracle = Recorder(oracle_model, tmp_path / "b", snapshot_every=10**9)
    steps([model, oracle_model], [rec, oracle], 30)
    assert same(rec.ema_state_dict(0.05), oracle.ema_state_dict(0.05))
    assert not torch.equal(rec.ema_state_dict(0.05)["fc1.weight"], make_tiny_model().fc1.weight.float())  # it moved


def test_a_cast_after_updates_carries_the_emas_over(tmp_path):
    model, twin = make_tiny_model(), make_tiny_model()  # the model is cast to float64 midway; the twin stays float32
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    steps([model, twin], [rec, oracle], 10)
    model.to(torch.float64)
    for k in range(20):  # the twin sees the float32 rounding of the float64 weights, as the Recorder does
        steps([model], [], 1, seed=10 + k)
        with torch.no_grad():
            for a, b in zip(twin.state_dict().values(), model.state_dict().values()):
                a.copy_(b)
        rec.update()
        oracle.update()
    assert rec.t == oracle.t == 30
    assert same(rec.ema_state_dict(0.10), oracle.ema_state_dict(0.10))
    assert rec.ema_state_dict(0.10)["fc1.weight"].dtype == torch.float32


@pytest.mark.parametrize("after", [0, 10])
def test_load_state_dict_with_assign_is_followed(tmp_path, after):
    model, twin = make_tiny_model(), make_tiny_model()
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    steps([model, twin], [rec, oracle], after)
    fresh = {k: v.clone() for k, v in make_tiny_model(seed=5).state_dict().items()}
    model.load_state_dict(fresh, assign=True)  # new Parameter objects
    twin.load_state_dict(fresh)  # copied into the old ones: the oracle's tensors never change
    steps([model, twin], [rec, oracle], 20, seed=3)
    assert same(rec.ema_state_dict(0.05), oracle.ema_state_dict(0.05))


def test_to_empty_after_a_meta_model_starts_over(tmp_path):
    with torch.device("meta"):
        model = make_tiny_model()
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    model.to_empty(device="cpu")
    model.load_state_dict(make_tiny_model().state_dict())
    twin = make_tiny_model()
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    steps([model, twin], [rec, oracle], 20)
    assert same(rec.ema_state_dict(0.05), oracle.ema_state_dict(0.05))


def test_to_empty_after_updates_carries_the_emas_over(tmp_path):
    model, twin = make_tiny_model(), make_tiny_model()
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    steps([model, twin], [rec, oracle], 10)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.to_empty(device="cpu")  # new storage, garbage values ...
    model.load_state_dict(saved)  # ... then a checkpoint reload
    steps([model, twin], [rec, oracle], 10, seed=4)
    assert same(rec.ema_state_dict(0.05), oracle.ema_state_dict(0.05))


def test_a_new_layout_after_updates_is_refused(tmp_path):
    model = make_tiny_model()
    rec = Recorder(model, tmp_path, snapshot_every=10**9)
    steps([model], [rec], 5)
    model.fc2.weight = nn.Parameter(torch.zeros(6, 16))  # was [3, 16]
    with pytest.raises(ModelChangedError, match="replaced by tensors of another layout") as info:
        rec.update()
    assert "create the Recorder after the model is moved, sharded and loaded" in str(info.value)


def test_snapshots_after_a_cast_hold_the_live_values(tmp_path):
    model = make_tiny_model()
    rec = Recorder(model, tmp_path, snapshot_every=10, async_write=False)
    model.double()
    steps([model], [rec], 10)
    from posthoc_cli import scan
    from posthoc_cli.format.container import load_tensors

    (snap,) = scan(tmp_path).series[0.05]
    stored = load_tensors(snap.header)
    assert torch.equal(stored["fc1.weight"], rec.ema_state_dict(0.05)["fc1.weight"])
    assert stored["bn.running_mean"].dtype == torch.float32 and torch.equal(
        stored["bn.num_batches_tracked"], model.bn.num_batches_tracked
    )
