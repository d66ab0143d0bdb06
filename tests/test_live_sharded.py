"""The live-tensor check on DTensor slots (FSDP2 on a 1-rank gloo world, in this process).

The check reads each DTensor's local shard through a C-level getter, apart from
the plain slots (posthoc_cli/live.py); these cases guard that path: a local
shard replaced inside the same DTensor, and a DTensor slot that now holds a
plain tensor (on one rank: the same layout), are followed, never averaged stale.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from posthoc_cli import Recorder


@pytest.fixture
def sharded(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        def make() -> nn.Module:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
            model(torch.randn(2, 6)).sum().backward()  # FSDP2's lazy init re-pads the local shards
            return model

        yield make
    finally:
        dist.destroy_process_group()


def drift(models: list[nn.Module], recorders: list[Recorder], n: int) -> None:
    with torch.no_grad():
        for step in range(n):
            for model in models:
                for i, p in enumerate(model.parameters()):
                    getattr(p, "_local_tensor", p).add_(0.01 * (i + 1) + 0.001 * step)
            for rec in recorders:
                rec.update()


def local_values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: getattr(v, "_local_tensor", v) for k, v in state.items()}


def test_a_local_shard_replaced_inside_the_same_dtensor_is_followed(tmp_path, sharded):
    model, twin = sharded(), sharded()
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    drift([model, twin], [rec, oracle], 5)
    weight = model[0].weight
    weight._local_tensor = weight._local_tensor.clone()  # new storage, same DTensor object
    drift([model, twin], [rec, oracle], 5)  # a stale alias would stop moving here
    ours, theirs = local_values(rec.ema_state_dict(0.05)), local_values(oracle.ema_state_dict(0.05))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_dtensor_slot_that_now_holds_a_plain_tensor_is_followed(tmp_path, sharded):
    model, twin = sharded(), sharded()
    rec = Recorder(model, tmp_path / "a", snapshot_every=10**9)
    oracle = Recorder(twin, tmp_path / "b", snapshot_every=10**9)
    drift([model, twin], [rec, oracle], 3)
    model[1]._parameters["bias"] = nn.Parameter(torch.full((3,), 5.0))  # plain, where a DTensor was
    with torch.no_grad():
        twin[1].bias._local_tensor.fill_(5.0)  # the same values, in the twin's own DTensor
    drift([model, twin], [rec, oracle], 5)
    ours, theirs = local_values(rec.ema_state_dict(0.05)), local_values(oracle.ema_state_dict(0.05))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
