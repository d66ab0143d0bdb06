"""posthoc_cli.swapped: a synthesized EMA in a live model for the length of a block, the training weights back after."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import record_with_a_frozen_layer
from torch.nn.parallel import DistributedDataParallel

from posthoc_cli import CatalogueError, load_synthesized, swapped


def snapshot_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: x.detach().clone() for n, x in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("target", [0.15, "sigma_rel=0.08", "beta=0.95"])
def test_inside_the_model_holds_load_synthesized_and_after_its_own_weights(recorded, make_model, target):
    model = make_model(seed=5)
    training = snapshot_of(model)
    want = load_synthesized(recorded, target)
    with swapped(model, recorded, target) as ema_model:
        assert ema_model is model
        assert same(snapshot_of(model), want)
        assert torch.is_grad_enabled()  # the block runs in the caller's grad mode
    assert same(snapshot_of(model), training)


def test_the_training_weights_come_back_when_the_block_raises(recorded, make_model):
    model = make_model(seed=5)
    training = snapshot_of(model)
    with pytest.raises(RuntimeError, match="evaluation failed"), swapped(model, recorded, 0.12, t=100):
        assert same(snapshot_of(model), load_synthesized(recorded, 0.12, t=100))
        raise RuntimeError("evaluation failed")
    assert same(snapshot_of(model), training)


def test_a_ddp_wrapped_model(recorded, make_model, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(make_model(seed=5))
        training = snapshot_of(model.module)
        with swapped(model, recorded, 0.15) as ema_model:
            assert ema_model is model
            assert same(snapshot_of(model.module), load_synthesized(recorded, 0.15))
        assert same(snapshot_of(model.module), training)
    finally:
        dist.destroy_process_group()


def test_frozen_weights_stored_once_are_left_as_the_model_holds_them(tmp_path):
    folder = tmp_path / "ckpts"
    record_with_a_frozen_layer(folder, tmp_path, sharded=False)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.Linear(48, 16))
    model[0].requires_grad_(False)
    training = snapshot_of(model)
    with swapped(model, folder, "sigma_rel=0.10"):
        inside = snapshot_of(model)
        assert same({n: inside[n] for n in ("0.weight", "0.bias")}, {n: training[n] for n in ("0.weight", "0.bias")})
        averaged = load_synthesized(folder, 0.10, trainable_only=True)
        assert averaged.keys() == {"1.weight", "1.bias"} and same({n: inside[n] for n in averaged}, averaged)
    assert same(snapshot_of(model), training)


def test_a_model_without_the_folders_tensors_is_refused_untouched(recorded):
    model = torch.nn.Linear(8, 16)
    training = snapshot_of(model)
    with pytest.raises(CatalogueError, match="holds tensors the model lacks"), swapped(model, recorded, 0.15):
        pass
    assert same(snapshot_of(model), training)
